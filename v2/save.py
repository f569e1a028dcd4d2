"""The native v2 save engine for PV guests, non-live (spec save-restore-engines 3.1-3.8).

    result = save_pv(hv, domid, writer, suspend=callback)

writes exactly the record sequence of spec 3.3: image and domain headers (v3), X86_PV_INFO, the CPU
policy records when non-empty, STATIC_DATA_END, X86_PV_P2M_FRAMES, then (after `suspend()` and a
check that the domain is shut down for suspend) one PAGE_DATA record per 1024 pfns with pagetables
normalised, X86_TSC_INFO, SHARED_INFO, the records of every online vcpu and END.

Failures raise `SaveError` (one line naming what was wrong, for a bad pagetable the pfn and entry);
no END is written then, and log-dirty is switched off whatever happens (spec 3.8).
"""

from __future__ import annotations

import bisect
import errno
import os
import struct
from array import array
from collections.abc import Callable

import attrs

from xenstream.hv import abi, kernels
from xenstream.hv.guestview import GuestStateError, PvGuestView, hypervisor_call, shadow_off_afterwards
from xenstream.hv.interface import Hypervisor
from xenstream.hv.lazylog import get_logger
from xenstream.hv.pagetables import NORMALISE_OK, xen_slot_range
from xenstream.hv.u64runs import consecutive
from xenstream.v2 import constants as C
from xenstream.v2.records import (
    DomainHeader,
    End,
    ImageHeader,
    SharedInfo,
    StaticDataEnd,
    X86PvInfo,
    X86PvP2mFrames,
    X86PvVcpuBasic,
    X86PvVcpuExtended,
    X86PvVcpuMsrs,
    X86PvVcpuXsave,
    X86TscInfo,
)
from xenstream.v2.writer import V2Writer, encode_record

log = get_logger(__name__)

STREAM_VERSION = 3
_IOV_MAX = 1024
_PAGE_DATA_HEAD = struct.Struct("<IIII")  # record type, length, count, reserved
_KNOWN_CODES = frozenset(abi.pfinfo_from_pagetype(t) for t in abi.KNOWN_PAGETYPES)
_DATALESS_CODES = frozenset(abi.pfinfo_from_pagetype(t) for t in abi.PAGETYPES_WITHOUT_DATA)
_TABLE_CODES = frozenset(abi.pfinfo_from_pagetype(t) for t in abi.KNOWN_PAGETYPES if abi.pagetable_level(t))
_EXT_SIZE_OFFSET = 4


