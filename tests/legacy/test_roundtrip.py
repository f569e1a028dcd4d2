"""Writer <-> parser round trips.

* Generated variants (hypothesis over `BuildOptions`): the parser, fed the written stream whole, one byte at
  a time and in random chunk sizes (and in passthrough mode), yields the same events each time; its wire
  events equal the ones the builder wrote; writing them again gives the same bytes.
* parse -> write is the identity on the shared conformance vectors and on every committed sample.
"""

import io
import pathlib

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, SHARED
from xenstream.legacy import events as ev
from xenstream.legacy.build import DEVICE_MODEL_RECORDS, BuildOptions, PhysmapSpec, build_events, build_stream
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser
from xenstream.legacy.writer import LegacyWriter

VECTORS = sorted((SHARED / "vectors").glob("*.v1"))
SAMPLES = sorted((REPO / "samples" / "v1").glob("*.v1"))


def parse(data: bytes, chunk_sizes=None, **options) -> list:
    """All events of `data`; `chunk_sizes` (cycled) decides how the input is cut, default: whole."""
    parser = LegacyParser(**options)
    events, pos, turn = [], 0, 0
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            if pos >= len(data):
                parser.feed(b"")
                continue
            size = len(data) if not chunk_sizes else chunk_sizes[turn % len(chunk_sizes)]
            turn += 1
            parser.feed(data[pos:pos + size])
            pos += size
            continue
        if event is DONE:
            return events
        events.append(event)


def write(events, width=None) -> bytes:
    sink = io.BytesIO()
    writer = LegacyWriter(sink, width=width)
    for event in events:
        writer.write(event)
    return sink.getvalue()


def _merge_pieces(events):
    """Passthrough PageData pieces folded back into their batch; payload views made bytes."""
    merged = []
    for event in events:
        if isinstance(event, ev.PageData):
            batch = merged[-1]
            previous = b"" if batch.payload is None else bytes(batch.payload)
            merged[-1] = attrs.evolve(batch, payload=previous + bytes(event.data))
            continue
        if isinstance(event, ev.PageBatch) and event.payload is not None:
            event = attrs.evolve(event, payload=bytes(event.payload))
        merged.append(event)
    return merged


def comparable(events):
    """Events as comparable values: offsets included (equality ignores them), payload views as bytes."""
    return [(type(event).__name__, event.offset, event) for event in _merge_pieces(events)]


def wire(events):
    return [event for event in _merge_pieces(events) if event.WIRE]


@st.composite
def build_options(draw):
    guest = draw(st.sampled_from(["pv", "hvm"]))
    width = draw(st.sampled_from([32, 64]))
    version = draw(st.sampled_from([(4, 0), (4, 1), (4, 2), (4, 3), (4, 5)]))
    checkpoints = draw(st.integers(1, 3))
    remus = checkpoints > 1 or draw(st.booleans())
    wrappers = ["none", "xend", "libvirt"] + (["xenops"] if guest == "hvm" else [])
    wrappers += ["xl"] if version == (4, 5) else ["xl-text"] if version >= (4, 1) else []
    wrapper = draw(st.sampled_from(wrappers))
    if wrapper == "xenops":
        device_model = "XenopsQemuRecord"
    else:
        choices = [name for name in DEVICE_MODEL_RECORDS if name != "XenopsQemuRecord"]
        if checkpoints > 1:
            choices.remove("QemuDeviceModelRecord")
        if version < (4, 1):
            choices.remove("DeviceModelRecord0002")
        device_model = draw(st.sampled_from(choices))
    physmap = tuple(draw(st.lists(st.builds(
        PhysmapSpec, st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**30),
        st.one_of(st.none(), st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"\0", b"x")))),
        max_size=2)))
    vcpus = draw(st.integers(1, 3))
    qemu_to_eof = guest == "hvm" and device_model == "QemuDeviceModelRecord"
    return BuildOptions(
        width=width,
        guest=guest,
        guest_width=draw(st.sampled_from([None, 32, 64])) if guest == "pv" else None,
        pages=draw(st.integers(20, 40)) if guest == "pv" else draw(st.integers(8, 30)),
        vcpus=vcpus,
        max_vcpus=vcpus + draw(st.integers(0, 65)),
        seed=draw(st.integers(0, 2**32)),
        wrapper=wrapper,
        checkpoints=checkpoints,
        remus=remus,
        compression=remus and version >= (4, 2) and draw(st.booleans()),
        live_iterations=draw(st.integers(0, 2)),
        verify_pass=draw(st.booleans()),
        tmem=draw(st.booleans()),
        xsave=version >= (4, 1) and draw(st.booleans()),
        holes=draw(st.integers(0, 3)),
        broken_pages=draw(st.integers(0, 2)) if version >= (4, 3) else 0,
        toolstack=version >= (4, 2) and draw(st.booleans()),
        physmap=physmap,
        physmap_gap=draw(st.binary(min_size=4, max_size=4)),
        device_model=device_model,
        device_model_size=draw(st.integers(8, 2000)),
        x87_fip_width=draw(st.sampled_from([0, 4, 8])) if guest == "hvm" and version == (4, 5) else 0,
        go_message=wrapper == "xl" and not remus and not qemu_to_eof and draw(st.booleans()),
        xen_version=version,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=build_options(), data=st.data())
def test_generated_streams_round_trip_however_they_are_fed(options, data):
    generated = list(build_events(options))
    stream = write(generated)
    expected_wire = wire(generated)
    whole = parse(stream)
    assert wire(whole) == expected_wire
    assert write(whole) == stream
    reference = comparable(whole)
    assert comparable(parse(stream, [1])) == reference
    sizes = data.draw(st.lists(st.integers(1, 5000), min_size=1, max_size=20), label="chunk sizes")
    assert comparable(parse(stream, sizes)) == reference
    passthrough = parse(stream, sizes, passthrough=True)
    assert comparable(passthrough) == reference
    assert write(passthrough) == stream


@settings(max_examples=15, deadline=None)
@given(options=build_options())
def test_parser_told_the_variant_reads_what_detection_reads(options):
    stream = build_stream(options)
    detected = parse(stream)
    told = parse(stream, width=options.width, guest=options.guest, xl=options.wrapper.startswith("xl"))
    assert wire(told) == wire(detected)


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.name)
def test_parse_then_write_is_the_identity_on_shared_vectors(path):
    stream = path.read_bytes()
    events = parse(stream, [65536, 1, 4095, 3, 1 << 20])
    assert write(events) == stream
    assert comparable(events) == comparable(parse(stream))
    assert sum(isinstance(e, ev.CheckpointEnd) for e in events) >= 2


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_parse_then_write_is_the_identity_on_samples(path: pathlib.Path):
    stream = path.read_bytes()
    whole = parse(stream)
    assert write(whole) == stream
    assert comparable(parse(stream, [1])) == comparable(whole)
    assert comparable(parse(stream, [7, 4096, 33, 1])) == comparable(whole)
