"""hv.u64runs: runs of consecutive u64 values built with big-int arithmetic equal array(range(...))."""

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstream.hv.u64runs import consecutive, is_consecutive

U64 = 1 << 64


@settings(max_examples=200, deadline=None)
@given(first=st.one_of(st.integers(0, 1 << 20), st.integers(0, U64 - 1)), count=st.integers(0, 1100))
def test_consecutive_is_the_range(first, count):
    if first + count > U64:
        with pytest.raises(OverflowError):
            consecutive(first, count)
        return
    run = consecutive(first, count)
    assert run.typecode == "Q"
    assert run == array("Q", range(first, first + count))


@settings(max_examples=200, deadline=None)
@given(first=st.integers(0, 1 << 52), count=st.integers(1, 1024), data=st.data())
def test_is_consecutive_only_for_the_exact_run(first, count, data):
    values = array("Q", range(first, first + count))
    assert is_consecutive(values, first)
    assert not is_consecutive(values, first + 1)
    index = data.draw(st.integers(0, count - 1))
    changed = data.draw(st.integers(0, U64 - 1).filter(lambda v: v != values[index]))
    values[index] = changed
    assert not is_consecutive(values, first)


def test_runs_at_the_top_of_u64():
    assert consecutive(U64 - 2, 2).tolist() == [U64 - 2, U64 - 1]
    assert not is_consecutive(array("Q", [U64 - 1]), U64)
    with pytest.raises(OverflowError):
        consecutive(-1, 2)
