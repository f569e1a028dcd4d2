"""Layer hand-over (libxl <-> libxc), checkpointed and COLO streams, passthrough payloads, view lifetime."""

from __future__ import annotations

import io

import pytest

from tests.v2.codec_strategies import chunked, read_events
from xenstream.hv.abi import PAGE_SIZE
from xenstream.v2 import libxl_records as L
from xenstream.v2 import records as R
from xenstream.v2.errors import MalformedStream, TruncatedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, Header, LibxcRecord, LibxlRecord, PagePayload
from xenstream.v2.reader import V2Reader
from xenstream.v2.synth import stream_bytes
from xenstream.v2.writer import V2Writer


def kinds(events):
    out = []
    for e in events:
        if isinstance(e, Header):
            out.append(type(e.header).__name__)
        elif isinstance(e, (LibxcRecord, LibxlRecord)):
            out.append(("xl:" if isinstance(e, LibxlRecord) else "") + type(e.body).__name__)
    return out


def checkpointed_libxl(colo: bool, checkpoints: int = 2) -> bytes:
    sink = io.BytesIO()
    w = V2Writer(sink)
    w.libxl_header()
    w.libxl_record(L.LibxcContext())
    w.image_header()
    w.domain_header(R.DomainHeader(guest_type=2))
    w.record(R.StaticDataEnd())
    for n in range(checkpoints):
        w.page_data([n], [0], [bytes([n]) * PAGE_SIZE])
        w.record(R.HvmContext(b"ctx"))
        w.record(R.Checkpoint())
        w.libxl_record(L.EmulatorContext(2, 0, b"qemu"))
        w.libxl_record(L.CheckpointEnd())
        if colo:
            w.libxl_record(L.CheckpointState(0))
    return sink.getvalue()


def test_checkpointed_libxl_stream_alternates_layers():
    data = checkpointed_libxl(colo=False)
    events = read_events(chunked(data, [5, 4099]))
    assert kinds(events) == [
        "LibxlHeader", "xl:LibxcContext", "ImageHeader", "DomainHeader", "StaticDataEnd",
        "PageData", "HvmContext", "Checkpoint", "xl:EmulatorContext", "xl:CheckpointEnd",
        "PageData", "HvmContext", "Checkpoint", "xl:EmulatorContext", "xl:CheckpointEnd",
    ]
    assert events[-1] == EndOfStream(offset=len(data), complete=False, checkpoints=2)
    libxc_indexes = [e.index for e in events if isinstance(e, LibxcRecord)]
    assert libxc_indexes == list(range(7))


def test_colo_stream_needs_colo_option():
    data = checkpointed_libxl(colo=True)
    events = read_events([data], colo=True)
    assert kinds(events).count("xl:CheckpointState") == 2
    assert events[-1].complete is False and events[-1].checkpoints == 2
    with pytest.raises(MalformedStream):
        read_events([data])


def test_colo_checkpoint_state_is_required():
    data = checkpointed_libxl(colo=False)
    with pytest.raises(MalformedStream, match="expected CHECKPOINT_STATE"):
        read_events([data], colo=True)


def test_cut_inside_a_checkpoint_is_truncated():
    data = checkpointed_libxl(colo=False)
    last_checkpoint_end = len(data) - 8
    with pytest.raises(TruncatedStream):
        read_events([data[:last_checkpoint_end]])


def test_checkpointed_stream_may_end_with_end():
    sink = io.BytesIO()
    w = V2Writer(sink)
    w.image_header()
    w.domain_header(R.DomainHeader(guest_type=1))
    w.record(R.Checkpoint())
    w.record(R.Checkpoint())
    w.record(R.End())
    data = sink.getvalue()
    assert read_events([data])[-1] == EndOfStream(offset=len(data), complete=True, checkpoints=2)
    assert read_events([data[:-8]])[-1] == EndOfStream(offset=len(data) - 8, complete=False, checkpoints=2)


@pytest.mark.parametrize("layer, wrap", [("libxc", "libxc"), ("libxl", "libxl"), ("xl", "xl")])
def test_explicit_layer(layer, wrap):
    data = stream_bytes(guest="hvm", pages=16, wrap=wrap)
    assert read_events([data], layer=layer)[-1].complete
    other = {"libxc": "libxl", "libxl": "xl", "xl": "libxc"}[layer]
    with pytest.raises(MalformedStream):
        read_events([data], layer=other)


