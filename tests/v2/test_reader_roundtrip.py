"""Writer -> reader round trips: every stream fed whole, one byte at a time and in random chunks gives the
same events, and those events hold exactly what was written."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.v2.codec_strategies import chunked, read_events, streams
from xenstream.v2.events import EndOfStream, Header, LibxcRecord, LibxlRecord
from xenstream.v2.records import PageData


def decoded(events):
    """What the events say was written, in the shape codec_strategies.streams() records it."""
    out = []
    for event in events:
        if isinstance(event, Header):
            out.append(event.header)
        elif isinstance(event, (LibxcRecord, LibxlRecord)):
            if isinstance(event.body, PageData) and event.body.page_count:
                out.append([event.body, None])
            elif isinstance(event.body, PageData):
                out.append((event.body, b""))
            else:
                out.append(event.body)
        elif isinstance(event, tuple):
            out[-1][1] = event[3]
            out[-1] = tuple(out[-1])
    return out


def check_offsets(events, total):
    offsets = [e[2] if isinstance(e, tuple) else e.offset for e in events]
    assert offsets == sorted(offsets)
    assert isinstance(events[-1], EndOfStream) and events[-1].offset == total


@settings(max_examples=150, deadline=None)
@given(stream=streams(), sizes=st.lists(st.integers(1, 9000), min_size=1, max_size=8))
def test_whole_and_random_chunks_agree(stream, sizes):
    data, written = stream
    whole = read_events([data])
    assert decoded(whole) == written
    check_offsets(whole, len(data))
    assert read_events(chunked(data, sizes)) == whole
    assert whole[-1].complete == any(type(x).__name__ in ("End", "LibxlEnd") for x in written[-1:])


@settings(max_examples=25, deadline=None)
@given(stream=streams())
def test_byte_by_byte_agrees(stream):
    data, _ = stream
    assert read_events(chunked(data, [1])) == read_events([data])


@settings(max_examples=60, deadline=None)
@given(stream=streams(), sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=5))
def test_non_strict_reader_agrees_on_clean_streams(stream, sizes):
    data, _ = stream
    assert read_events(chunked(data, sizes), strict=False) == read_events([data])


@settings(max_examples=60, deadline=None)
@given(stream=streams(), read_size=st.integers(1, 9000), move_directly=st.booleans())
def test_passthrough_driver_agrees_with_views(stream, read_size, move_directly):
    from tests.v2.test_reader_layers import drive_passthrough

    data, _ = stream
    views = read_events([data])
    events, payload = drive_passthrough(data, read_size, move_directly)
    assert events == [e for e in views if not isinstance(e, tuple)]
    assert payload == b"".join(e[3] for e in views if isinstance(e, tuple))
