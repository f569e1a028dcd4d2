"""Whole-array checks of a PAGE_DATA record's pfns, done with C-level builtins (max, set, array
comparison, count) rather than a Python loop per pfn, so a 4 GiB stream's million pfns stay cheap."""

from __future__ import annotations

from array import array

from xenstream.hv.abi import PAGETYPE_LPINTAB
from xenstream.hv.u64runs import is_consecutive

# Beyond this many entries a record is not checked for repeated pfns (Xen's saver writes 1024 at most);
# the check would otherwise need memory in proportion to a claimed count.
DUPLICATE_CHECK_LIMIT = 1 << 16

TABLE_TYPES = tuple(level | pin for level in (1, 2, 3, 4) for pin in (0, PAGETYPE_LPINTAB))


RUN_CHUNK = 4096


def is_ascending_run(pfns) -> bool:
    """pfns are first, first+1, ..., the saver's usual batch. Compared RUN_CHUNK entries at a time as
    u64 arrays (one memcmp each; never a comparison array as long as a huge record). Takes the
    array('Q') that PageData carries, or any sequence of ints."""
    first = pfns[0]
    count = len(pfns)
    if pfns[-1] - first != count - 1:
        return False
    if not (isinstance(pfns, array) and pfns.typecode == "Q"):
        pfns = array("Q", pfns)
    return all(is_consecutive(pfns[i:i + RUN_CHUNK], first + i) for i in range(0, count, RUN_CHUNK))


def first_duplicate(pfns: tuple[int, ...], ascending_run: bool) -> int | None:
    """The first pfn that appears twice, None if all differ (or the record is too long to check)."""
    count = len(pfns)
    if count < 2 or ascending_run:
        return None
    if count > DUPLICATE_CHECK_LIMIT or len(set(pfns)) == count:
        return None
    seen: set[int] = set()
    for pfn in pfns:
        if pfn in seen:
            return pfn
        seen.add(pfn)
    return None


def first_above(pfns: tuple[int, ...], limit: int) -> tuple[int, int] | None:
    """(index, pfn) of the first pfn greater than limit, None if there is none."""
    if not pfns or max(pfns) <= limit:
        return None
    return next((i, p) for i, p in enumerate(pfns) if p > limit)


def table_count(types: tuple[int, ...]) -> int:
    """How many entries are typed as pagetables (L1-L4, pinned or not)."""
    present = set(types)
    return sum(types.count(t) for t in TABLE_TYPES if t in present)
