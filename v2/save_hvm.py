"""The native v2 save engine for HVM guests, non-live (spec save-restore-engines 6.2).

    result = save_hvm(hv, domid, writer, suspend=callback)

writes the record sequence of Xen's current HVM saver: image and domain headers (v3, x86 HVM), the CPU
policy records when non-empty, STATIC_DATA_END, then (after `suspend()` and a check that the domain is
shut down for suspend) one PAGE_DATA record per 1024 gfns of 0..max_gpfn with the pages raw (nothing is
normalised: Xen owns the p2m; holes and special frames go out as XTAB entries without data),
X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS (the non-zero migrated params in Xen's order; omitted when
all are zero) and END.

`save_hvm_libxl` wraps that in the libxl layer the way libxl does for an HVM guest: libxl header,
LIBXC_CONTEXT, the libxc stream, EMULATOR_XENSTORE_DATA (when the device model has keys),
EMULATOR_CONTEXT and the libxl END.

Failures raise `SaveError`; no END is written then. Log-dirty is switched off and qemu's log-dirty
callback told "off" whatever happens (spec 6.2 step 5).
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from array import array
from collections.abc import Callable

import attrs

from xenstream.hv import abi, hvm_params
from xenstream.hv.emulator import EmulatorState
from xenstream.hv.guestview import hypervisor_call, shadow_off_afterwards
from xenstream.hv.interface import Hypervisor
from xenstream.hv.lazylog import get_logger
from xenstream.hv.u64runs import consecutive
from xenstream.v2 import constants as C
from xenstream.v2.libxl_records import EmulatorContext, EmulatorXenstoreData, LibxcContext, LibxlEnd
from xenstream.v2.records import DomainHeader, End, HvmContext, HvmParams, ImageHeader, StaticDataEnd, X86TscInfo
from xenstream.v2.save import (
    _DATALESS_CODES,
    STREAM_VERSION,
    EngineSaver,
    SaveError,
    policy_records,
    require_known,
)

log = get_logger(__name__)

_TYPE_SHIFT = C.PFN_TYPE_SHIFT
_NOTAB = abi.pfinfo_from_pagetype(abi.PAGETYPE_NOTAB)
_XTAB = abi.pfinfo_from_pagetype(abi.PAGETYPE_XTAB)
_XTAB_WORD = abi.PAGETYPE_XTAB << _TYPE_SHIFT
_IOV_MAX = 1024
_PAGE_DATA_HEAD = struct.Struct("<IIII")  # record type, length, count, reserved
_UNIFORM = {code: array("I", [code] * abi.MAX_BATCH_SIZE).tobytes() for code in (_NOTAB, _XTAB)}


@attrs.frozen
class HvmSaveResult:
    p2m_size: int
    pages_written: int
    records: int
    bytes_written: int
    params: tuple[tuple[int, int], ...]
    context_length: int


def migrated_params(hv: Hypervisor, domid: int) -> tuple[tuple[int, int], ...]:
    """(index, value) of every non-zero migrated param, in the order Xen's saver writes them."""
    values = ((index, hypervisor_call(f"get HVM param {hvm_params.name(index)}", hv.get_hvm_param, domid, index))
              for index in hvm_params.MIGRATED)
    return tuple((index, value) for index, value in values if value)


def page_data_head(first: int, codes, present: set[int]) -> bytes:
    """Record header and pfn words of PAGE_DATA for gfns first..first+len(codes)-1 of the given page-type
    codes (`present`: the set of them)."""
    count = len(codes)
    if present == {_NOTAB}:
        words, data_pages = consecutive(first, count), count
    elif present == {_XTAB}:  # a hole: the type bits sit above every pfn bit, so the words are a range too
        words, data_pages = consecutive(first | _XTAB_WORD, count), 0
    else:
        words = consecutive(first, count)
        for i, code in enumerate(codes):
            if code:
                words[i] |= (code >> abi.PFINFO_LTAB_SHIFT) << _TYPE_SHIFT
        data_pages = count - sum(codes.count(code) for code in present & _DATALESS_CODES)
    if sys.byteorder != "little":
        words.byteswap()
    return _PAGE_DATA_HEAD.pack(C.REC_PAGE_DATA, 8 + 8 * count + abi.PAGE_SIZE * data_pages, count, 0) + words.tobytes()


def code_set(codes) -> set[int]:
    """The distinct codes of a page-type answer; a batch of nothing but RAM or nothing but hole is
    recognised by one comparison of its bytes (no int per gfn)."""
    raw = (codes if isinstance(codes, array) and codes.itemsize == 4 else array("I", codes)).tobytes()
    if raw == _UNIFORM[_NOTAB][:len(raw)]:
        return {_NOTAB}
    if raw == _UNIFORM[_XTAB][:len(raw)]:
        return {_XTAB}
    return set(codes)