class SaveError(Exception):
    """The guest could not be saved; `errno` follows the C engine's choice where there is one."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


@attrs.frozen
class SaveResult:
    width: int
    levels: int
    max_pfn: int
    pages_written: int
    records: int
    bytes_written: int


def policy_records(hv: Hypervisor, domid: int) -> list[tuple[int, bytes]]:
    """The CPU policy records, CPUID first, each only when non-empty (spec 3.3)."""
    policy = hypervisor_call("get CPU policy", hv.get_cpu_policy, domid)
    candidates = ((C.REC_X86_CPUID_POLICY, policy.cpuid), (C.REC_X86_MSR_POLICY, policy.msrs))
    return [(record_type, bytes(body)) for record_type, body in candidates if body]


def require_known(codes, present: set[int], first: int, unit: str) -> None:
    """SaveError naming the first of `codes` (the page-type answer for `unit`s first.., `present` the set of
    them) that is not a known page type; the PV and HVM savers both refuse to guess at one."""
    unknown = present - _KNOWN_CODES
    if unknown:
        i = next(i for i, code in enumerate(codes) if code in unknown)
        raise SaveError(f"unknown page type {codes[i]:#x} for {unit} {first + i:#x}")


def _first_bad_entry(view: PvGuestView, level: int, page: memoryview) -> str:
    """Why a pagetable page failed normalisation, naming the first offending entry (slow path, errors only)."""
    if view.levels == 3 and level == 4:
        return "an L4 table in a 3-level guest"
    compat = abi.INVALID_MFN if view.compat_m2p_mfn0 is None else view.compat_m2p_mfn0
    entries = page.cast("Q")
    slots = xen_slot_range(view.levels, level, entries, compat) or range(0)
    for index, pte in enumerate(entries):
        if index in slots or not pte & abi.PTE_PRESENT:
            continue
        if level > 1 and pte & abi.PTE_PSE:
            return f"entry {index} ({pte:#018x}) maps a superpage, which cannot be migrated"
        mfn = abi.pte_frame(pte)
        if not view.in_pseudophys(mfn):
            return f"entry {index} ({pte:#018x}) names mfn {mfn:#x}, which is not in the guest's pseudo-physical map"
    return "the page changed while it was being normalised"


def normalised_tables(view: PvGuestView, pfns: list[int], levels: list[int], pages: list[memoryview]) -> memoryview:
    """The stream form of pagetable pages (one 4096-byte slice each); SaveError naming pfn and entry."""
    buffer = bytearray(len(pages) * abi.PAGE_SIZE)
    for k, page in enumerate(pages):
        buffer[k * abi.PAGE_SIZE:(k + 1) * abi.PAGE_SIZE] = page
    status = bytearray(len(pages))
    if kernels.normalise_pages(view.tables, buffer, levels, status):
        k = next(i for i, code in enumerate(status) if code != NORMALISE_OK)
        raise SaveError(f"cannot normalise the L{levels[k]} pagetable at pfn {pfns[k]:#x}: "
                        f"{_first_bad_entry(view, levels[k], pages[k])}", errno.ERANGE)
    return memoryview(buffer)


def stream_pages(view: PvGuestView, first_pfn: int, count: int):
    """Types and payloads of pfns first..first+count-1 as a fresh save emits them.

    Returns (types, payloads): one stream type nibble per pfn and the payload as buffers of whole pages
    in pfn order, one page per entry whose type carries data: runs of the guest's own frames, with
    normalised private copies for pagetables (`pages_of` splits them into pages).
    """
    codes, payloads = stream_codes(view, first_pfn, count)
    return [code >> abi.PFINFO_LTAB_SHIFT for code in codes], payloads


def stream_codes(view: PvGuestView, first_pfn: int, count: int):
    """`stream_pages` with the PFINFO code of each pfn (type nibble << 28) instead of its type nibble."""
    hv, domid = view.hv, view.domid
    gfns = view.gfns(first_pfn, count)
    codes = hypervisor_call(f"page-type query of pfns {first_pfn:#x}+{count}", hv.get_page_types, domid, gfns)
    present = set(codes)
    require_known(codes, present, first_pfn, "pfn")
    if present.isdisjoint(_DATALESS_CODES):
        data_index = range(count)
        data_gfns = gfns
    else:
        data_index = [i for i, code in enumerate(codes) if code not in _DATALESS_CODES]
        data_gfns = [gfns[i] for i in data_index]
    if not data_index:
        return codes, []
    runs = hypervisor_call("map page batch", hv.map_foreign_runs, domid, data_gfns)
    if sum(run.count for run in runs) != len(data_gfns):
        covered = {slot for run in runs for slot in range(run.first, run.first + run.count)}
        i = data_index[next(slot for slot in range(len(data_gfns)) if slot not in covered)]
        raise SaveError(f"cannot map pfn {first_pfn + i:#x} (mfn {gfns[i]:#x})", errno.EFAULT)
    if present.isdisjoint(_TABLE_CODES):
        return codes, [run.view for run in runs]
    table_slots = [slot for slot, i in enumerate(data_index) if codes[i] in _TABLE_CODES]
    pages = {slot: page for run in runs for slot, page in _table_pages(run, table_slots)}
    tables = normalised_tables(view, [first_pfn + data_index[slot] for slot in table_slots],
                               [codes[data_index[slot]] >> abi.PFINFO_LTAB_SHIFT & 0x7 for slot in table_slots],
                               [pages[slot] for slot in table_slots])
    normalised = {slot: tables[k << 12:(k + 1) << 12] for k, slot in enumerate(table_slots)}
    payloads = []
    for run in runs:
        start = 0  # page offset in the run of the plain pages not yet emitted
        for offset in range(run.count):
            page = normalised.get(run.first + offset)
            if page is not None:
                if offset > start:
                    payloads.append(run.view[start << 12:offset << 12])
                payloads.append(page)
                start = offset + 1
        if start < run.count:
            payloads.append(run.view[start << 12:])
    return codes, payloads


def _table_pages(run, table_slots: list[int]):
    """(slot, page view) of the pagetable slots (ascending) inside one mapped run."""
    low = bisect.bisect_left(table_slots, run.first)
    high = bisect.bisect_left(table_slots, run.first + run.count, low)
    for slot in table_slots[low:high]:
        offset = slot - run.first
        yield slot, run.view[offset << 12:(offset + 1) << 12]


def pages_of(payloads):
    """The 4096-byte pages of stream_pages' payload buffers, in order."""
    for buffer in payloads:
        for offset in range(0, len(buffer), abi.PAGE_SIZE):
            yield buffer[offset:offset + abi.PAGE_SIZE]


