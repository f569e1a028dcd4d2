"""The HVM restorer's record of populated gfns costs what is populated, not how far apart the gfns are
(they come from the stream unchecked), and answers like a plain set of gfns."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from xenstream.v2.restore_hvm import _CHUNK, _Populated

_GFN = st.integers(0, (1 << 40) - 1)


def test_far_apart_gfns_cost_one_small_chunk_each():
    populated = _Populated()
    far = [k << 30 for k in range(64)] + [(1 << 40) - 1]
    populated.mark(far)
    assert len(populated._chunks) == len(far)
    assert sum(len(chunk) for chunk in populated._chunks.values()) == len(far) * _CHUNK <= 64 << 10


@given(st.lists(st.one_of(st.tuples(st.just("mark"), st.lists(_GFN, max_size=8)),
                          st.tuples(st.just("run"), st.tuples(st.integers(0, 5000), st.integers(1, 2100)))),
                max_size=12),
       st.lists(st.tuples(st.integers(0, 8000), st.integers(1, 2100)), max_size=8), st.lists(_GFN, max_size=8))
def test_answers_like_a_set(operations, probes, singles):
    populated, model = _Populated(), set()
    for kind, argument in operations:
        if kind == "mark":
            populated.mark(argument)
            model.update(argument)
        else:
            first, count = argument
            populated.mark_run(first, count)
            model.update(range(first, first + count))
    for first, count in probes:
        assert populated.run_missing(first, count) == model.isdisjoint(range(first, first + count))
    for gfn in singles + sorted(model)[:50]:
        assert (gfn in populated) == (gfn in model)
