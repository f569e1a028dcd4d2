"""Build typical, structurally valid v2 streams from a few parameters, for tests and benchmarks.

    write_stream(sink, guest="pv"|"hvm", pages=256, *, width=8, vcpus=1, version=3,
                 wrap="libxc"|"libxl"|"xl", checkpoints=0, batch=1024, seed=0, xenstore=True) -> bytes written
    stream_bytes(**same keyword arguments) -> bytes

``sink`` is an fd or a binary file object (see ``V2Writer``). Page contents are deterministic and differ
from page to page (a pool of 257 pseudo-random pages indexed by pfn, shifted per checkpoint), written from
shared buffers so a 1 GiB stream takes seconds. PV streams are laid out the way Xen's restorer expects
them at END: a pinned top-level page table at pfn 1 referenced by vcpu 0's cr3 (tables hold no present
entries), start_info at pfn 5 in vcpu 0's rdx/edx, p2m frames from pfn 6 on, all NOTAB. HVM streams have an
XTAB hole at pfns 0xA0-0xBF (two pfns in the middle for small guests), an HVM context blob with a HEADER entry and one CPU entry
per vcpu, and parameters pointing into guest memory.

``checkpoints=n`` (n >= 1) writes a Remus-style stream: n checkpoints, each ending in CHECKPOINT (libxl:
followed by the emulator records and CHECKPOINT_END), the later ones re-sending a few dirty pages; like
Xen, no END is written, so readers finish with ``EndOfStream(complete=False)``. ``xenstore=False`` leaves
out the HVM EMULATOR_XENSTORE_DATA record (Xen 4.17's verifier rejects every non-empty one under Python 3,
spec A20).
"""

from __future__ import annotations

import io
import random
import struct

from xenstream.hv.abi import (
    PAGE_SIZE,
    PAGETYPE_L1TAB,
    PAGETYPE_L2TAB,
    PAGETYPE_L3TAB,
    PAGETYPE_L4TAB,
    PAGETYPE_LPINTAB,
    PAGETYPE_NOTAB,
    PAGETYPE_XTAB,
)
from xenstream.v2 import constants as C
from xenstream.v2.libxl_records import (
    CheckpointEnd,
    EmulatorContext,
    EmulatorXenstoreData,
    LibxcContext,
    LibxlEnd,
    LibxlHeader,
)
from xenstream.v2.records import (
    Checkpoint,
    CpuidLeaf,
    DomainHeader,
    End,
    HvmContext,
    HvmParams,
    ImageHeader,
    MsrEntry,
    SharedInfo,
    StaticDataEnd,
    X86CpuidPolicy,
    X86MsrPolicy,
    X86PvInfo,
    X86PvP2mFrames,
    X86PvVcpuBasic,
    X86PvVcpuExtended,
    X86PvVcpuMsrs,
    X86PvVcpuXsave,
    X86TscInfo,
)
from xenstream.v2.writer import V2Writer
from xenstream.v2.xl_header import XlHeader

POOL_PAGES = 257
PV_TOP_TABLE_PFN = 1
PV_START_INFO_PFN = 5
PV_P2M_FIRST_PFN = 6
HVM_HOLE = range(0xA0, 0xC0)
DIRTY_PAGES_PER_CHECKPOINT = 64

_ZERO_PAGE = bytes(PAGE_SIZE)
_PHYSMAP = [
    (b"physmap/f0000000/start_addr", b"f0000000"),
    (b"physmap/f0000000/size", b"800000"),
    (b"physmap/f0000000/name", b"vga.vram"),
]


class _PagePool:
    def __init__(self, seed: int):
        self._data = random.Random(seed).randbytes(POOL_PAGES * PAGE_SIZE)
        view = memoryview(self._data)
        self.pages = [view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(POOL_PAGES)]

    def page(self, pfn: int, generation: int):
        return self.pages[(pfn + 31 * generation) % POOL_PAGES]


