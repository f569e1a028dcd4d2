"""Where a simulated PV guest keeps things, in pfns (these survive migration; mfns do not)."""

from __future__ import annotations

import attrs

from xenstream.hv import abi

DIRECT_MAP_64 = 0xFFFF_8800_0000_0000  # L4 slot 272, right after Xen's range, as Linux does
DIRECT_MAP_32 = 0xC000_0000
LOWMEM_L2_SLOTS_32 = 427  # top-GiB L2 slots for the direct map; 427 is the fixmap, 428+ Xen's
LOWMEM_PFNS_32 = LOWMEM_L2_SLOTS_32 * 512
HIGHMEM_PFNS_32 = 2 * 512 * 512  # mapped through L3 slots 0-1; slot 2 holds the linear P2M
USER_BASE = 0x40_0000
# Linear P2M addresses, 1 GiB aligned as the spec recommends (Xen's trim is only right then).
P2M_VADDR_64 = 0xFFFF_C900_0000_0000  # L4 slot 402, Linux's vmalloc area
P2M_VADDR_32 = 0x8000_0000  # PAE L3 slot 2


@attrs.frozen
class TableRef:
    pfn: int
    level: int


@attrs.frozen
class VcpuRoots:
    """A vcpu's pagetable roots and GDT, as pfns; `user_root` only for 64-bit processes."""

    kernel_root: int
    user_root: int | None
    gdt: tuple[int, ...]
    gdt_ents: int


@attrs.frozen
class GuestLayout:
    width: int
    nr_pages: int
    start_info_pfn: int
    store_pfn: int
    console_pfn: int
    p2m_pfns: tuple[int, ...]
    fl_pfns: tuple[int, ...]
    fll_pfn: int
    tables: tuple[TableRef, ...]  # every pagetable page the guest built
    pinned: tuple[TableRef, ...]  # the roots it pins (Linux pins every address space)
    vcpus: tuple[VcpuRoots | None, ...]  # None: vcpu offline
    fixmap_l1_pfn: int  # entry 0 maps shared_info while the guest runs
    kernel_pfns: int  # pfns 0..kernel_pfns-1 hold the read-only "kernel image"
    p2m_vaddr: int = 0  # where the P2M is mapped linearly (published in shared_info), 0 = tree only
    p2m_pages: int = 0  # pfns the P2M covers (published arch.max_pfn); pfns >= nr_pages are holes
    p2m_missing_pfn: int | None = None  # shared all-INVALID leaf of a sparse P2M
    p2m_mid_missing_pfn: int | None = None  # shared frame list naming only that leaf

    @property
    def levels(self) -> int:
        return abi.LEVELS_FOR_WIDTH[self.width]

    @property
    def fpp(self) -> int:
        return abi.frames_per_page(self.width)

    @property
    def p2m_leaf_pfns(self) -> tuple[int, ...]:
        """The pfn holding each leaf of the P2M, the shared missing leaf repeated for the tail."""
        total = -(-max(self.p2m_pages, self.nr_pages) // self.fpp)
        return self.p2m_pfns + (self.p2m_missing_pfn,) * (total - len(self.p2m_pfns))

    @property
    def special_pfns(self) -> frozenset[int]:
        """Pages the kernel maps read-only: pagetables and GDTs."""
        gdts = [pfn for roots in self.vcpus if roots for pfn in roots.gdt]
        return frozenset([t.pfn for t in self.tables] + gdts)

    def direct_map_vaddr(self, pfn: int) -> int | None:
        if self.width == abi.WIDTH_64:
            return DIRECT_MAP_64 + pfn * abi.PAGE_SIZE
        if pfn < LOWMEM_PFNS_32:
            return DIRECT_MAP_32 + pfn * abi.PAGE_SIZE
        if pfn < LOWMEM_PFNS_32 + HIGHMEM_PFNS_32:
            return (pfn - LOWMEM_PFNS_32) * abi.PAGE_SIZE
        return None
