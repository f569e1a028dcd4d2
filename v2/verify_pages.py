"""Whole-array checks of a PAGE_DATA record's pfns, done with C-level builtins (max, set, tuple
comparison, tuple.count) rather than a Python loop per pfn, so a 4 GiB stream's million pfns stay cheap."""

from __future__ import annotations

from xenstream.hv.abi import PAGETYPE_LPINTAB

# Beyond this many entries a record is not checked for repeated pfns (Xen's saver writes 1024 at most);
# the check would otherwise need memory in proportion to a claimed count.
DUPLICATE_CHECK_LIMIT = 1 << 16

TABLE_TYPES = tuple(level | pin for level in (1, 2, 3, 4) for pin in (0, PAGETYPE_LPINTAB))


RUN_CHUNK = 4096


def is_ascending_run(pfns: tuple[int, ...]) -> bool:
    """pfns are first, first+1, ..., the saver's usual batch; recognising it costs one tuple comparison
    per RUN_CHUNK entries (never a comparison tuple as long as a huge record)."""
    first = pfns[0]
    count = len(pfns)
    if pfns[-1] - first != count - 1:
        return False
    return all(pfns[i:i + RUN_CHUNK] == tuple(range(first + i, first + min(i + RUN_CHUNK, count)))
               for i in range(0, count, RUN_CHUNK))


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
