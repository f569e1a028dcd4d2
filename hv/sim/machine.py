"""The simulated host: machine frames, their owners and types, the frame allocator and the M2P.

Frame contents live in one lazily-committed anonymous mapping, indexed by a dense *slot*. Machine
frame numbers are a seeded, scattered relabelling of those slots in 2 MiB extents: low extents below
2**32 frames (the only ones a 32-bit guest may get) and, with `high_memory`, extents at and above
2**32 frames, so 64-bit guests see mfns that do not fit in 32 bits. Within an extent handed out
frame by frame the order is shuffled, so even order-0 allocations are not identity-like.

Metadata is struct-of-arrays per slot (owner, type, type count, flags), the M2P is a sparse u64
table indexed by mfn (untouched entries cost nothing and read 0, i.e. junk), exactly what the
engines get from `m2p_view()`.
"""

from __future__ import annotations

import errno
import mmap
import random
from array import array

from xenstream.hv import abi
from xenstream.hv.interface import HypervisorError

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

OWNER_FREE = 0xFFFF

# Per-frame use, as Xen's type_info tracks it (the PFINFO level is derived from it).
TYPE_NONE = 0
TYPE_L1 = 1
TYPE_L2 = 2
TYPE_L3 = 3
TYPE_L4 = 4
TYPE_PAE_XEN_L2 = 5  # a PAE L2 named by L3 slot 3: carries Xen's compat slots 428-511
TYPE_WRITABLE = 6
TYPE_SEG_DESC = 7
TYPE_LEVEL = {TYPE_L1: 1, TYPE_L2: 2, TYPE_L3: 3, TYPE_L4: 4, TYPE_PAE_XEN_L2: 2}

FLAG_VALIDATED = 1
FLAG_PINNED = 2
FLAG_BROKEN = 4
FLAG_SPECIAL = 8  # shared_info, grant frames: owned by the domain but never guest RAM

HIGH_MFN_BASE = 1 << 32
LOW_EXTENT_FIRST = 16  # Xen's own low memory sits below this


def _anonymous(size: int, sparse: bool = True) -> mmap.mmap:
    """Zero-filled memory committed on first touch. Sparse tables skip the overcommit accounting;
    dense frame memory keeps it and asks for transparent huge pages (with THP in "madvise" mode only an
    madvise gets them): a 2 MiB extent is then one TLB entry, which makes fills 2x and copies of guest
    memory to or from files 3-4x faster (4 KiB pages cost a page walk each, a nested one in a VM)."""
    size = max(size, mmap.PAGESIZE)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if not sparse:
        try:
            memory = mmap.mmap(-1, size, flags=flags)
        except OSError:
            pass
        else:
            if hasattr(mmap, "MADV_HUGEPAGE"):
                memory.madvise(mmap.MADV_HUGEPAGE)
            return memory
    return mmap.mmap(-1, size, flags=flags | MAP_NORESERVE)


