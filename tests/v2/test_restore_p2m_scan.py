"""The restore engine's C-speed scan for unpopulated pfns agrees with a plain membership test."""

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from xenstream.v2.restore import INVALID, _has_invalid

# Entries a restore's P2M holds: INVALID, or an mfn (x86 physical addresses stay below 2**52).
_ENTRY = st.one_of(st.just(INVALID), st.integers(min_value=0, max_value=(1 << 52) - 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(_ENTRY, max_size=64), st.data())
def test_has_invalid_matches_membership(entries, data):
    p2m = array("Q", entries)
    low = data.draw(st.integers(min_value=0, max_value=len(p2m)))
    high = data.draw(st.integers(min_value=low, max_value=len(p2m)))
    assert _has_invalid(p2m, low, high) == (INVALID in p2m[low:high])


def test_has_invalid_ignores_entries_outside_the_range():
    p2m = array("Q", [INVALID, 5, (1 << 52) - 1, INVALID])
    assert not _has_invalid(p2m, 1, 3)
    assert _has_invalid(p2m, 0, 1)
    assert _has_invalid(p2m, 3, 4)
