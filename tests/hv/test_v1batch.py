"""The compiled v1 batch checks (xenstream.hv.v1batch) agree with their pure-Python twins in legacy/walk.py
and convert/transform.py on random pfn_type arrays, good and bad: the same data-page count and the same
v2 words, or (where the compiled check declines) the same error at the same offset."""

from __future__ import annotations

import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstream.convert import transform
from xenstream.convert.transform import _v2_pfn_words
from xenstream.hv import v1batch
from xenstream.legacy.errors import StreamError as LegacyStreamError
from xenstream.legacy.walk import Walker

pytestmark = pytest.mark.skipif(not v1batch.COMPILED, reason="the cffi kernels are not built")

P2M_SIZE = 300
_TYPES = [0x0, 0x1, 0x2, 0x3, 0x4, 0x9, 0xA, 0xB, 0xC, 0x8, 0xD, 0xE, 0xF, 0x5, 0x7]


def _entry(draw, width: int) -> int:
    kind = draw(st.sampled_from(["page", "page", "page", "bare-xtab", "upper-bits", "far-pfn"]))
    if kind == "bare-xtab":
        return 0xF0000000
    pfn = draw(st.integers(0, P2M_SIZE + 20 if kind == "far-pfn" else P2M_SIZE - 1))
    entry = (draw(st.sampled_from(_TYPES)) << 28) | pfn
    if kind == "upper-bits" and width == 8:
        entry |= draw(st.integers(1, 0xFF)) << 32
    return entry


@st.composite
def batches(draw):
    width = draw(st.sampled_from([4, 8]))
    if draw(st.booleans()):  # the usual shape: an ascending run, perhaps with XTAB holes
        first = draw(st.integers(0, P2M_SIZE - 1))
        count = draw(st.integers(1, min(64, P2M_SIZE - first)))
        entries = [(draw(st.sampled_from(_TYPES[:12])) << 28) | (first + k) for k in range(count)]
        for k in draw(st.lists(st.integers(0, count - 1), max_size=4)):
            entries[k] = 0xF0000000
    else:
        entries = [_entry(draw, width) for _ in range(draw(st.integers(1, 64)))]
    return width, array.array("I" if width == 4 else "Q", entries)


def _walker(width: int) -> Walker:
    walker = Walker.__new__(Walker)
    walker._word, walker._array_code, walker._p2m_size = width, "I" if width == 4 else "Q", P2M_SIZE
    return walker


def _outcome(call):
    try:
        return ("ok", call())
    except LegacyStreamError as exc:
        return ("error", str(exc), exc.offset)


@settings(max_examples=400, deadline=None)
@given(batches())
def test_batch_check_agrees_with_the_walkers_own(batch):
    width, entries = batch
    raw = memoryview(entries.tobytes())
    compiled = _outcome(lambda: _walker(width)._check_entries(entries, raw, 100))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(v1batch, "_lib", None)
        twin = _outcome(lambda: _walker(width)._check_entries(entries, raw, 100))
    assert compiled == twin
    if compiled[0] == "ok":
        assert v1batch.check_legacy_batch(raw, width, P2M_SIZE) == compiled[1]  # it answered itself


@settings(max_examples=400, deadline=None)
@given(batches())
def test_batch_words_agree_with_the_transformers_own(batch):
    _, entries = batch
    compiled = _outcome(lambda: bytes(_v2_pfn_words(entries, 100)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transform.v1batch, "_lib", None)
        twin = _outcome(lambda: bytes(_v2_pfn_words(entries, 100)))
    assert compiled == twin
    # it answered itself where the batch is good, and declined (leaving the error to the twin) where not
    answered = v1batch.legacy_batch_words(entries, entries.itemsize)
    assert (bytes(answered) if answered is not None else None) == (twin[1] if twin[0] == "ok" else None)


def test_declines_rather_than_judges_a_bad_batch():
    assert v1batch.check_legacy_batch(array.array("I", [0x5000_0001]), 4, P2M_SIZE) is None  # undefined type
    assert v1batch.check_legacy_batch(array.array("I", [1, 2, 1]), 4, P2M_SIZE) is None  # pfn 1 twice
    assert v1batch.check_legacy_batch(array.array("I", [0xF000_0000, 0xF000_0000, 0]), 4, P2M_SIZE) == 1
    assert v1batch.legacy_batch_words(array.array("Q", [7, 0x1000_0007]), 8) is None
