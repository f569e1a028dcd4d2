"""The simulator's own hot loops, run per frame on every batch the engines send (twins of cffi kernels).

Call them through `xenstream.hv.kernels` (`take_l1_refs`, `frame_slots`, `slot_runs`, `page_type_codes`), which
picks the compiled `xs_*` function when built. All work on the Machine's per-slot arrays.

`python_take_l1_refs` validates an L1 table (every pin and root of a restored guest). For each
present entry it checks the flags, that the frame is
RAM owned by `domid`, and for a writable mapping of a non-special frame takes a "writable" type
reference (refused while the frame is typed otherwise).

Result: the number of references taken (their slots in `taken[:n]`), or a negative failure code
`-(1 + (index << 2 | reason))` with `taken[:n]` still listing the references taken before it, n
returned through `taken_count[0]`, so the caller can roll them back.
"""

from __future__ import annotations

from xenstream.hv import abi
from xenstream.hv.sim.machine import FLAG_BROKEN, FLAG_PINNED, FLAG_SPECIAL, FLAG_VALIDATED

L1_REFUSED_FLAGS = 1
L1_NOT_OWNED = 2
L1_WRITABLE_TYPED = 3


def encode_failure(index: int, reason: int) -> int:
    return -(1 + (index << 2 | reason))


def decode_failure(result: int) -> tuple[int, int]:
    """(entry index, reason) of a negative result."""
    code = -1 - result
    return code >> 2, code & 3


def python_take_l1_refs(page, ext_of, max_mfn: int, owner, ptype, tcount, flags, domid: int, refused: int,
                        writable_type: int, special_flag: int, taken, taken_count) -> int:
    count = 0
    frame_mask = abi.PTE_FRAME_MASK
    for index, pte in enumerate(memoryview(page).cast("B").cast("Q")):
        if not pte & 1:
            continue
        if pte & refused:
            taken_count[0] = count
            return encode_failure(index, L1_REFUSED_FLAGS)
        mfn = (pte & frame_mask) >> 12
        extent = ext_of[mfn >> 9] if mfn < max_mfn else 0
        child = ((extent - 1) << 9) | (mfn & 511) if extent else -1
        if child < 0 or owner[child] != domid:
            taken_count[0] = count
            return encode_failure(index, L1_NOT_OWNED)
        if pte & abi.PTE_RW and not flags[child] & special_flag:
            references = tcount[child]
            if references and ptype[child] != writable_type:
                taken_count[0] = count
                return encode_failure(index, L1_WRITABLE_TYPED)
            ptype[child] = writable_type
            tcount[child] = references + 1
            taken[count] = child
            count += 1
    taken_count[0] = count
    return count


def python_frame_slots(mfns, ext_of, max_mfn: int, owner, ptype, tcount, domid: int, writable: int,
                       writable_type: int, slots) -> int:
    """Slot of each frame `domid` may map (a writable mapping also needs the frame untyped or writable),
    -1 for the others; returns how many can be mapped."""
    mapped = 0
    for i, mfn in enumerate(mfns):
        extent = ext_of[mfn >> 9] if 0 <= mfn < max_mfn else 0
        slot = ((extent - 1) << 9) | (mfn & 511) if extent else -1
        if slot >= 0 and (owner[slot] != domid or (writable and tcount[slot] and ptype[slot] != writable_type)):
            slot = -1
        slots[i] = slot
        mapped += slot >= 0
    return mapped


def python_page_type_codes(mfns, ext_of, max_mfn: int, owner, ptype, tcount, flags, domid: int,
                           type_levels: bytes, codes) -> None:
    """The page-type query (xen/arch/x86/domctl.c getpageframeinfo3) over a batch of frames.

    `type_levels[ptype]` is the table level of each machine type (0: not a table).
    """
    for i, mfn in enumerate(mfns):
        extent = ext_of[mfn >> 9] if 0 <= mfn < max_mfn else 0
        slot = ((extent - 1) << 9) | (mfn & 511) if extent else -1
        if slot < 0 or owner[slot] != domid or flags[slot] & FLAG_SPECIAL:
            codes[i] = abi.PFINFO_XTAB
            continue
        f = flags[slot]
        if f & FLAG_BROKEN:
            codes[i] = abi.PFINFO_BROKEN
        elif f & FLAG_PINNED:
            codes[i] = (type_levels[ptype[slot]] << abi.PFINFO_LTAB_SHIFT) | abi.PFINFO_LPINTAB
        elif tcount[slot] and f & FLAG_VALIDATED:
            codes[i] = type_levels[ptype[slot]] << abi.PFINFO_LTAB_SHIFT
        else:
            codes[i] = abi.PFINFO_NOTAB


def python_slot_runs(slots, starts, counts) -> int:
    """Split a batch's slots (-1 = unmappable) into runs of consecutive slots: run k covers batch
    entries starts[k] .. starts[k] + counts[k] - 1. Returns the number of runs."""
    runs = 0
    previous = -2
    for i, slot in enumerate(slots):
        if slot < 0:
            previous = -2
            continue
        if slot == previous + 1:
            counts[runs - 1] += 1
        else:
            starts[runs] = i
            counts[runs] = 1
            runs += 1
        previous = slot
    return runs
