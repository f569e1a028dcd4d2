"""A synthetic PV guest as a Xen 4.5 saver would see it: PFN layout, canonical page tables, the guest's
own p2m pages, start-info, shared-info and VCPU contexts (spec sections 2.3, 2.4.3, 3).

Everything is deterministic from the seed. Page tables hold PFNs (the canonical form the saver writes)
and form one consistent tree: a kernel direct map of every PFN (read-only where Xen requires it) plus a
small user-mode tree, with the top-level tables pinned.
"""

import random
import struct

import attrs

from xenstream.hv.abi import (
    PAGE_SIZE,
    PAGETYPE_L1TAB,
    PAGETYPE_L2TAB,
    PAGETYPE_L3TAB,
    PAGETYPE_L4TAB,
    PAGETYPE_LPINTAB,
    PAGETYPE_NOTAB,
)

VCPU_CONTEXT_SIZE = {4: 0xAF0, 8: 0x1430}
EXTENDED_CONTEXT_SIZE = 128
EXTENDED_CONTEXT_FILLED = 56  # Xen 4.3 ... 4.5 fill 56 bytes of xen_domctl_ext_vcpucontext
XSAVE_FEATURE_MASK = 0x7  # x87 | SSE | AVX
XSAVE_AREA_SIZE = 832  # legacy region + header + AVX
XSAVE_RECORD_SIZE = 16 + 16 + XSAVE_AREA_SIZE  # mask, size, then xcr0, xcr0_accum, area

_P, _RW, _USER, _ACCESSED, _DIRTY, _PSE, _GLOBAL = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80, 0x100
_NX = 1 << 63
_KERNEL_DATA = _P | _RW | _ACCESSED | _DIRTY | _GLOBAL | _NX
_KERNEL_TEXT = _P | _ACCESSED | _GLOBAL
_KERNEL_READONLY = _P | _ACCESSED | _GLOBAL | _NX  # page tables and GDT frames: Xen forbids writable maps
_TABLE = _P | _RW | _USER | _ACCESSED | _DIRTY
_KERNEL_TABLE = _P | _RW | _ACCESSED | _DIRTY
_USER_DATA = _P | _RW | _USER | _ACCESSED | _DIRTY | _NX

ENTRIES = 512
PAE_LOWMEM_L2_SLOTS = 428  # (0xF5800000 >> 21) & 511: where Xen's compat area starts in the top L2
COMPAT_M2P_SLOTS = 4
DIRECT_MAP_L4_SLOT = 272  # 0xffff880000000000, right above Xen's reserved slots 256 ... 271
USER_MAPPED_PAGES = 2
VGCF_I387_VALID, VGCF_IN_KERNEL, VGCF_ONLINE = 1 << 0, 1 << 2, 1 << 5
VMASST_WRITABLE_PAGETABLES, VMASST_PAE_EXTENDED_CR3 = 1 << 2, 1 << 3
KERNEL_TEXT_PAGES = 2


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@attrs.frozen
class PvLayout:
    """Which PFN holds what. `pagetables` maps PFN -> (type nibble incl. pin bit, 512 canonical PTEs)."""

    guest_width: int
    p2m_size: int
    holes: tuple[int, ...]
    pagetables: dict
    p2m_frames: tuple[int, ...]
    start_info: int
    store: int
    console: int
    gdt_frames: tuple[int, ...]
    top_level: int
    user_top_level: int | None