def vcpu_records(view: PvGuestView, vcpu_id: int) -> list:
    """The records of one online vcpu, in stream order: BASIC, then EXTENDED/XSAVE/MSRS when non-empty."""
    hv, domid = view.hv, view.domid
    context = hypervisor_call(f"get vcpu{vcpu_id} context", hv.get_vcpu_context, domid, vcpu_id)
    try:
        basic = view.normalised_vcpu(vcpu_id, context)
    except GuestStateError as exc:
        raise SaveError(str(exc), exc.errno) from exc
    records = [X86PvVcpuBasic(vcpu_id, basic.pack())]
    ext = hypervisor_call(f"get vcpu{vcpu_id} extended context", hv.get_ext_vcpu_context, domid, vcpu_id)
    ext_size = int.from_bytes(ext[_EXT_SIZE_OFFSET:_EXT_SIZE_OFFSET + 4], "little") if len(ext) >= 8 else 0
    if ext_size:  # the structure up to its own size field's value, leading vcpu and size words included
        records.append(X86PvVcpuExtended(vcpu_id, ext[:ext_size]))
    xsave = hypervisor_call(f"get vcpu{vcpu_id} xsave", hv.get_vcpu_xsave, domid, vcpu_id)
    if xsave.xfeature_mask and xsave.data:
        records.append(X86PvVcpuXsave(vcpu_id, xsave.data))
    msrs = hypervisor_call(f"get vcpu{vcpu_id} MSRs", hv.get_vcpu_msrs, domid, vcpu_id)
    if msrs:
        records.append(X86PvVcpuMsrs(vcpu_id, msrs))
    return records


class EngineSaver:
    """What the non-live PV and HVM savers (this module, v2.save_hvm) share: the domain, the writer,
    the record and page counts, and the call of the suspend callback."""

    def __init__(self, hv: Hypervisor, domid: int, writer: V2Writer, suspend: Callable[[], bool],
                 payload_fd: int | None) -> None:
        self.hv = hv
        self.domid = domid
        self.writer = writer
        self.suspend = suspend
        self.payload_fd = payload_fd
        self.records = 0
        self.pages = 0

    def _record(self, record) -> None:
        self.writer.record(record)
        self.records += 1

    def _raw_record(self, record_type: int, body: bytes) -> None:
        self.writer.write(encode_record(record_type, body))
        self.records += 1

    def _call_suspend(self) -> None:
        if not self.suspend():
            raise SaveError("the suspend callback failed", errno.EINVAL)