def drive_passthrough(data: bytes, read_size: int, move_directly: bool):
    """A driver that moves payloads itself: buffered bytes via take_payload, the rest 'spliced' from the
    source (here: sliced from `data`) with payload_consumed. Returns (events, payload bytes)."""
    reader = V2Reader(payload="passthrough")
    source = 0
    events, moved = [], []
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            chunk = data[source : source + read_size]
            source += len(chunk)
            reader.feed(chunk)
            continue
        events.append(event)
        if isinstance(event, EndOfStream):
            return events, b"".join(moved)
        while reader.payload_remaining:
            view = reader.take_payload()
            moved.append(bytes(view))
            if reader.payload_remaining:
                if move_directly:
                    n = min(reader.payload_remaining, 3 * PAGE_SIZE + 5)
                    moved.append(data[source : source + n])
                    source += n
                    reader.payload_consumed(n)
                else:
                    chunk = data[source : source + read_size]
                    source += len(chunk)
                    reader.feed(chunk)


@pytest.mark.parametrize("read_size", [1, 777, 65536])
@pytest.mark.parametrize("move_directly", [False, True])
def test_passthrough_offsets_and_payloads_match_views_mode(read_size, move_directly):
    data = stream_bytes(guest="pv", pages=40, wrap="libxl", batch=7)
    if read_size == 1 and move_directly is False:
        data = stream_bytes(guest="pv", pages=8, wrap="libxc", batch=3)
    views = read_events([data])
    expected_payload = b"".join(e[3] for e in views if isinstance(e, tuple))
    expected_events = [e for e in views if not isinstance(e, tuple)]
    events, payload = drive_passthrough(data, read_size, move_directly)
    assert events == expected_events
    assert payload == expected_payload


def test_passthrough_misuse_is_a_programming_error():
    data = stream_bytes(guest="pv", pages=8)
    reader = V2Reader(payload="passthrough")
    reader.feed(data)
    while not (isinstance(event := reader.next_event(), LibxcRecord) and isinstance(event.body, R.PageData)):
        pass
    with pytest.raises(RuntimeError):
        reader.next_event()
    with pytest.raises(ValueError):
        reader.payload_consumed(PAGE_SIZE)  # bytes are still buffered
    reader.take_payload()
    with pytest.raises(ValueError):
        reader.payload_consumed(10**9)


def test_payload_views_survive_later_feeds():
    data = stream_bytes(guest="pv", pages=24, batch=24)
    reader = V2Reader()
    kept = []
    chunks = chunked(data, [9000]) + [b""]
    while not isinstance(event := reader.next_event(), EndOfStream):
        if event is NEED_DATA:
            reader.feed(chunks.pop(0))
        elif isinstance(event, PagePayload):
            kept.append((event, bytes(event.data)))
    assert all(bytes(event.data) == copy for event, copy in kept)
    assert sum(event.page_count for event, _ in kept) == 24


def test_page_payload_page_accessor():
    data = stream_bytes(guest="hvm", pages=12, batch=12)
    events = read_events([data])
    record = next(e for e in events if isinstance(e, LibxcRecord) and isinstance(e.body, R.PageData))
    payload = next(e for e in events if isinstance(e, tuple))[3]
    assert len(payload) == record.body.payload_length == record.length - 8 - 8 * record.body.count
    assert len(record.body.data_pfns()) == record.body.page_count == 10  # two XTAB holes
    reader = V2Reader()
    reader.feed(data)
    while not isinstance(event := reader.next_event(), PagePayload):
        pass
    assert bytes(event.page(1)) == payload[PAGE_SIZE : 2 * PAGE_SIZE]


def test_take_payload_without_pending_payload_is_a_no_op():
    data = stream_bytes(guest="pv", pages=8)
    reader = V2Reader(payload="passthrough")
    reader.feed(data)
    reader.feed(b"")
    headers = 0
    while not isinstance(event := reader.next_event(), EndOfStream):
        headers += isinstance(event, Header)
        assert len(reader.take_payload()) == (event.body.payload_length if isinstance(event, LibxcRecord) and isinstance(event.body, R.PageData) else 0)
        reader.payload_consumed(0)
    assert headers == 2 and event.complete