class PvGuest:
    """The memory and CPU state of one PV guest; pages are produced on demand into caller buffers."""

    def __init__(self, *, guest_width: int, pages: int, vcpus: int, seed: int, holes: int, toolstack_width: int):
        if guest_width not in (4, 8):
            raise ValueError("guest_width must be 4 or 8 bytes")
        if vcpus < 1:
            raise ValueError("a guest has at least one vcpu")
        self.guest_width = guest_width
        self.toolstack_width = toolstack_width
        self.vcpus = vcpus
        self.seed = seed
        self._rng = random.Random(seed ^ 0x5EED_0F_9)
        self.p2m_size = pages + holes
        self.layout = self._lay_out(pages, holes)
        self._mfn_base = 0x80000 + self._rng.randrange(1 << 16)
        self._mfn_modulus = 1 << max(1, (self.p2m_size - 1).bit_length())
        self._populated = self.p2m_size - len(self.layout.holes)
        self._p2m_frame_index = {pfn: index for index, pfn in enumerate(self.layout.p2m_frames)}

    # ---- layout ---------------------------------------------------------------------------------

    def _pagetable_counts(self) -> dict:
        if self.guest_width == 8:
            l1 = _ceil_div(self.p2m_size, ENTRIES)
            l2 = _ceil_div(l1, ENTRIES)
            l3 = _ceil_div(l2, ENTRIES)
            return {"kernel_l1": l1, "kernel_l2": l2, "kernel_l3": l3, "user": 3, "top": 2}
        low = min(self.p2m_size, PAE_LOWMEM_L2_SLOTS * ENTRIES)
        high_l1 = _ceil_div(self.p2m_size - low, ENTRIES)
        high_l2 = _ceil_div(high_l1, ENTRIES)
        if high_l2 > 3:
            raise ValueError("a 32-bit PAE guest of this size cannot be mapped in 4 GiB")
        return {"kernel_l1": _ceil_div(low, ENTRIES), "high_l1": high_l1, "high_l2": high_l2,
                "user": 0 if high_l2 else 2, "top": 1, "kernel_l2": 1}

    def _lay_out(self, pages: int, hole_count: int) -> PvLayout:
        counts = self._pagetable_counts()
        fpp = PAGE_SIZE // self.guest_width
        n_p2m = _ceil_div(self.p2m_size, fpp)
        special = KERNEL_TEXT_PAGES + sum(counts.values()) + n_p2m + 3 + self.vcpus
        if special + USER_MAPPED_PAGES > pages:
            raise ValueError(f"a PV guest of this shape needs at least {special + USER_MAPPED_PAGES} pages")
        cursor = iter(range(KERNEL_TEXT_PAGES, self.p2m_size))
        table_pfns = {kind: [next(cursor) for _ in range(n)] for kind, n in counts.items()}
        p2m_frames = tuple(next(cursor) for _ in range(n_p2m))
        start_info, store, console = next(cursor), next(cursor), next(cursor)
        gdt_frames = tuple(next(cursor) for _ in range(self.vcpus))
        first_free = next(cursor)
        candidates = range(first_free + USER_MAPPED_PAGES, self.p2m_size)
        holes = tuple(sorted(self._rng.sample(candidates, hole_count)))
        builder = _TreeBuilder(self, table_pfns, set(holes), set(gdt_frames), first_free)
        pagetables, top, user_top = builder.build()
        return PvLayout(self.guest_width, self.p2m_size, holes, pagetables, p2m_frames, start_info, store,
                        console, gdt_frames, top, user_top)

    # ---- frames -----------------------------------------------------------------------------------

    def mfn(self, pfn: int) -> int:
        """The source host's machine frame of PFN: a bijection, so every guest frame is distinct."""
        return self._mfn_base + (pfn * 0x9E3779B1) % self._mfn_modulus

    def page_type(self, pfn: int) -> int:
        table = self.layout.pagetables.get(pfn)
        return PAGETYPE_NOTAB if table is None else table[0]

    def special_page(self, pfn: int) -> bytes | None:
        """The content of a page the guest's structure fixes (tables, p2m, start-info); None otherwise."""
        layout = self.layout
        if pfn in layout.pagetables:
            return struct.pack("<512Q", *layout.pagetables[pfn][1])
        if pfn in self._p2m_frame_index:
            return self._p2m_page(self._p2m_frame_index[pfn])
        if pfn == layout.start_info:
            return self._start_info_page()
        return None

    def _p2m_page(self, index: int) -> bytes:
        fpp = PAGE_SIZE // self.guest_width
        invalid = (1 << (8 * self.guest_width)) - 1
        holes = set(self.layout.holes)
        entries = []
        for pfn in range(index * fpp, (index + 1) * fpp):
            entries.append(self.mfn(pfn) if pfn < self.p2m_size and pfn not in holes else invalid)
        return struct.pack("<%d%s" % (fpp, "Q" if self.guest_width == 8 else "I"), *entries)

    def _start_info_page(self) -> bytes:
        """start_info as the guest left it before suspending: store and console frames already PFNs."""
        page = bytearray(PAGE_SIZE)
        layout = self.layout
        shared_info_maddr = 0x1_0000_0000 + (self._mfn_base << 12)
        if self.guest_width == 8:
            page[0:32] = b"xen-3.0-x86_64".ljust(32, b"\0")
            struct.pack_into("<QQIxxxxQIxxxxQIxxxxQQQQQ", page, 0x20, self._populated, shared_info_maddr, 0,
                             layout.store, 1, layout.console, 2,
                             0xFFFFFFFF80000000 + (layout.top_level << 12),
                             len(layout.pagetables), 0xFFFFFFFF81000000, 0, 0)
            page[0x80:0x80 + 40] = b"root=/dev/xvda1 ro console=hvc0 quiet".ljust(40, b"\0")
        else:
            page[0:32] = b"xen-3.0-x86_32p".ljust(32, b"\0")
            struct.pack_into("<IIIIIIIIIIIII", page, 0x20, self._populated, shared_info_maddr & 0xFFFFFFFF, 0,
                             layout.store, 1, layout.console, 2, 0xC0000000 + (layout.top_level << 12),
                             len(layout.pagetables), 0xC1000000, 0, 0, 0)
            page[0x50:0x50 + 40] = b"root=/dev/xvda1 ro console=hvc0 quiet".ljust(40, b"\0")
        return bytes(page)

    # ---- tail -------------------------------------------------------------------------------------

    def vcpu_context(self, vcpu: int, *, canonical: bool = True, generation: int = 0) -> bytes:
        """The basic context: canonical (as in the tail) or raw (MFNs, as in the "vcpu" block)."""
        layout = self.layout
        frame = (lambda pfn: pfn) if canonical else self.mfn
        rng = random.Random(self.seed * 1_000_003 + vcpu * 4099 + generation * 2 + int(canonical))
        start_info_reg = frame(layout.start_info) if vcpu == 0 else rng.randrange(1 << 16)
        return _VcpuContextBuilder(self.guest_width, rng).build(
            vcpu=vcpu,
            rdx=start_info_reg,
            gdt_frame=frame(layout.gdt_frames[vcpu % len(layout.gdt_frames)]),
            cr3_frame=frame(layout.top_level),
            cr1_frame=None if layout.user_top_level is None else frame(layout.user_top_level),
        )

    def extended_context(self, vcpu: int, filled: int = EXTENDED_CONTEXT_FILLED) -> bytes:
        """128 bytes: xen_domctl_ext_vcpucontext with `filled` meaningful bytes (56 from Xen 4.3, 40 in 4.2,
        32 before); 4.0/4.1 savers did not clear the buffer, so their filler is leftover memory."""
        if filled < 40:
            record = bytearray(random.Random(self.seed * 7 + vcpu).randbytes(EXTENDED_CONTEXT_SIZE))
        else:
            record = bytearray(EXTENDED_CONTEXT_SIZE)
        if self.guest_width == 8:
            sys32, sysenter, cs = 0xFFFFFFFF81A2C4A0, 0xFFFFFFFF81A2C2E0, 0xE023
        else:
            sys32, sysenter, cs = 0, 0xC15E1A30, 0xE019
        struct.pack_into("<IIQQHHBBxx", record, 0, vcpu, filled, sys32, sysenter, cs, cs, 0, 1)
        if filled >= 40:
            struct.pack_into("<Q", record, 32, 0x1000802)
        if filled >= 56:
            struct.pack_into("<QQ", record, 40, 0, 0)
        return bytes(record)

    def xsave_record(self, vcpu: int, generation: int = 0) -> bytes:
        rng = random.Random(self.seed * 31 + vcpu * 7 + generation)
        area = bytearray(rng.randbytes(XSAVE_AREA_SIZE))
        struct.pack_into("<HHBxHQQII", area, 0, 0x037F, 0, 0xFF, 0, 0, 0, 0x1F80, 0xFFFF)
        area[512:576] = struct.pack("<QQ", XSAVE_FEATURE_MASK, 0).ljust(64, b"\0")
        return struct.pack("<QQQQ", XSAVE_FEATURE_MASK, XSAVE_AREA_SIZE + 16, XSAVE_FEATURE_MASK,
                           XSAVE_FEATURE_MASK) + bytes(area)

    def shared_info(self, online: list[int], generation: int = 0) -> bytes:
        page = bytearray(PAGE_SIZE)
        rng = random.Random(self.seed * 131 + generation)
        for vcpu in online:
            if vcpu >= 32:
                continue
            base = vcpu * 64
            page[base + 1] = 1  # upcall mask: the guest is suspended
            struct.pack_into("<IxxxxQQIb", page, base + 32, 2 * (generation + 1),
                             rng.randrange(1 << 40), rng.randrange(1 << 40), 0xC0E3F01D, -1)
        if self.guest_width == 8:
            struct.pack_into("<QQ", page, 0xA00, 0xFFFFFFFFFFFF0000, 0)  # evtchn_mask
            struct.pack_into("<IIIQQQ", page, 0xC00, 2, 1_500_000_000 + self.seed % 1000, 0,
                             self.p2m_size, 0, 0)
        else:
            struct.pack_into("<II", page, 0x880, 0xFFFF0000, 0)
            struct.pack_into("<IIIIII", page, 0x900, 2, 1_500_000_000 + self.seed % 1000, 0,
                             self.p2m_size, 0, 0)
        return bytes(page)