class _PvSaver(EngineSaver):

    def run(self) -> SaveResult:
        try:
            view = PvGuestView.open(self.hv, self.domid)
        except GuestStateError as exc:
            raise SaveError(str(exc), exc.errno) from exc
        log.info("save setup", domid=self.domid, width=view.width, max_pfn=view.max_pfn,
                 p2m="linear" if view.linear_p2m else "tree")
        version = self.hv.get_xen_version()
        self.writer.image_header(ImageHeader(version=STREAM_VERSION))
        self.writer.domain_header(DomainHeader(guest_type=C.DOMAIN_TYPE_X86_PV, xen_major=version.major,
                                               xen_minor=version.minor))
        self._record(X86PvInfo(guest_width=view.width, pt_levels=view.levels))
        for record_type, body in policy_records(self.hv, self.domid):
            self._raw_record(record_type, body)
        self._record(StaticDataEnd())
        self._record(X86PvP2mFrames(start_pfn=0, end_pfn=view.max_pfn, frames=view.p2m_pfns))

        self._suspend(view)
        self._send_memory(view)
        self._require_suspended(view)

        tsc = hypervisor_call("get TSC info", self.hv.get_tsc_info, self.domid)
        self._record(X86TscInfo(mode=tsc.mode, khz=tsc.khz, nsec=tsc.nsec, incarnation=tsc.incarnation))
        self._record(SharedInfo(bytes(view.shared_info)))
        for vcpu_id in range(view.info.max_vcpu_id + 1):
            if hypervisor_call(f"get vcpu{vcpu_id} info", self.hv.get_vcpu_online, self.domid, vcpu_id):
                for record in vcpu_records(view, vcpu_id):
                    self._record(record)
        self._record(End())
        self.writer.flush()
        return SaveResult(width=view.width, levels=view.levels, max_pfn=view.max_pfn, pages_written=self.pages,
                          records=self.records, bytes_written=self.writer.position)

    def _suspend(self, view: PvGuestView) -> None:
        self._call_suspend()
        self._require_suspended(view)

    def _require_suspended(self, view: PvGuestView) -> None:
        if not view.refresh_info().suspended:
            raise SaveError(f"domain {self.domid} is not shut down for suspend", errno.EINVAL)

    def _send_memory(self, view: PvGuestView) -> None:
        batch = abi.MAX_BATCH_SIZE
        for first in range(0, view.p2m_size, batch):
            count = min(batch, view.p2m_size - first)
            codes, payloads = stream_codes(view, first, count)
            head = page_data_head_codes(consecutive(first, count), codes)
            length = sum(len(buffer) for buffer in payloads)
            if self.payload_fd is None:
                self.writer.write(head, *payloads)
            else:  # head and pages in one writev, the pages straight from guest memory
                writev_all(self.payload_fd, [head, *payloads], len(head) + length)
                self.writer.payload_written(len(head) + length)
            self.records += 1
            self.pages += length >> 12


def page_data_head(first_pfn: int, types: list[int]) -> bytes:
    """Record header and body head of the PAGE_DATA record for pfns first_pfn.. with these type nibbles."""
    return page_data_head_of(consecutive(first_pfn, len(types)), types)


def page_data_head_of(pfns, types: list[int]) -> bytes:
    """Record header and body head of the PAGE_DATA record for these pfns and type nibbles (1024 at most).

    Equal to `V2Writer`'s encoding (a test holds them together); built by the batch kernel, because a
    per-entry Python check costs a fifth of a save.
    """
    return page_data_head_codes(pfns, array("I", [t << abi.PFINFO_LTAB_SHIFT for t in types]))


def page_data_head_codes(pfns, codes) -> bytes:
    """`page_data_head_of` from the PFINFO codes (type nibble << 28) the page-type query answered."""
    count = len(codes)
    words = array("Q", bytes(8 * count))
    pages = kernels.pack_page_words(array("Q", pfns), codes, words)
    return _PAGE_DATA_HEAD.pack(C.REC_PAGE_DATA, 8 + 8 * count + pages * abi.PAGE_SIZE, count, 0) + words.tobytes()


def writev_all(fd: int, buffers: list, total: int) -> None:
    """Write the buffers (`total` bytes) in order; one writev for up to IOV_MAX buffers written whole."""
    pending = buffers
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        if written == total:
            return
        total -= written
        done = 0
        while written >= len(pending[done]):
            written -= len(pending[done])
            done += 1
        pending = pending[done:]
        if written:
            pending[0] = memoryview(pending[0])[written:]


def save_pv(hv: Hypervisor, domid: int, writer: V2Writer, suspend: Callable[[], bool], *,
            payload_fd: int | None = None) -> SaveResult:
    """Save PV domain `domid` non-live into `writer` (spec 3.3); `suspend()` must suspend it and return True.

    With `payload_fd` (the fd the writer writes to), page payloads go out with writev straight from
    guest memory instead of through the writer.
    """
    with shadow_off_afterwards(hv, domid, log, "shadow off failed during save cleanup"):
        return _PvSaver(hv, domid, writer, suspend, payload_fd).run()