class Machine:
    """Host memory. `capacity_frames` is rounded up to whole 2 MiB extents."""

    def __init__(self, capacity_frames: int = 1 << 20, seed: int = 0, high_memory: bool = True) -> None:
        extents = -(-capacity_frames // abi.SUPERPAGE_FRAMES)
        self.capacity = extents * abi.SUPERPAGE_FRAMES
        rng = random.Random(f"machine:{seed}")
        low_count = extents if not high_memory else max(extents // 2, 1)
        high_count = extents - low_count
        # Low extents scattered below 2**31 frames, high ones in a window just above 2**32 frames.
        low = rng.sample(range(LOW_EXTENT_FIRST, LOW_EXTENT_FIRST + 8 * extents + 64), low_count)
        high_first = HIGH_MFN_BASE >> abi.SUPERPAGE_ORDER
        high = [high_first + e for e in rng.sample(range(4 * high_count + 8), high_count)] if high_count else []
        self.extent_mfn_base = array("Q", [e << abi.SUPERPAGE_ORDER for e in low + high])
        highest_extent = max(low + high)
        self.max_mfn = (highest_extent + 1) << abi.SUPERPAGE_ORDER  # Xen's max_page: highest + 1

        self.memory = _anonymous(self.capacity * abi.PAGE_SIZE, sparse=False)
        self.memview = memoryview(self.memory)
        self.readonly_memview = self.memview.toreadonly()
        self._ext_map = _anonymous((highest_extent + 1) * 4)
        self.slot_extent_of = memoryview(self._ext_map).cast("I")  # mfn >> 9 -> slot extent + 1
        for slot_extent, base in enumerate(self.extent_mfn_base):
            self.slot_extent_of[base >> abi.SUPERPAGE_ORDER] = slot_extent + 1
        m2p_entries = -(-self.max_mfn // (1 << 18)) * (1 << 18)  # whole 2 MiB chunks of u64
        self._m2p_map = _anonymous(m2p_entries * 8)
        self.m2p = memoryview(self._m2p_map).cast("Q")

        self.owner = array("H", [OWNER_FREE]) * self.capacity
        self.ptype = bytearray(self.capacity)
        self.tcount = array("I", [0]) * self.capacity
        self.flags = bytearray(self.capacity)

        self._rng = rng
        self._free_low = list(range(low_count))
        self._free_high = list(range(low_count, extents))
        rng.shuffle(self._free_low)
        rng.shuffle(self._free_high)
        self._loose_low: list[int] = []  # single free slots, in handing-out order
        self._loose_high: list[int] = []
        # Xen heap (shared_info, grant frames): the lowest extent, so machine addresses fit 32 bits.
        self._heap_extent = heap_extent = min(range(low_count), key=lambda e: self.extent_mfn_base[e])
        self._free_low.remove(heap_extent)
        self._xenheap = list(range(heap_extent << abi.SUPERPAGE_ORDER, (heap_extent + 1) << abi.SUPERPAGE_ORDER))
        self._xenheap.reverse()

        # Xen's own frames: the compat M2P (first chunk is what PAE guests' top L2 maps at slot 428)
        # and the L3s behind the 16 Xen slots of every 64-bit L4.
        compat = self.allocate(abi.DOMID_XEN, 1, abi.SUPERPAGE_ORDER, low_only=True)[0]
        self.compat_m2p_mfn0 = compat
        self.xen_l4_slot_frames = self.allocate(abi.DOMID_XEN, len(abi.L4_XEN_SLOTS_64), 0, low_only=True)

    # -- addressing -----------------------------------------------------------------------------

    def slot_of(self, mfn: int) -> int:
        """Dense slot of a machine frame, or -1 if `mfn` is not RAM."""
        if mfn < 0 or mfn >= self.max_mfn:
            return -1
        extent = self.slot_extent_of[mfn >> abi.SUPERPAGE_ORDER]
        if not extent:
            return -1
        return ((extent - 1) << abi.SUPERPAGE_ORDER) | (mfn & (abi.SUPERPAGE_FRAMES - 1))

    def mfn_of_slot(self, slot: int) -> int:
        return self.extent_mfn_base[slot >> abi.SUPERPAGE_ORDER] | (slot & (abi.SUPERPAGE_FRAMES - 1))

    def frame(self, mfn: int) -> memoryview:
        slot = self.slot_of(mfn)
        if slot < 0:
            raise HypervisorError(errno.EINVAL, f"mfn {mfn:#x} is not RAM")
        return self.memview[slot * abi.PAGE_SIZE:(slot + 1) * abi.PAGE_SIZE]

    def slot_frame(self, slot: int) -> memoryview:
        return self.memview[slot * abi.PAGE_SIZE:(slot + 1) * abi.PAGE_SIZE]

    # -- allocation -----------------------------------------------------------------------------

    def free_frames(self, low_only: bool = False) -> int:
        total = len(self._free_low) * abi.SUPERPAGE_FRAMES + len(self._loose_low)
        if not low_only:
            total += len(self._free_high) * abi.SUPERPAGE_FRAMES + len(self._loose_high)
        return total

    def allocate(self, owner: int, count: int, order: int, low_only: bool = False) -> list[int]:
        """`count` extents of 2**order frames for `owner`; returns each extent's first mfn.

        Fails with ENOMEM, allocating nothing, if the host cannot satisfy all of them.
        """
        if order not in (0, abi.SUPERPAGE_ORDER):
            raise HypervisorError(errno.EINVAL, f"unsupported extent order {order}")
        if order:
            pools = [self._free_low] if low_only else [self._free_low, self._free_high]
            if sum(len(p) for p in pools) < count:
                raise HypervisorError(errno.ENOMEM, "no free 2 MiB extent")
            firsts = []
            for _ in range(count):
                pool = self._pick_pool(pools)
                slot_extent = pool.pop()
                first_slot = slot_extent << abi.SUPERPAGE_ORDER
                self._claim(range(first_slot, first_slot + abi.SUPERPAGE_FRAMES), owner)
                firsts.append(self.extent_mfn_base[slot_extent])
            return firsts
        if self.free_frames(low_only) < count:
            raise HypervisorError(errno.ENOMEM, "out of host frames")
        slots = []
        for _ in range(count):
            use_high = not low_only and self._prefer_high()
            loose, extents = (self._loose_high, self._free_high) if use_high else (self._loose_low, self._free_low)
            if not loose:
                if not extents:
                    loose, extents = (self._loose_low, self._free_low) if use_high else (self._loose_high, self._free_high)
                    if not loose and not extents:
                        raise HypervisorError(errno.ENOMEM, "out of host frames")
                if not loose:
                    first = extents.pop() << abi.SUPERPAGE_ORDER
                    fresh = list(range(first, first + abi.SUPERPAGE_FRAMES))
                    self._rng.shuffle(fresh)
                    loose.extend(fresh)
            slots.append(loose.pop())
        self._claim(slots, owner)
        return [self.mfn_of_slot(s) for s in slots]

    def allocate_xenheap(self, owner: int, count: int) -> list[int]:
        """Frames Xen allocates for itself on a domain's behalf, all below 4 GiB."""
        if len(self._xenheap) < count:
            raise HypervisorError(errno.ENOMEM, "Xen heap exhausted")
        slots = [self._xenheap.pop() for _ in range(count)]
        self._claim(slots, owner)
        return [self.mfn_of_slot(s) for s in slots]

    def _prefer_high(self) -> bool:
        return bool(self._free_high or self._loose_high) and self._rng.random() < 0.5

    def _pick_pool(self, pools: list[list[int]]) -> list[int]:
        live = [p for p in pools if p]
        return live[0] if len(live) == 1 else live[self._rng.randrange(len(live))]

    def _claim(self, slots, owner: int) -> None:
        if isinstance(slots, range):
            n = len(slots)
            self.owner[slots.start:slots.stop] = array("H", [owner]) * n
            self.ptype[slots.start:slots.stop] = bytes(n)
            self.tcount[slots.start:slots.stop] = array("I", [0]) * n
            self.flags[slots.start:slots.stop] = bytes(n)
            return
        for slot in slots:
            self.owner[slot] = owner
            self.ptype[slot] = TYPE_NONE
            self.tcount[slot] = 0
            self.flags[slot] = 0

    def release(self, mfn: int) -> None:
        """Give a frame back to the host: contents dropped, M2P entry invalidated."""
        slot = self.slot_of(mfn)
        self.owner[slot] = OWNER_FREE
        self.ptype[slot] = TYPE_NONE
        self.tcount[slot] = 0
        self.flags[slot] = 0
        self.m2p[mfn] = abi.INVALID_MFN
        self.slot_frame(slot)[:] = bytes(abi.PAGE_SIZE)
        if self._is_xenheap_slot(slot):
            self._xenheap.append(slot)
        else:
            (self._loose_high if mfn >= HIGH_MFN_BASE else self._loose_low).append(slot)

    def release_all(self, owner: int) -> int:
        """Give back every frame of `owner` (domain destruction); returns how many."""
        owned = [slot for slot, who in enumerate(self.owner) if who == owner]
        extent_frames = abi.SUPERPAGE_FRAMES
        by_extent: dict[int, list[int]] = {}
        for slot in owned:
            by_extent.setdefault(slot >> abi.SUPERPAGE_ORDER, []).append(slot)
        m2p = self.m2p
        invalid_extent = array("Q", [abi.INVALID_MFN]) * extent_frames
        for extent, slots in by_extent.items():
            if len(slots) == extent_frames:
                first, base = extent * extent_frames, self.extent_mfn_base[extent]
                m2p[base:base + extent_frames] = invalid_extent
                self.owner[first:first + extent_frames] = array("H", [OWNER_FREE]) * extent_frames
                self.ptype[first:first + extent_frames] = bytes(extent_frames)
                self.tcount[first:first + extent_frames] = array("I", bytes(4 * extent_frames))
                self.flags[first:first + extent_frames] = bytes(extent_frames)
            else:
                for slot in slots:
                    m2p[self.mfn_of_slot(slot)] = abi.INVALID_MFN
                    self.owner[slot] = OWNER_FREE
                    self.ptype[slot] = TYPE_NONE
                    self.tcount[slot] = 0
                    self.flags[slot] = 0
            if extent == self._heap_extent:
                for slot in slots:
                    self.slot_frame(slot)[:] = bytes(abi.PAGE_SIZE)
                self._xenheap.extend(slots)
                continue
            high = self.extent_mfn_base[extent] >= HIGH_MFN_BASE
            if len(slots) == extent_frames:
                # A whole extent: drop its memory (reads back as zeros) and make it allocatable as 2 MiB again.
                self.memory.madvise(mmap.MADV_DONTNEED, extent * extent_frames * abi.PAGE_SIZE,
                                    extent_frames * abi.PAGE_SIZE)
                (self._free_high if high else self._free_low).append(extent)
            else:
                for slot in slots:
                    self.slot_frame(slot)[:] = bytes(abi.PAGE_SIZE)
                (self._loose_high if high else self._loose_low).extend(slots)
        return len(owned)

    def _is_xenheap_slot(self, slot: int) -> bool:
        return slot >> abi.SUPERPAGE_ORDER == self._heap_extent