class _TreeBuilder:
    """Builds the canonical page tables of a PvGuest from the PFNs reserved for them."""

    def __init__(self, guest: PvGuest, table_pfns: dict, holes: set, gdt_frames: set, first_free: int):
        self.guest = guest
        self.pfns = table_pfns
        self.holes = holes
        self.readonly = {pfn for group in table_pfns.values() for pfn in group} | gdt_frames
        self.first_free = first_free
        self.tables: dict[int, tuple[int, list[int]]] = {}

    def _leaf(self, pfn: int) -> int:
        if pfn in self.holes:
            return (pfn << 12) | _DIRTY  # not present: a swap-style entry, copied verbatim by the saver
        if pfn < KERNEL_TEXT_PAGES:
            return (pfn << 12) | _KERNEL_TEXT
        if pfn in self.readonly:
            return (pfn << 12) | _KERNEL_READONLY
        return (pfn << 12) | _KERNEL_DATA

    def _direct_map_l1s(self, l1_pfns: list[int], first_pfn: int, last_pfn: int) -> None:
        for index, l1 in enumerate(l1_pfns):
            entries = [0] * ENTRIES
            for slot in range(ENTRIES):
                pfn = first_pfn + index * ENTRIES + slot
                if pfn < last_pfn:
                    entries[slot] = self._leaf(pfn)
            self.tables[l1] = (PAGETYPE_L1TAB, entries)

    def _parents(self, child_pfns: list[int], parent_pfns: list[int], level_type: int, flags: int) -> None:
        for index, parent in enumerate(parent_pfns):
            entries = [0] * ENTRIES
            for slot, child in enumerate(child_pfns[index * ENTRIES:(index + 1) * ENTRIES]):
                entries[slot] = (child << 12) | flags
            self.tables[parent] = (level_type, entries)

    def _user_tree(self, user_pfns: list[int], l1_type_parent: list[int]) -> None:
        """A user-mode L1 mapping the first free data pages, hung under `user_pfns[1:]` parents."""
        l1 = user_pfns[0]
        entries = [0] * ENTRIES
        for slot in range(USER_MAPPED_PAGES):
            entries[slot] = ((self.first_free + slot) << 12) | _USER_DATA
        self.tables[l1] = (PAGETYPE_L1TAB, entries)
        child = l1
        for parent, level_type in l1_type_parent:
            entries = [0] * ENTRIES
            entries[0] = (child << 12) | _TABLE
            self.tables[parent] = (level_type, entries)
            child = parent

    def build(self):
        guest = self.guest
        if guest.guest_width == 8:
            return self._build_64()
        return self._build_pae()

    def _build_64(self):
        pfns = self.pfns
        self._direct_map_l1s(pfns["kernel_l1"], 0, self.guest.p2m_size)
        self._parents(pfns["kernel_l1"], pfns["kernel_l2"], PAGETYPE_L2TAB, _KERNEL_TABLE)
        self._parents(pfns["kernel_l2"], pfns["kernel_l3"], PAGETYPE_L3TAB, _KERNEL_TABLE)
        user_l1, user_l2, user_l3 = pfns["user"]
        self._user_tree([user_l1], [(user_l2, PAGETYPE_L2TAB), (user_l3, PAGETYPE_L3TAB)])
        kernel_top, user_top = pfns["top"]
        kernel = [0] * ENTRIES
        kernel[0] = (user_l3 << 12) | _TABLE
        for index, l3 in enumerate(pfns["kernel_l3"]):
            kernel[DIRECT_MAP_L4_SLOT + index] = (l3 << 12) | _TABLE
        user = [0] * ENTRIES
        user[0] = (user_l3 << 12) | _TABLE
        pinned_l4 = PAGETYPE_L4TAB | PAGETYPE_LPINTAB
        self.tables[kernel_top] = (pinned_l4, kernel)
        self.tables[user_top] = (pinned_l4, user)
        return self.tables, kernel_top, user_top

    def _build_pae(self):
        pfns = self.pfns
        low = min(self.guest.p2m_size, PAE_LOWMEM_L2_SLOTS * ENTRIES)
        self._direct_map_l1s(pfns["kernel_l1"], 0, low)
        (kernel_l2,) = pfns["kernel_l2"]
        entries = [0] * ENTRIES
        for slot, l1 in enumerate(pfns["kernel_l1"]):
            entries[slot] = (l1 << 12) | _TABLE
        if self.guest.toolstack_width == 8:
            # 64-bit tools cannot recognise the compat M2P mappings in Xen's slots and zap their frames
            # to 0 while keeping them present (spec 2.4.3).
            for slot in range(PAE_LOWMEM_L2_SLOTS, PAE_LOWMEM_L2_SLOTS + COMPAT_M2P_SLOTS):
                entries[slot] = _NX | _PSE | _ACCESSED | _P
        self.tables[kernel_l2] = (PAGETYPE_L2TAB, entries)
        top = [0] * ENTRIES
        top[3] = (kernel_l2 << 12) | _P  # canonical PAE L3 entries carry no RW/USER/ACCESSED
        if pfns["high_l2"]:
            self._direct_map_l1s(pfns["high_l1"], low, self.guest.p2m_size)
            self._parents(pfns["high_l1"], pfns["high_l2"], PAGETYPE_L2TAB, _TABLE)
            for slot, l2 in enumerate(pfns["high_l2"]):
                top[slot] = (l2 << 12) | _P
        else:
            user_l1, user_l2 = pfns["user"]
            self._user_tree([user_l1], [(user_l2, PAGETYPE_L2TAB)])
            top[0] = (user_l2 << 12) | _P
        (top_pfn,) = pfns["top"]
        self.tables[top_pfn] = (PAGETYPE_L3TAB | PAGETYPE_LPINTAB, top)
        return self.tables, top_pfn, None