class _Layout:
    """Which pfns exist, their types, and the guest facts the end-of-checkpoint records refer to."""

    def __init__(self, guest: str, pages: int, width: int, vcpus: int):
        self.guest = guest
        self.pages = pages
        self.width = width
        self.vcpus = vcpus
        self.types: dict[int, int] = {}
        if guest == "pv":
            levels = 4 if width == 8 else 3
            self.levels = levels
            top = (PAGETYPE_L4TAB if levels == 4 else PAGETYPE_L3TAB) | PAGETYPE_LPINTAB
            tables = [top, PAGETYPE_L3TAB, PAGETYPE_L2TAB, PAGETYPE_L1TAB] if levels == 4 else [top, PAGETYPE_L2TAB, PAGETYPE_L1TAB]
            for i, page_type in enumerate(tables):
                self.types[PV_TOP_TABLE_PFN + i] = page_type
            self.max_pfn = pages - 1
            self.p2m_frames = X86PvP2mFrames.frame_count(0, self.max_pfn, width)
            if PV_P2M_FIRST_PFN + self.p2m_frames > pages:
                raise ValueError(f"a PV stream needs at least {PV_P2M_FIRST_PFN + self.p2m_frames} pages")
            self.first_free_pfn = PV_P2M_FIRST_PFN + self.p2m_frames
        else:
            if pages < 8:
                raise ValueError("an HVM stream needs at least 8 pages")
            hole = HVM_HOLE if pages > HVM_HOLE.stop + 8 else range(pages // 2, pages // 2 + 2)
            for pfn in hole:
                self.types[pfn] = PAGETYPE_XTAB
            self.first_free_pfn = hole.stop

    def type_of(self, pfn: int) -> int:
        return self.types.get(pfn, PAGETYPE_NOTAB)

    def dirty_pfns(self, generation: int) -> list[int]:
        span = self.pages - self.first_free_pfn
        count = min(DIRTY_PAGES_PER_CHECKPOINT, span)
        start = self.first_free_pfn + (generation * 13) % max(1, span - count + 1)
        return [start + i for i in range(count) if self.type_of(start + i) == PAGETYPE_NOTAB]


def _vcpu_basic(layout: _Layout, vcpu: int) -> bytes:
    ctx = bytearray(C.VCPU_CONTEXT_SIZE_64 if layout.width == 8 else C.VCPU_CONTEXT_SIZE_32)
    pfn = PV_TOP_TABLE_PFN
    if layout.width == 8:
        struct.pack_into("<Q", ctx, 5008, pfn << 12)  # ctrlreg[3]
        if vcpu == 0:
            struct.pack_into("<Q", ctx, 616, PV_START_INFO_PFN)  # rdx
    else:
        struct.pack_into("<I", ctx, 2728, ((pfn << 12) | (pfn >> 20)) & 0xFFFFFFFF)  # PAE extended cr3
        if vcpu == 0:
            struct.pack_into("<I", ctx, 524, PV_START_INFO_PFN)  # edx
    return bytes(ctx)


def _vcpu_extended(vcpu: int) -> bytes:
    return struct.pack("<II", vcpu, 64) + bytes(56)


def _vcpu_xsave() -> bytes:
    return struct.pack("<QQ", 0x7, 0x7) + bytes(576)


def _hvm_context(vcpus: int) -> bytes:
    entries = [struct.pack("<HHI", 1, 0, 24) + struct.pack("<IIQII", 0x54381286, 1, 0, 0x000306C3, 2000000)]
    for vcpu in range(vcpus):
        entries.append(struct.pack("<HHI", 2, vcpu, 1024) + bytes([vcpu]) * 1024)
    entries.append(struct.pack("<HHI", 0, 0, 0))
    return b"".join(entries)


def _shared_info(generation: int) -> bytes:
    return (struct.pack("<Q", generation) + bytes(range(256)) * 16)[:PAGE_SIZE]


class _StreamWriter:
    def __init__(self, sink, guest, pages, width, vcpus, version, wrap, checkpoints, batch, seed, xenstore):
        if guest not in ("pv", "hvm"):
            raise ValueError("guest must be 'pv' or 'hvm'")
        if wrap not in ("libxc", "libxl", "xl"):
            raise ValueError("wrap must be 'libxc', 'libxl' or 'xl'")
        if width not in (4, 8):
            raise ValueError("width must be 4 or 8")
        if not 1 <= batch <= C.MAX_BATCH_SIZE:
            raise ValueError(f"batch must be 1..{C.MAX_BATCH_SIZE}")
        self.w = V2Writer(sink)
        self.layout = _Layout(guest, pages, width, vcpus)
        self.pool = _PagePool(seed)
        self.guest, self.version, self.wrap = guest, version, wrap
        self.checkpoints, self.batch, self.xenstore = checkpoints, batch, xenstore

    def run(self) -> int:
        w = self.w
        if self.wrap == "xl":
            w.xl_header(XlHeader.with_config(b'{"c_info": {"type": "%s", "name": "synth"}}\0' % self.guest.encode()))
        if self.wrap != "libxc":
            w.libxl_header(LibxlHeader())
            w.libxl_record(LibxcContext())
        w.image_header(ImageHeader(version=self.version))
        w.domain_header(DomainHeader(guest_type=C.DOMAIN_TYPE_X86_PV if self.guest == "pv" else C.DOMAIN_TYPE_X86_HVM, xen_major=4, xen_minor=17))
        self._static()
        self._memory(range(self.layout.pages), generation=0)
        if not self.checkpoints:
            self._end_of_checkpoint(0)
            w.record(End())
            if self.wrap != "libxc":
                self._emulator_records()
                w.libxl_record(LibxlEnd())
            return w.position
        for generation in range(self.checkpoints):
            if generation:
                self._memory(self.layout.dirty_pfns(generation), generation)
            self._end_of_checkpoint(generation)
            w.record(Checkpoint())
            if self.wrap != "libxc":
                self._emulator_records()
                w.libxl_record(CheckpointEnd())
        return w.position

    def _static(self):
        w, layout = self.w, self.layout
        if self.guest == "pv":
            w.record(X86PvInfo(guest_width=layout.width, pt_levels=layout.levels))
        if self.version >= 3:
            w.record(X86CpuidPolicy([CpuidLeaf(0, 0xFFFFFFFF, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69), CpuidLeaf(1, 0xFFFFFFFF, 0x306C3, 0, 0x80200000, 0x178BFBFF)]))
            w.record(X86MsrPolicy([MsrEntry(idx=0xCE, val=0)]))
            w.record(StaticDataEnd())
        if self.guest == "pv":
            frames = [PV_P2M_FIRST_PFN + i for i in range(layout.p2m_frames)]
            w.record(X86PvP2mFrames(0, layout.max_pfn, frames))

    def _memory(self, pfns, generation: int):
        pfns = list(pfns)
        layout, pool = self.layout, self.pool
        for start in range(0, len(pfns), self.batch):
            chunk = pfns[start : start + self.batch]
            types = [layout.type_of(p) for p in chunk]
            payloads = [
                (_ZERO_PAGE if t & 0x7 else pool.page(p, generation))
                for p, t in zip(chunk, types)
                if t != PAGETYPE_XTAB
            ]
            self.w.page_data(chunk, types, payloads)

    def _end_of_checkpoint(self, generation: int):
        w, layout = self.w, self.layout
        w.record(X86TscInfo(mode=0, khz=2000000, nsec=1_000_000 * (generation + 1), incarnation=generation))
        if self.guest == "pv":
            w.record(SharedInfo(_shared_info(generation)))
            for vcpu in range(layout.vcpus):
                w.record(X86PvVcpuBasic(vcpu, _vcpu_basic(layout, vcpu)))
                w.record(X86PvVcpuExtended(vcpu, _vcpu_extended(vcpu)))
                w.record(X86PvVcpuXsave(vcpu, _vcpu_xsave()))
                if layout.width == 8:
                    w.record(X86PvVcpuMsrs(vcpu, struct.pack("<IIQ", 0xC0000103, 0, vcpu)))
        else:
            w.record(HvmContext(_hvm_context(layout.vcpus)))
            top = layout.pages - 1
            w.record(HvmParams([(1, top), (17, top - 1), (5, top - 2), (6, top - 3)]))

    def _emulator_records(self):
        if self.guest != "hvm":
            return
        w = self.w
        if self.xenstore:
            w.libxl_record(EmulatorXenstoreData.from_pairs(_PHYSMAP))
        w.libxl_record(EmulatorContext(emulator_id=C.EMULATOR_QEMU_UPSTREAM, index=0, data=b"QEVM\0\0\0\x03" + bytes(range(61))))


def write_stream(sink, guest: str = "pv", pages: int = 256, *, width: int = 8, vcpus: int = 1, version: int = 3,
                 wrap: str = "libxc", checkpoints: int = 0, batch: int = 1024, seed: int = 0,
                 xenstore: bool = True) -> int:
    """Write a complete stream to ``sink``; return the number of bytes written."""
    return _StreamWriter(sink, guest, pages, width, vcpus, version, wrap, checkpoints, batch, seed, xenstore).run()


def stream_bytes(**kwargs) -> bytes:
    sink = io.BytesIO()
    write_stream(sink, **kwargs)
    return sink.getvalue()
