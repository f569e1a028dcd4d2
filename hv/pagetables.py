"""Pagetable translation and page-type word translation: the per-word hot paths of the engines.

Each operation works on a whole batch. This module holds the shared vocabulary (`P2MView`,
`TranslationTables`, status codes, `TranslationError`) and the pure-Python twins; the cffi kernels
in `xenstream.hv._kernels` do exactly the same thing. Call them through `xenstream.hv.kernels`,
which picks the compiled kernel when it is importable.

Batches of pages are one writable buffer of `n * 4096` bytes (the save engine's private copies, the
restore engine's record buffer) rewritten in place; `levels` gives each page's table level (1-4, the
pin bit already stripped). Frame arrays are `array('Q')` (u64), type arrays `array('I')` (u32
PFINFO codes, type in bits 28-31).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from xenstream.hv import abi

# normalise status per page
NORMALISE_OK = 0
NORMALISE_BAD_MFN = 1  # a present entry names a frame that fails in_pseudophys (EAGAIN / ERANGE)
NORMALISE_SUPERPAGE = 2  # PSE in an L2/L3 entry (E2BIG)
NORMALISE_BAD_LEVEL = 3  # L4 table in a 3-level guest, or not a table level at all (EINVAL)
NORMALISE_STATUS_NAMES = {NORMALISE_OK: "ok", NORMALISE_BAD_MFN: "frame not in pseudo-physical map",
                          NORMALISE_SUPERPAGE: "superpage entry", NORMALISE_BAD_LEVEL: "bad table level"}

# localise failure reasons (TranslationError.reason)
LOCALISE_PFN_RANGE = 1
LOCALISE_BAD_MFN = 2
LOCALISE_BAD_LEVEL = 3

PFN_MASK_V2 = 0x000F_FFFF_FFFF_FFFF
_KNOWN_CODES = frozenset(t << abi.PFINFO_LTAB_SHIFT for t in abi.KNOWN_PAGETYPES)
_DATALESS_CODES = frozenset(t << abi.PFINFO_LTAB_SHIFT for t in abi.PAGETYPES_WITHOUT_DATA)
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


class TranslationError(Exception):
    """A batch that cannot be translated: `index` is the page (or word), `entry` the PTE, or -1."""

    def __init__(self, reason: int, message: str, index: int = -1, entry: int = -1) -> None:
        super().__init__(message)
        self.reason = reason
        self.index = index
        self.entry = entry


class P2MView:
    """A P2M as one or more leaf buffers: pfn's entry is in leaves[pfn >> shift] at pfn & mask.

    Save side: the guest's own leaf pages (`width` 4 or 8, `abi.frames_per_page(width)` entries each),
    read live. Restore side: the engine's local table, `P2MView.contiguous(array('Q'))`. A view holds
    buffer exports: drop it (and make a new one) before resizing the underlying array.
    32-bit INVALID entries read as 64-bit INVALID.
    """

    __slots__ = ("width", "leaves", "leaf_shift", "size", "native")

    def __init__(self, width: int, leaves: Sequence, entries_per_leaf: int) -> None:
        if width not in (abi.WIDTH_32, abi.WIDTH_64):
            raise ValueError(f"P2M width {width}")
        if entries_per_leaf & (entries_per_leaf - 1) or entries_per_leaf <= 0:
            raise ValueError("entries_per_leaf must be a power of two")
        fmt = "Q" if width == abi.WIDTH_64 else "I"
        views = []
        for leaf in leaves:
            view = memoryview(leaf).cast("B").cast(fmt)
            if len(view) < entries_per_leaf:
                raise ValueError("P2M leaf shorter than entries_per_leaf")
            views.append(view)
        self.width = width
        self.leaves = views
        self.leaf_shift = entries_per_leaf.bit_length() - 1
        self.size = len(views) * entries_per_leaf
        self.native = None  # backend cache (the cffi kernel's pointer table)

    @classmethod
    def contiguous(cls, table, width: int = abi.WIDTH_64) -> P2MView:
        view = memoryview(table).cast("B")
        entries = len(view) // width
        shift = max(entries - 1, 1).bit_length()
        obj = cls.__new__(cls)
        obj.width = width
        obj.leaves = [view.cast("Q" if width == abi.WIDTH_64 else "I")]
        obj.leaf_shift = shift
        obj.size = entries
        obj.native = None
        return obj

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, pfn: int) -> int:
        if not 0 <= pfn < self.size:
            return abi.INVALID_MFN
        value = self.leaves[pfn >> self.leaf_shift][pfn & ((1 << self.leaf_shift) - 1)]
        if self.width == abi.WIDTH_32 and value == abi.INVALID_MFN_32:
            return abi.INVALID_MFN
        return value


@attrs.define
class TranslationTables:
    """What both directions consult: the host's M2P and the P2M that must agree with it.

    `m2p` is `Hypervisor.m2p_view()` (u64 per mfn), `max_mfn` its `get_max_mfn()`; `levels` 3 or 4;
    `compat_m2p_mfn0` only matters for 3-level guests (spot Xen's slots in the top L2).
    """

    levels: int
    m2p: memoryview
    max_mfn: int
    p2m: P2MView
    max_pfn: int
    compat_m2p_mfn0: int = abi.INVALID_MFN

    def in_pseudophys(self, mfn: int) -> int:
        """The pfn backed by `mfn` if M2P and P2M agree on it (spec 1.1), else -1."""
        m2p = self.m2p
        if mfn > self.max_mfn or mfn >= len(m2p):
            return -1
        pfn = m2p[mfn]
        if pfn > self.max_pfn or self.p2m[pfn] != mfn:
            return -1
        return pfn


def xen_slot_range(levels: int, level: int, page: memoryview, compat_m2p_mfn0: int) -> range | None:
    """Entries the saver writes as zero; None if the table may not exist in this guest."""
    if levels == 4:
        return abi.L4_XEN_SLOTS_64 if level == 4 else range(0)
    if level == 4:
        return None
    if level == 3:
        return abi.PAE_L3_XEN_SLOTS
    if level == 2 and abi.pte_frame(page[abi.PAE_L2_XEN_FIRST]) == compat_m2p_mfn0:
        return abi.PAE_L2_XEN_SLOTS
    return range(0)


def python_normalise_pages(tables: TranslationTables, pages, levels: Sequence[int], status: bytearray) -> int:
    """Rewrite present PTE frames mfn -> pfn in place, zeroing Xen's slots; returns pages failed.

    `status[i]` gets a NORMALISE_* code. A failed page's contents are unspecified (drop it).
    """
    words = memoryview(pages).cast("B").cast("Q")
    failed = 0
    frame_mask, present, pse = abi.PTE_FRAME_MASK, abi.PTE_PRESENT, abi.PTE_PSE
    keep = ~frame_mask & _MASK64
    for i, level in enumerate(levels):
        page = words[i * 512:(i + 1) * 512]
        slots = xen_slot_range(tables.levels, level, page, tables.compat_m2p_mfn0) if 1 <= level <= 4 else None
        code = NORMALISE_OK
        if slots is None:
            code = NORMALISE_BAD_LEVEL
        else:
            for j in range(512):
                pte = 0 if j in slots else page[j]
                if pte & present:
                    if level > 1 and pte & pse:
                        code = NORMALISE_SUPERPAGE
                        break
                    pfn = tables.in_pseudophys((pte & frame_mask) >> 12)
                    if pfn < 0:
                        code = NORMALISE_BAD_MFN
                        break
                    pte = (pte & keep) | ((pfn << 12) & frame_mask)
                page[j] = pte
        status[i] = code
        failed += code != NORMALISE_OK
    return failed


def python_localise_pages(tables: TranslationTables, pages, levels: Sequence[int], missing) -> int:
    """Rewrite present PTE frames pfn -> mfn in place.

    If some named pfn has no frame yet (P2M INVALID: a forward reference), nothing is rewritten:
    those pfns are stored in `missing` (room for n*512 u64; duplicates possible) and their count is
    returned, so the caller populates them and calls again. Returns 0 once the batch is rewritten.
    Raises TranslationError for a pfn above max_pfn, a frame failing in_pseudophys, a bad level.
    """
    words = memoryview(pages).cast("B").cast("Q")
    frame_mask, present = abi.PTE_FRAME_MASK, abi.PTE_PRESENT
    keep = ~frame_mask & _MASK64
    p2m, max_pfn = tables.p2m, tables.max_pfn
    count = 0
    for i, level in enumerate(levels):
        if not 1 <= level <= 4:
            raise TranslationError(LOCALISE_BAD_LEVEL, f"page {i}: level {level} is not a table", i)
        for j, pte in enumerate(words[i * 512:(i + 1) * 512]):
            if pte & present:
                pfn = (pte & frame_mask) >> 12
                if pfn > max_pfn:
                    raise TranslationError(LOCALISE_PFN_RANGE, f"page {i} entry {j}: pfn {pfn:#x} beyond max_pfn", i, j)
                if p2m[pfn] == abi.INVALID_MFN:
                    missing[count] = pfn
                    count += 1
    if count:
        return count
    for i in range(len(levels)):
        page = words[i * 512:(i + 1) * 512]
        for j in range(512):
            pte = page[j]
            if pte & present:
                mfn = p2m[(pte & frame_mask) >> 12]
                if tables.in_pseudophys(mfn) < 0:
                    raise TranslationError(LOCALISE_BAD_MFN, f"page {i} entry {j}: mfn {mfn:#x} not in the pseudo-physical map", i, j)
                page[j] = (pte & keep) | ((mfn << 12) & frame_mask)
    return 0


def python_pack_page_words(pfns: Sequence[int], types: Sequence[int], out) -> int:
    """v2 PAGE_DATA words `(type << 32) | pfn` from pfns and PFINFO codes; returns data-bearing count."""
    data = 0
    for i, (pfn, code) in enumerate(zip(pfns, types)):
        if code not in _KNOWN_CODES or pfn > PFN_MASK_V2:
            raise TranslationError(0, f"entry {i}: pfn {pfn:#x} type {code:#x} cannot be encoded", i)
        out[i] = (code << 32) | pfn
        data += code not in _DATALESS_CODES
    return data


def python_mark_pfns(pfns: Sequence[int], low: int, marks) -> int:
    """marks[pfn - low] = 1 for each pfn (duplicates allowed); returns how many pfns. A pfn outside
    low..low+len(marks)-1 raises TranslationError naming it (marks before it are already set)."""
    size = len(marks)
    for i, pfn in enumerate(pfns):
        offset = pfn - low
        if not 0 <= offset < size:
            raise TranslationError(0, f"entry {i}: pfn {pfn:#x} outside the {size} pfns from {low:#x}", i)
        marks[offset] = 1
    return len(pfns)