class _VcpuContextBuilder:
    """vcpu_guest_context bytes in the x86_32 (0xAF0) or x86_64 (0x1430) layout of spec 3.3."""

    def __init__(self, guest_width: int, rng: random.Random):
        self.width = guest_width
        self.rng = rng

    def _fpu(self) -> bytes:
        fpu = bytearray(512)
        struct.pack_into("<HHBxH", fpu, 0, 0x037F, 0, 0xFF, 0)
        struct.pack_into("<II", fpu, 24, 0x1F80, 0xFFFF)
        fpu[160:416] = self.rng.randbytes(256)
        return bytes(fpu)

    def build(self, *, vcpu: int, rdx: int, gdt_frame: int, cr3_frame: int, cr1_frame: int | None) -> bytes:
        rng = self.rng
        ctx = bytearray(VCPU_CONTEXT_SIZE[self.width])
        ctx[0:512] = self._fpu()
        if self.width == 8:
            struct.pack_into("<Q", ctx, 0x200, VGCF_I387_VALID | VGCF_IN_KERNEL | VGCF_ONLINE)
            regs = [rng.randrange(1 << 64) for _ in range(15)]
            regs[12] = rdx
            struct.pack_into("<15QII", ctx, 0x208, *regs, 0, 0)
            struct.pack_into("<QHxxBxxxQQQQQQQ", ctx, 0x288, 0xFFFFFFFF81001000 + vcpu * 0x40, 0xE033, 1,
                             0x246, 0xFFFF880000010000 + vcpu * 0x4000, 0xE02B, 0, 0, 0, 0)
            for vector in range(20):
                struct.pack_into("<BBHxxxxQ", ctx, 0x2D0 + vector * 16, vector, 0 if vector != 3 else 3, 0xE033,
                                 0xFFFFFFFF81600000 + vector * 0x40)
            struct.pack_into("<QQ", ctx, 0x12D0, 0, 0)
            struct.pack_into("<Q", ctx, 0x12E0, gdt_frame)
            struct.pack_into("<QQQ", ctx, 0x1360, 16, 0xE02B, 0xFFFF880000010000 + vcpu * 0x4000)
            cr1 = 0 if cr1_frame is None else (cr1_frame << 12) | 1
            struct.pack_into("<8Q", ctx, 0x1378, 0x8005003B, cr1, 0, cr3_frame << 12, 0x2660, 0, 0, 0)
            struct.pack_into("<QQQQQQQ", ctx, 0x13F8, 0xFFFFFFFF81A2B000, 0xFFFFFFFF81A2B100, 0xFFFFFFFF81A2B200,
                             VMASST_WRITABLE_PAGETABLES, 0, 0xFFFF88003FC00000 + vcpu * 0x10000, 0)
        else:
            struct.pack_into("<I", ctx, 0x200, VGCF_I387_VALID | VGCF_IN_KERNEL | VGCF_ONLINE)
            regs = [rng.randrange(1 << 32) for _ in range(7)]
            regs[2] = rdx
            struct.pack_into("<7IHHIHBxIIHxxHxxHxxHxxHxx", ctx, 0x204, *regs, 0, 0, 0xC1001000 + vcpu * 0x40,
                             0xE019, 1, 0x246, 0xC1800000 + vcpu * 0x2000, 0xE021, 0xE021, 0xE021, 0xD8, 0)
            for vector in range(20):
                struct.pack_into("<BBHI", ctx, 0x248 + vector * 8, vector, 0 if vector != 3 else 3, 0xE019,
                                 0xC1600000 + vector * 0x40)
            struct.pack_into("<I", ctx, 0xA50, gdt_frame)
            struct.pack_into("<III", ctx, 0xA90, 32, 0xE021, 0xC1800000 + vcpu * 0x2000)
            cr3 = ((cr3_frame << 12) | (cr3_frame >> 20)) & 0xFFFFFFFF
            struct.pack_into("<8I", ctx, 0xA9C, 0x8005003B, 0, 0, cr3, 0x2660, 0, 0, 0)
            struct.pack_into("<IIIII", ctx, 0xADC, 0xE019, 0xC1A2B000, 0xE019, 0xC1A2B100,
                             VMASST_WRITABLE_PAGETABLES | VMASST_PAE_EXTENDED_CR3)
        return bytes(ctx)
