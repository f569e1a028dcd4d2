"""The legacy (v1) save engine: a simulated PV guest saved the way Xen 4.5's xc_domain_save did, non-live.

    result = save_pv_legacy(hv, domid, sink, toolstack_width=64, suspend=callback)

writes, through `LegacyWriter`, exactly what a 4.5 libxl toolstack of that word size wrote for a
non-live PV save (spec legacy-v1-stream 2.1-2.5, 3): p2m_size, the extended-info block (raw vcpu0
context, "extv", "xcnt" when the host has XSAVE), the P2M frame list, TSC_INFO, one pass of page
batches over the mapped pfns with pagetables canonicalised by the 4.5 rules (2.4.3), VCPU_INFO, the
libxl TOOLSTACK blob, LAST_CHECKPOINT, the body terminator and the PV tail (unmapped pfns, per-vcpu
basic / 128-byte extended / xsave records, shared_info with the frame-list-list reference zeroed).

Deviation, on purpose: Xen 4.5 refused to save a PV guest with MSR state (the v1 format has no place
for it). With ``refuse_msrs=False`` (the default) the MSRs are dropped with a warning instead, so
guests from the seeded builder can be saved; ``refuse_msrs=True`` is the 4.5 behaviour.

Failures raise `LegacySaveError` (one line); nothing after the failure is written.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Callable

import attrs

from xenstream.hv import abi
from xenstream.hv.guestview import GuestStateError, PvGuestView, hypervisor_call
from xenstream.hv.interface import Hypervisor
from xenstream.hv.lazylog import get_logger
from xenstream.legacy import constants as c
from xenstream.legacy import events as ev
from xenstream.legacy.writer import LegacyWriter

log = get_logger(__name__)

TOOLSTACK_WIDTHS = (32, 64)
_LIBXL_TOOLSTACK_PV = struct.pack("<II", 1, 0)  # version 1, no qemu physmap entries
_ENTRY_FORMAT = {32: "I", 64: "Q"}
# Frame field of a PTE as the 4.5 saver masked it: 40 bits for 64-bit guests, 32 for PAE guests.
_MFN_MASK = {abi.WIDTH_64: (1 << 40) - 1, abi.WIDTH_32: (1 << 32) - 1}
_PAE_L3_CLEARED = abi.PTE_USER | abi.PTE_RW | abi.PTE_ACCESSED


class LegacySaveError(Exception):
    """The guest could not be saved as a v1 stream."""


@attrs.frozen
class LegacySaveResult:
    toolstack_width: int
    guest_width: int
    p2m_size: int
    pages_written: int
    unmapped_pfns: int


def canonicalise_pagetable(view: PvGuestView, page: memoryview, level: int, pfn: int,
                           toolstack_width: int, m2p_mfn0: int | None, live: bool = False) -> bytes:
    """A pagetable page in the 4.5 canonical form (spec legacy 2.4.3); LegacySaveError on a fatal race.

    A race (an entry naming a frame outside the guest) is fatal only when not `live`: a live iteration
    sends the entry with frame 0, as 4.5 did, and relies on the page being dirtied again.
    """
    entries = page.cast("Q").tolist()
    mfn_mask = _MFN_MASK[view.width]
    frame_mask = mfn_mask << abi.PAGE_SHIFT
    xen_start = xen_end = abi.PTES_PER_PAGE
    if view.levels == 3 and level == 3:
        xen_start = abi.PAE_L3_GUEST_SLOTS
    elif view.levels == 3 and level == 2:
        if m2p_mfn0 is not None and (entries[abi.PAE_L2_XEN_FIRST] >> abi.PAGE_SHIFT) & mfn_mask == m2p_mfn0:
            xen_start = abi.PAE_L2_XEN_FIRST
    elif view.levels == 4 and level == 4:
        xen_start, xen_end = abi.L4_XEN_SLOTS_64.start, abi.L4_XEN_SLOTS_64.stop
    # 64-bit tools cannot spot Xen's compat mappings in a PAE guest's L2: 4.5 quietly zapped them to frame 0.
    quiet_zap = level == 2 and toolstack_width // 8 > view.width
    m2p = view.m2p
    in_pseudophys = view.in_pseudophys
    out = array.array("Q", entries)
    for i, pte in enumerate(entries):
        if xen_start <= i < xen_end:
            pte = 0
        if pte & abi.PTE_PRESENT:
            mfn = (pte >> abi.PAGE_SHIFT) & mfn_mask
            if in_pseudophys(mfn):
                frame = m2p[mfn]
            elif quiet_zap or live:
                frame = 0
            else:
                raise LegacySaveError(f"fatal pagetable race: L{level} table at pfn {pfn:#x}, entry {i} "
                                      f"({pte:#018x}) maps mfn {mfn:#x}, which is not the guest's")
            pte = (pte & ~frame_mask) | (frame << abi.PAGE_SHIFT)
            if view.levels == 3 and level == 3:
                pte &= ~_PAE_L3_CLEARED
        out[i] = pte
    return out.tobytes()


class LegacySaver:
    """What the v1 PV and HVM savers (this module, legacy.save_hvm) share: the domain, the writer and its
    toolstack width, the page count, and the call of the suspend callback."""

    def __init__(self, hv: Hypervisor, domid: int, writer: LegacyWriter, toolstack_width: int,
                 suspend: Callable[[], bool]) -> None:
        self.hv = hv
        self.domid = domid
        self.writer = writer
        self.width = toolstack_width
        self.suspend = suspend
        self.pages = 0

    def _call_suspend(self) -> None:
        if not self.suspend():
            raise LegacySaveError("the suspend callback failed")


class _LegacyPvSaver(LegacySaver):
    live = False  # the live saver (legacy.save_live) tolerates pagetable races

    def __init__(self, hv: Hypervisor, domid: int, writer: LegacyWriter, toolstack_width: int,
                 suspend: Callable[[], bool], refuse_msrs: bool) -> None:
        super().__init__(hv, domid, writer, toolstack_width, suspend)
        self.refuse_msrs = refuse_msrs

    def run(self) -> LegacySaveResult:
        hv, domid = self.hv, self.domid
        self._call_suspend()
        try:
            view = PvGuestView.open(hv, domid)
        except GuestStateError as exc:
            raise LegacySaveError(str(exc)) from exc
        if not view.info.suspended:
            raise LegacySaveError(f"domain {domid} is not shut down for suspend")
        p2m_size = self._p2m_size(view)
        online = self._online_vcpus(view)
        self._write_head(view, p2m_size)
        tsc = hypervisor_call("TSC info", hv.get_tsc_info, domid)
        self.writer.write(ev.TscInfo(tsc_mode=tsc.mode, elapsed_nsec=tsc.nsec, gtsc_khz=tsc.khz,
                                     incarnation=tsc.incarnation))

        unmapped = self._send_pages(view, p2m_size)
        self._write_tail(view, online, unmapped)
        return LegacySaveResult(toolstack_width=self.width, guest_width=view.width, p2m_size=p2m_size,
                                pages_written=self.pages, unmapped_pfns=len(unmapped))

    def _p2m_size(self, view: PvGuestView) -> int:
        if view.linear_p2m:
            raise LegacySaveError("the guest publishes only a linear P2M list; Xen 4.5 savers need the P2M tree")
        p2m_size = hypervisor_call("maximum gpfn", self.hv.get_max_gpfn, self.domid) + 1
        if p2m_size > c.MAX_P2M_SIZE:
            raise LegacySaveError(f"p2m_size {p2m_size:#x} does not fit the 28-bit pfn field")
        if p2m_size > view.p2m_size:
            raise LegacySaveError(f"p2m_size {p2m_size:#x} exceeds the {view.p2m_size:#x} pfns the guest P2M covers")
        return p2m_size

    def _online_vcpus(self, view: PvGuestView) -> list[int]:
        online = [v for v in range(view.info.max_vcpu_id + 1)
                  if hypervisor_call(f"vcpu{v} info", self.hv.get_vcpu_online, self.domid, v)]
        if 0 not in online:
            raise LegacySaveError("vcpu0 is offline")
        return online

    def _write_head(self, view: PvGuestView, p2m_size: int) -> None:
        """p2m_size, the extended-info block and the P2M frame list."""
        hv, domid, write = self.hv, self.domid, self.writer.write
        xsave0 = hypervisor_call("vcpu0 xsave", hv.get_vcpu_xsave, domid, 0)
        write(ev.P2mSize(p2m_size))
        vcpu0 = hypervisor_call("vcpu0 context", hv.get_vcpu_context, domid, 0)
        blocks = [ev.ExtendedInfoBlock(c.EXT_BLOCK_VCPU, vcpu0.pack()), ev.ExtendedInfoBlock(c.EXT_BLOCK_EXTV, b"")]
        if xsave0.xfeature_mask:
            xcnt = len(xsave0.data) + c.XSAVE_HEADER_SIZE
            blocks.append(ev.ExtendedInfoBlock(c.EXT_BLOCK_XCNT, struct.pack("<I", xcnt)))
        write(ev.ExtendedInfo(total=sum(8 + len(b.data) for b in blocks), blocks=tuple(blocks)))
        frames = -(-p2m_size // view.fpp)
        write(ev.P2mFrames(tuple(view.p2m_pfns[:frames])))

    def _write_tail(self, view: PvGuestView, online: list[int], unmapped: list[int]) -> None:
        """VCPU_INFO, TOOLSTACK, LAST_CHECKPOINT, the body terminator and the PV tail."""
        write = self.writer.write
        words = view.info.max_vcpu_id // 64 + 1
        vcpumap = [0] * words
        for vcpu in online:
            vcpumap[vcpu // 64] |= 1 << (vcpu % 64)
        write(ev.VcpuInfo(max_vcpu_id=view.info.max_vcpu_id, vcpumap=tuple(vcpumap)))
        write(ev.Toolstack(data=_LIBXL_TOOLSTACK_PV))
        write(ev.LastCheckpoint())
        write(ev.EndOfBody())
        write(ev.UnmappedPfns(tuple(unmapped)))
        for vcpu in online:
            self._write_vcpu(view, vcpu)
        shared = bytearray(view.shared_info)
        layout = abi.SHARED_INFO_LAYOUTS[view.width]
        struct.pack_into(layout.word, shared, layout.pfn_to_mfn_frame_list_list, 0)
        write(ev.SharedInfo(bytes(shared)))

    def _send_pages(self, view: PvGuestView, p2m_size: int) -> list[int]:
        """One pass over pfns 0..p2m_size-1, 1024 mapped pfns per batch; returns the unmapped pfns."""
        m2p_mfn0 = view.hv.compat_m2p_first_mfn() if self.width == 32 and view.levels == 3 else None
        unmapped: list[int] = []
        batch: list[tuple[int, int]] = []
        step = 1 << 16
        for first in range(0, p2m_size, step):
            for offset, mfn in enumerate(view.gfns(first, min(step, p2m_size - first))):
                if mfn == abi.INVALID_MFN:
                    unmapped.append(first + offset)
                    continue
                batch.append((first + offset, mfn))
                if len(batch) == c.MAX_BATCH_SIZE:
                    self._send_batch(view, batch, m2p_mfn0)
                    batch = []
        if batch:
            self._send_batch(view, batch, m2p_mfn0)
        return unmapped

    def _send_batch(self, view: PvGuestView, batch: list[tuple[int, int]], m2p_mfn0: int | None) -> None:
        hv, domid = self.hv, self.domid
        mfns = [mfn for _, mfn in batch]
        pages = hypervisor_call("map page batch", hv.map_foreign, domid, mfns)
        codes = hypervisor_call("page-type query", hv.get_page_types, domid, mfns)
        entries = array.array(_ENTRY_FORMAT[self.width])
        payload: list = []
        sent = 0
        for (pfn, _), page, code in zip(batch, pages, codes):
            page_type = code >> abi.PFINFO_LTAB_SHIFT
            if page_type == abi.PAGETYPE_BROKEN:
                entries.append(code | pfn)
                sent += 1
                continue
            if page is None or page_type == abi.PAGETYPE_XTAB:
                entries.append(c.XTAB_ENTRY)
                continue
            if code & ~abi.PFINFO_LTAB_MASK or page_type not in abi.KNOWN_PAGETYPES:
                raise LegacySaveError(f"unknown page type {code:#x} for pfn {pfn:#x}")
            entries.append(code | pfn)
            sent += 1
            level = abi.pagetable_level(page_type)
            if level:
                payload.append(canonicalise_pagetable(view, page, level, pfn, self.width, m2p_mfn0, self.live))
            elif abi.pagetype_has_data(page_type):
                payload.append(page)
        if not sent:
            return  # 4.5 drops a batch with no valid page
        self.writer.write(ev.PageBatch(entries=entries, payload=memoryview(b"".join(payload))))
        self.pages += len(payload)

    def _write_vcpu(self, view: PvGuestView, vcpu: int) -> None:
        hv, domid, write = self.hv, self.domid, self.writer.write
        context = hypervisor_call(f"vcpu{vcpu} context", hv.get_vcpu_context, domid, vcpu)
        try:
            basic = view.normalised_vcpu(vcpu, context)
        except GuestStateError as exc:
            raise LegacySaveError(str(exc)) from exc
        write(ev.VcpuBasic(vcpu_id=vcpu, data=basic.pack()))
        ext = hypervisor_call(f"vcpu{vcpu} extended context", hv.get_ext_vcpu_context, domid, vcpu)
        write(ev.VcpuExtended(vcpu_id=vcpu, data=bytes(ext[:c.EXTENDED_CONTEXT_SIZE]).ljust(c.EXTENDED_CONTEXT_SIZE, b"\0")))
        if hypervisor_call(f"vcpu{vcpu} MSRs", hv.get_vcpu_msrs, domid, vcpu):
            if self.refuse_msrs:
                raise LegacySaveError(f"vcpu{vcpu} uses MSRs, which a v1 stream cannot carry")
            log.warning("dropping MSR state the v1 format cannot carry", vcpu=vcpu)
        xsave = hypervisor_call(f"vcpu{vcpu} xsave", hv.get_vcpu_xsave, domid, vcpu)
        if xsave.xfeature_mask:
            write(ev.VcpuXsave(vcpu_id=vcpu, xfeature_mask=xsave.xfeature_mask, size=len(xsave.data),
                               data=bytes(xsave.data)))


def save_pv_legacy(hv: Hypervisor, domid: int, sink, *, toolstack_width: int = 64,
                   suspend: Callable[[], bool], refuse_msrs: bool = False) -> LegacySaveResult:
    """Save PV domain `domid` as a non-live v1 stream written to `sink` (anything with write())."""
    writer = legacy_writer(sink, toolstack_width)
    return _LegacyPvSaver(hv, domid, writer, toolstack_width, suspend, refuse_msrs).run()


def legacy_writer(sink, toolstack_width: int) -> LegacyWriter:
    """The v1 writer for a save by a toolstack of this word size (32 or 64; ValueError otherwise)."""
    if toolstack_width not in TOOLSTACK_WIDTHS:
        raise ValueError(f"toolstack width must be 32 or 64, not {toolstack_width}")
    return LegacyWriter(sink, width=toolstack_width)
