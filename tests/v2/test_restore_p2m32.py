"""The P2M a 32-bit guest gets back is its 64-bit table narrowed entry by entry: INVALID becomes
INVALID_MFN_32, any other entry must fit 32 bits (else the restore fails cleanly)."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenstream.hv import abi
from xenstream.v2.restore import _Fail, _p2m_as_u32

_ENTRY = st.one_of(st.integers(0, 0xFFFF_FFFE), st.just(abi.INVALID_MFN))


@given(st.lists(_ENTRY, max_size=300))
def test_narrowing_matches_the_entrywise_rule(entries):
    narrowed = _p2m_as_u32(array("Q", entries))
    assert list(narrowed) == [abi.INVALID_MFN_32 if m == abi.INVALID_MFN else m for m in entries]


@pytest.mark.parametrize("bad", [1 << 32, abi.INVALID_MFN - 1, (0xFFFF_FFFF << 32) | 5, 0xFFFF_FFFF << 32])
@given(st.lists(_ENTRY, max_size=50), st.data())
def test_an_entry_beyond_32_bits_is_refused(bad, entries, data):
    position = data.draw(st.integers(0, len(entries)))
    with pytest.raises(_Fail):
        _p2m_as_u32(array("Q", entries[:position] + [bad] + entries[position:]))
