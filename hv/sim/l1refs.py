"""Validating an L1 table: the simulator's hottest loop (every pin and root of a restored guest).

`python_take_l1_refs` is the pure-Python twin of the cffi kernel `xs_take_l1_refs`; call it through
`xenstream.hv.kernels.take_l1_refs`. For each present entry it checks the flags, that the frame is
RAM owned by `domid`, and for a writable mapping of a non-special frame takes a "writable" type
reference (refused while the frame is typed otherwise).

Result: the number of references taken (their slots in `taken[:n]`), or a negative failure code
`-(1 + (index << 2 | reason))` with `taken[:n]` still listing the references taken before it, n
returned through `taken_count[0]`, so the caller can roll them back.
"""

from __future__ import annotations

from xenstream.hv import abi

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