class _HvmSaver(EngineSaver):
    def __init__(self, hv: Hypervisor, domid: int, writer, suspend: Callable[[], bool],
                 qemu_logdirty: Callable[[bool], None] | None, payload_fd: int | None) -> None:
        super().__init__(hv, domid, writer, suspend, payload_fd)
        self.qemu_logdirty = qemu_logdirty

    def run(self) -> HvmSaveResult:
        hv, domid = self.hv, self.domid
        info = hypervisor_call("get domain info", hv.get_domain_info, domid)
        if not info.is_hvm:
            raise SaveError(f"domain {domid} is PV; this engine saves HVM guests")
        p2m_size = hypervisor_call("maximum gpfn", hv.get_max_gpfn, domid) + 1
        log.info("HVM save setup", domid=domid, p2m_size=p2m_size)
        if self.qemu_logdirty is not None:
            self.qemu_logdirty(True)
        version = hv.get_xen_version()
        start = self.writer.position
        self.writer.image_header(ImageHeader(version=STREAM_VERSION))
        self.writer.domain_header(DomainHeader(guest_type=C.DOMAIN_TYPE_X86_HVM, xen_major=version.major,
                                               xen_minor=version.minor))
        for record_type, body in policy_records(hv, domid):
            self._raw_record(record_type, body)
        self._record(StaticDataEnd())

        self._call_suspend()
        self._require_suspended()
        self._send_memory(p2m_size)
        self._require_suspended()

        tsc = hypervisor_call("get TSC info", hv.get_tsc_info, domid)
        self._record(X86TscInfo(mode=tsc.mode, khz=tsc.khz, nsec=tsc.nsec, incarnation=tsc.incarnation))
        context = hypervisor_call("get HVM context", hv.get_hvm_context, domid)
        if not context:
            raise SaveError(f"domain {domid} has an empty HVM context")
        self._record(HvmContext(context))
        params = migrated_params(hv, domid)
        if params:
            self._record(HvmParams(params))
        self._record(End())
        self.writer.flush()
        return HvmSaveResult(p2m_size=p2m_size, pages_written=self.pages, records=self.records,
                             bytes_written=self.writer.position - start, params=params, context_length=len(context))

    def _require_suspended(self) -> None:
        info = hypervisor_call("get domain info", self.hv.get_domain_info, self.domid)
        if not info.suspended:
            raise SaveError(f"domain {self.domid} is not shut down for suspend")

    def _send_memory(self, p2m_size: int) -> None:
        hv, domid = self.hv, self.domid
        for first in range(0, p2m_size, abi.MAX_BATCH_SIZE):
            gfns = range(first, min(first + abi.MAX_BATCH_SIZE, p2m_size))
            codes = hypervisor_call(f"page-type query of gfns {first:#x}+{len(gfns)}", hv.get_page_types, domid, gfns)
            present = code_set(codes)
            require_known(codes, present, first, "gfn")
            head = page_data_head(first, codes, present)
            if present <= _DATALESS_CODES:
                self.writer.write(head)
                self.records += 1
                continue
            if present.isdisjoint(_DATALESS_CODES):
                data_gfns = gfns
            else:
                data_gfns = [g for g, code in zip(gfns, codes) if code not in _DATALESS_CODES]
            payloads = self._map(data_gfns)
            if self.payload_fd is None:
                self.writer.write(head, *payloads)
            else:  # the head through the writer, the pages straight from guest memory
                self.writer.write(head)
                _writev_all(self.payload_fd, payloads)
                self.writer.payload_written(len(data_gfns) * abi.PAGE_SIZE)
            self.records += 1
            self.pages += len(data_gfns)

    def _map(self, gfns) -> list[memoryview]:
        """Views of the gfns' pages in order, one per run of machine-adjacent frames."""
        runs = hypervisor_call("map page batch", self.hv.map_foreign_runs, self.domid, gfns)
        if sum(run.count for run in runs) != len(gfns):
            covered = {k for run in runs for k in range(run.first, run.first + run.count)}
            missing = next(k for k in range(len(gfns)) if k not in covered)
            raise SaveError(f"cannot map gfn {gfns[missing]:#x}", errno.EFAULT)
        return [run.view for run in runs]


def _writev_all(fd: int, buffers: list[memoryview]) -> None:
    """Write the buffers in order with as few writev calls as IOV_MAX allows."""
    start = 0
    while start < len(buffers):
        written = os.writev(fd, buffers[start:start + _IOV_MAX])
        while written:
            size = buffers[start].nbytes
            if written < size:
                buffers[start] = buffers[start][written:]
                break
            written -= size
            start += 1


def save_hvm(hv: Hypervisor, domid: int, writer, suspend: Callable[[], bool], *,
             qemu_logdirty: Callable[[bool], None] | None = None, payload_fd: int | None = None) -> HvmSaveResult:
    """Save HVM domain `domid` non-live into `writer` (a V2Writer); `suspend()` must suspend it and return True.

    With `payload_fd` (the fd the writer writes to), page payloads go out with writev straight from
    guest memory instead of through the writer."""
    try:
        with shadow_off_afterwards(hv, domid, log, "shadow off failed during save cleanup"):
            return _HvmSaver(hv, domid, writer, suspend, qemu_logdirty, payload_fd).run()
    finally:  # after log-dirty is off, as before
        if qemu_logdirty is not None:
            qemu_logdirty(False)


def save_hvm_libxl(hv: Hypervisor, domid: int, writer, suspend: Callable[[], bool],
                   emulator: Callable[[], EmulatorState], *, emulator_id: int = C.EMULATOR_QEMU_UPSTREAM,
                   qemu_logdirty: Callable[[bool], None] | None = None, payload_fd: int | None = None) -> HvmSaveResult:
    """The libxl stream of an HVM save; `emulator()` is asked for the device model's state once the
    domain is saved (libxl saves qemu after the guest is suspended)."""
    writer.libxl_header()
    writer.libxl_record(LibxcContext())
    result = save_hvm(hv, domid, writer, suspend, qemu_logdirty=qemu_logdirty, payload_fd=payload_fd)
    state = emulator()
    pairs = state.xenstore_pairs()
    if pairs:
        writer.libxl_record(EmulatorXenstoreData.from_pairs(pairs, emulator_id=emulator_id))
    writer.libxl_record(EmulatorContext(emulator_id=emulator_id, index=0, data=state.context))
    writer.libxl_record(LibxlEnd())
    writer.flush()
    return result
