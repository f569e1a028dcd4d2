"""LegacyParser on hand-built streams: events and offsets per element, feeding-independence, passthrough."""

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.legacy import handbuilt as hb
from xenstream.legacy import events as ev
from xenstream.legacy.errors import MalformedStream, TruncatedStream
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser, parse_bytes
from xenstream.legacy.toolstack import decode_libxl_toolstack, encode_libxl_toolstack


def feed_in_pieces(data: bytes, sizes, **options):
    """All (offset, event) pairs, feeding `data` in pieces of the given sizes (cycled)."""
    parser = LegacyParser(**options)
    out, position, turn = [], 0, 0
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            size = sizes[turn % len(sizes)]
            turn += 1
            parser.feed(data[position : position + size])
            position += size
            continue
        if event is DONE:
            return out
        out.append((event.offset, event))


def kinds(events):
    return [type(event).__name__ for event in events]


def test_minimal_pv_stream_events_in_order_with_offsets():
    stream = hb.minimal_pv(xcnt=16 + 64)
    data = stream.bytes()
    events = parse_bytes(data)
    assert kinds(events) == [
        "Detected", "P2mSize", "ExtendedInfo", "P2mFrames", "TscInfo", "PageBatch", "VcpuInfo", "Toolstack",
        "LastCheckpoint", "EndOfBody", "UnmappedPfns", "VcpuBasic", "VcpuExtended", "VcpuXsave", "SharedInfo",
        "CheckpointEnd", "EndOfStream",
    ]
    by_kind = {type(event).__name__: event for event in events}
    marks = stream.marks
    assert by_kind["P2mSize"].offset == marks["p2m_size"] and by_kind["P2mSize"].p2m_size == 16
    assert by_kind["ExtendedInfo"].offset == marks["extended_info"]
    assert by_kind["ExtendedInfo"].guest_width == 8 and by_kind["ExtendedInfo"].xsave_record_size == 80
    assert by_kind["P2mFrames"].frames == (0,)
    assert by_kind["TscInfo"] == ev.TscInfo(1, 2, 3, 4) and by_kind["TscInfo"].offset == marks["tsc"]
    batch = by_kind["PageBatch"]
    assert batch.offset == marks["batch"]
    assert batch.pfns == [0, 1, 2, 3, 0, 9]
    assert batch.type_names() == ["NOTAB", "NOTAB", "L1TAB", "L4TAB|PIN", "XTAB", "BROKEN"]
    assert batch.data_pages == 4 and batch.payload_length == 4 * hb.PAGE
    assert bytes(batch.payload) == hb.page(1) + hb.page(2) + hb.page(3) + hb.page(4)
    assert by_kind["VcpuInfo"].online == (0,)
    assert by_kind["Toolstack"].libxl.entries == ()
    assert by_kind["EndOfBody"].offset == marks["end_of_body"]
    assert by_kind["UnmappedPfns"].pfns == (12, 13) and by_kind["UnmappedPfns"].offset == marks["tail"]
    assert by_kind["VcpuXsave"].xfeature_mask == 7 and by_kind["VcpuXsave"].data == bytes(range(64))
    assert by_kind["SharedInfo"].offset == marks["shared_info"]
    assert by_kind["CheckpointEnd"] == ev.CheckpointEnd(1, True)
    assert by_kind["EndOfStream"] == ev.EndOfStream(1, "last-checkpoint")
    assert by_kind["EndOfStream"].offset == len(data)


@pytest.mark.parametrize("width,guest_width", [(32, 4), (32, 8), (64, 4), (64, 8)])
def test_pv_widths_are_detected(width, guest_width):
    events = parse_bytes(hb.minimal_pv(width, guest_width).bytes())
    detected = events[0]
    assert (detected.width, detected.guest, detected.guest_width) == (width, "pv", guest_width)
    assert detected.pt_levels == (4 if guest_width == 8 else 3)
    vcpu = next(event for event in events if isinstance(event, ev.VcpuBasic))
    assert len(vcpu.data) == (0x1430 if guest_width == 8 else 0xAF0)


@pytest.mark.parametrize(
    "stream",
    [hb.minimal_pv(), hb.minimal_pv(32, 4), hb.minimal_hvm(), hb.minimal_hvm(32, b"QemuDeviceModelRecord")],
    ids=["pv64", "pv32", "hvm64", "hvm32-qemu"],
)
def test_whole_byte_by_byte_and_chunked_feeding_agree(stream):
    data = stream.bytes()
    whole = feed_in_pieces(data, [len(data)])
    assert whole == feed_in_pieces(data, [1])
    rng = random.Random(len(data))
    assert whole == feed_in_pieces(data, [rng.randint(1, 9000) for _ in range(50)])
    assert whole == [(event.offset, event) for event in parse_bytes(data)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20000), min_size=1, max_size=40))
def test_any_chunking_gives_the_same_events(sizes):
    data = hb.minimal_hvm(64, b"RemusDeviceModelState", last=False).bytes()
    assert feed_in_pieces(data, sizes) == feed_in_pieces(data, [len(data)])


def test_hvm_stream_every_parameter_chunk_and_the_physmap_quirk():
    stream = hb.minimal_hvm()
    events = parse_bytes(stream.bytes())
    assert events[0].guest == "hvm" and events[0].width == 64
    params = [event for event in events if isinstance(event, ev.HvmParam)]
    assert [(p.chunk_id, p.param_index, p.value) for p in params] == [
        (chunk_id, index, 0x1000 - chunk_id) for chunk_id, index in hb.HVM_PARAMS.items()
    ]
    (toolstack,) = [event for event in events if isinstance(event, ev.Toolstack)]
    (entry,) = toolstack.libxl.entries
    assert entry == ev.PhysmapEntry(0xF0000000, 0xF1000000, 0x800000, b"vga\0", b"\xde\xad\xbe\xef")
    assert toolstack.libxl.width == 64
    batch = next(event for event in events if isinstance(event, ev.PageBatch))
    assert batch.type_names() == ["NOTAB", "NOTAB", "XTAB", "XALLOC"] and batch.data_pages == 2
    assert kinds(events)[-7:] == [
        "HvmMagicPfns", "HvmContext", "DeviceModelRecord0002", "DeviceModelData", "DeviceModelEnd",
        "CheckpointEnd", "EndOfStream",
    ]
    magic = next(event for event in events if isinstance(event, ev.HvmMagicPfns))
    assert (magic.ioreq_pfn, magic.bufioreq_pfn, magic.store_pfn) == (0xFEFFF, 0xFEFFE, 0xFEFFD)
    record = next(event for event in events if isinstance(event, ev.DeviceModelRecord0002))
    assert record.length == 10 and record.offset == stream.marks["dm"]
    assert b"".join(bytes(e.data) for e in events if isinstance(e, ev.DeviceModelData)) == b"QEVM-state"


def test_physmap_32_bit_layout_and_other_width_fallback():
    events = parse_bytes(hb.minimal_hvm(32).bytes())
    libxl = next(e for e in events if isinstance(e, ev.Toolstack)).libxl
    assert libxl.width == 32 and libxl.entries[0].gap == b"" and libxl.entries[0].name == b"vga\0"
    blob32 = hb.toolstack_blob([(1, 2, 3, b"ab\0"), (4, 5, 6, None)], width=32)
    decoded = decode_libxl_toolstack(blob32, 64, 0)  # a 64-bit toolstack reading a 32-bit layout blob
    assert decoded.width == 32
    assert [(e.phys_offset, e.name) for e in decoded.entries] == [(1, b"ab\0"), (4, None)]
    assert encode_libxl_toolstack(decoded) == blob32
    assert decode_libxl_toolstack(struct.pack("<II", 2, 0), 64, 0) is None  # not libxl's version


def test_device_model_record_forms():
    qemu = parse_bytes(hb.minimal_hvm(dm=b"QemuDeviceModelRecord", last=False).bytes())
    assert kinds(qemu)[-5:] == [
        "QemuDeviceModelRecord", "DeviceModelData", "DeviceModelEnd", "CheckpointEnd", "EndOfStream"
    ]
    assert qemu[-1].reason == "device-model-to-eof" and qemu[-3].length == 104
    remus = parse_bytes(hb.minimal_hvm(dm=b"RemusDeviceModelState", last=False).bytes())
    assert any(isinstance(e, ev.RemusDeviceModelState) and e.length == 10 for e in remus)
    s = hb.minimal_hvm(dm=b"", last=True)
    data = s.bytes()[: s.marks["dm"]] + b"QemuDeviceModelRecord\n" + struct.pack(">I", 8) + b"QEVMxxxx"
    xenops = parse_bytes(data)
    record = next(e for e in xenops if isinstance(e, ev.XenopsQemuRecord))
    assert record.length == 8 and xenops[-1].reason == "last-checkpoint"


@pytest.mark.parametrize("last", [True, False])
def test_device_model_record_optional_for_a_bare_libxc_stream(last):
    s = hb.minimal_hvm(last=last)
    bare = s.bytes()[: s.marks["dm"]]
    events = parse_bytes(bare, device_model_optional=True)
    assert kinds(events)[-3:] == ["HvmContext", "CheckpointEnd", "EndOfStream"]
    assert events[-1].reason == "no-device-model" and events[-1].last_checkpoint_complete
    assert not any(isinstance(e, ev.DeviceModelRecord) for e in events)
    with pytest.raises(TruncatedStream, match="device-model signature"):
        parse_bytes(bare)  # required by default
    with_record = parse_bytes(s.bytes(), device_model_optional=True)  # a record present is still read
    assert kinds(with_record)[-5:] == kinds(parse_bytes(s.bytes()))[-5:]


@pytest.mark.parametrize("device_model_optional", [False, True])
def test_empty_hvm_context_is_refused_at_its_length(device_model_optional):
    s = hb.minimal_hvm()
    data = s.bytes()
    length_at = s.marks["dm"] - 4 - len(b"HVMCTX")  # hb's hvm_tail: u32 length, then the context
    assert data[length_at:s.marks["dm"]] == struct.pack("<I", 6) + b"HVMCTX"
    empty = data[:length_at] + struct.pack("<I", 0) + data[s.marks["dm"]:]
    with pytest.raises(MalformedStream, match="HVM context is empty") as caught:
        parse_bytes(empty, device_model_optional=device_model_optional)
    assert caught.value.offset == length_at


def test_large_device_model_state_comes_in_fixed_pieces():
    s = hb.minimal_hvm(dm=b"")
    state = bytes(range(256)) * (2 * 4096 + 3)
    data = s.bytes()[: s.marks["dm"]] + b"DeviceModelRecord0002" + struct.pack("<I", len(state)) + state
    pieces = [e for e in parse_bytes(data) if isinstance(e, ev.DeviceModelData)]
    assert [len(p.data) for p in pieces] == [1 << 20, 1 << 20, len(state) - (2 << 20)]
    assert b"".join(bytes(p.data) for p in pieces) == state


def remus_pv(checkpoints: int = 2) -> hb.Stream:
    s = hb.minimal_pv(last=False)
    for index in range(2, checkpoints + 1):
        s.mark(f"checkpoint{index}")
        s.batch([1], [hb.page(0x40 + index)])
        s.vcpu_info(64, 1, 1)  # VCPU 64 came online: two map words
        s.end_body()
        s.pv_tail([0, 64])
    return s


def test_remus_checkpoints_and_clean_end_of_input():
    stream = remus_pv(3)
    events = parse_bytes(stream.bytes())
    ends = [e for e in events if isinstance(e, ev.CheckpointEnd)]
    assert [(e.index, e.last) for e in ends] == [(1, False), (2, False), (3, False)]
    assert ends[0].offset == stream.marks["checkpoint2"]
    assert events[-1] == ev.EndOfStream(3, "end-of-input")
    vcpus = [e.vcpu_id for e in events if isinstance(e, ev.VcpuBasic)]
    assert vcpus == [0, 0, 64, 0, 64]


def test_end_of_input_inside_a_later_checkpoint_discards_it():
    stream = remus_pv(2)
    data = stream.bytes()
    for cut in (stream.marks["checkpoint2"] + 2, stream.marks["checkpoint2"] + 5000, len(data) - 1):
        events = parse_bytes(data[:cut])
        assert events[-1] == ev.EndOfStream(
            1, "end-of-input", last_checkpoint_complete=False, discarded_offset=stream.marks["checkpoint2"]
        )
        assert events[-1].offset == cut


def test_go_message_and_trailing_bytes_after_the_logical_end():
    data = hb.Stream().xl_header().raw(hb.minimal_pv().bytes()).raw(hb.GO).raw(b"junk").bytes()
    events = parse_bytes(data)
    assert kinds(events)[:2] == ["XlHeader", "Detected"]
    assert events[0].config == b'{"c_info": {"type": "pv"}}\0' and events[0].config_is_json
    assert kinds(events)[-3:] == ["EndOfStream", "XlGoMessage", "TrailingData"]
    assert bytes(events[-1].data) == b"junk" and events[-1].offset == len(data) - 4


def test_end_of_stream_does_not_wait_for_more_input_after_last_checkpoint():
    parser = LegacyParser()
    parser.feed(hb.minimal_pv().bytes())
    seen = []
    while (event := parser.next_event()) is not NEED_DATA:
        seen.append(event)
    assert isinstance(seen[-1], ev.EndOfStream)


def test_passthrough_delivers_page_data_pieces_and_the_same_other_events():
    data = hb.minimal_pv().bytes()
    buffered = parse_bytes(data)
    for sizes in ([len(data)], [1000], [1]):
        pieces = [e for _, e in feed_in_pieces(data, sizes, passthrough=True)]
        batch = next(e for e in pieces if isinstance(e, ev.PageBatch))
        assert batch.payload is None and batch.payload_length == 4 * hb.PAGE
        payload = b"".join(bytes(e.data) for e in pieces if isinstance(e, ev.PageData))
        assert payload == bytes(next(e for e in buffered if isinstance(e, ev.PageBatch)).payload)
        others = [e for e in pieces if not isinstance(e, (ev.PageData, ev.PageBatch))]
        assert others == [e for e in buffered if not isinstance(e, ev.PageBatch)]
        assert [e.offset for e in others] == [e.offset for e in buffered if not isinstance(e, ev.PageBatch)]


def test_passthrough_driver_moving_the_payload_itself():
    """The driver takes what is buffered, moves the rest itself, and tells the parser."""
    data = hb.minimal_pv().bytes()
    source = memoryview(data)
    parser = LegacyParser(passthrough=True)
    moved = bytearray()
    position = 0
    events = []
    while (event := parser.next_event()) is not DONE:
        if event is NEED_DATA:
            parser.feed(source[position : position + 3000])
            position += 3000
            continue
        events.append(event)
        if isinstance(event, ev.PageBatch):
            while piece := parser.take_payload():
                moved += piece
            rest = parser.payload_pending
            moved += source[position : position + rest]  # "spliced" straight from the input
            position += rest
            parser.consumed_externally(rest)
    assert bytes(moved) == hb.page(1) + hb.page(2) + hb.page(3) + hb.page(4)
    assert events[-1] == ev.EndOfStream(1, "last-checkpoint") and events[-1].offset == len(data)
    with pytest.raises(ValueError):
        parser.consumed_externally(1)


def test_payload_views_survive_later_feeds():
    data = hb.minimal_pv().bytes()
    parser = LegacyParser()
    scratch = bytearray(data)  # the driver reuses its buffer
    parser.feed(scratch)
    parser.feed(b"")
    scratch[:] = bytes(len(scratch))
    batch = None
    while (event := parser.next_event()) is not DONE:
        batch = event if isinstance(event, ev.PageBatch) else batch
    assert bytes(batch.payload[:hb.PAGE]) == hb.page(1)


def test_verify_mode_tmem_and_wide_vcpu_map():
    s = hb.Stream(64)
    s.pv_header(16)
    s.mark("tmem").i32(-5).u32(1, 4, 0xFFFFFFFF, 1, 2, 3, 0xFFFFFFFF)
    s.u32(2, 0x01, 2).raw(b"U" * 16)  # persistent pool 2 with 2 page slots
    s.raw(struct.pack("<3QI", 1, 2, 3, 9)).raw(hb.page(0x77))
    s.raw(struct.pack("<3Q", *(3 * [2**64 - 1])))  # ends the page list early
    s.u32(3, 0, 0).raw(b"V" * 16)  # non-persistent pool 3
    s.u32(0xFFFFFFFF)
    s.batch([0], [hb.page(1)])
    s.i32(-6).u32(2).raw(struct.pack("<3QI", 4, 5, 6, 7)).u32(0xFFFFFFFF)
    s.tsc()
    s.i32(-1).batch([0], [hb.page(1)])
    s.vcpu_info(130, 1, 0, 1 << 2)  # VCPUs 0 and 130
    s.i32(-9).end_body().pv_tail([0, 130])
    events = parse_bytes(s.bytes())
    assert kinds(events)[4:12] == [
        "TmemHeader", "TmemPool", "TmemPage", "TmemPoolPagesEnd", "TmemPool", "TmemEnd", "PageBatch",
        "TmemExtraStart",
    ]
    header = events[4]
    assert (header.version, header.max_pools, header.oid_words, header.offset) == (1, 4, 3, s.marks["tmem"])
    page = events[6]
    assert (page.pool_id, page.oid, page.index, bytes(page.data)) == (2, (1, 2, 3), 9, hb.page(0x77))
    assert next(e for e in events if isinstance(e, ev.TmemInvalidation)) == ev.TmemInvalidation(2, (4, 5, 6), 7)
    assert "EnableVerifyMode" in kinds(events)
    assert [e.vcpu_id for e in events if isinstance(e, ev.VcpuBasic)] == [0, 130]


def test_tmem_version_0_has_one_word_object_ids():
    s = hb.Stream(64).pv_header(16)
    s.i32(-5).u32(0, 1, 0xFFFFFFFF, 0, 0, 0, 0xFFFFFFFF).u32(0, 1, 1).raw(b"U" * 16)
    s.raw(struct.pack("<QI", 42, 1)).raw(hb.page(3)).u32(0xFFFFFFFF)
    s.i32(-6).u32(0).raw(struct.pack("<QI", 43, 2)).u32(0xFFFFFFFF)
    s.i32(-9).end_body().pv_tail([0])
    events = parse_bytes(s.bytes())
    assert next(e for e in events if isinstance(e, ev.TmemPage)).oid == (42,)
    assert next(e for e in events if isinstance(e, ev.TmemInvalidation)).oid == (43,)


def test_xsave_size_mismatch_is_tolerated_and_kept():
    s = hb.Stream(64).pv_header(16, xcnt=16 + 32).i32(-9).end_body()
    s.u32(0).raw(bytes(0x1430)).raw(bytes(128)).raw(struct.pack("<QQ", 7, 40) + bytes(32)).raw(hb.page(0))
    xsave = next(e for e in parse_bytes(s.bytes()) if isinstance(e, ev.VcpuXsave))
    assert xsave.size == 40 and len(xsave.data) == 32


def test_wrappers_are_reported():
    body = hb.minimal_pv().bytes()
    xend = b"LinuxGuestRecord" + struct.pack(">i", 9) + b"(domain )" + body
    libvirt = b"libvirt-xml\n \0 \r" + struct.pack("<II", 1, 6) + bytes(40) + b"<dom>\0" + body
    xenops = b"XenSavedDomain\n" + body
    for data, kind, wrapper in (
        (xend, ev.XendHeader, "xend"),
        (libvirt, ev.LibvirtHeader, "libvirt"),
        (xenops, ev.XenopsHeader, "xenops"),
    ):
        events = parse_bytes(data)
        assert isinstance(events[0], kind) and events[1].wrapper == wrapper
        assert events[1].offset == len(data) - len(body)
        assert events[2].offset == len(data) - len(body)
    assert parse_bytes(xend)[0].config == b"(domain )"
    assert parse_bytes(libvirt)[0].xml == b"<dom>\0"


def test_options_skip_detection():
    data = hb.minimal_pv(32, 4).bytes()
    detected = parse_bytes(data, width=32, guest="pv", xl=False)[0]
    assert [(e.what, e.source) for e in detected.evidence] == [
        ("wrapper", "option"), ("width", "option"), ("guest", "option"), ("guest_width", "detected")
    ]
    with pytest.raises(ValueError):
        LegacyParser(width=16)
    with pytest.raises(ValueError):
        LegacyParser(passthrough=True, keep_all_pages=True)


PAGE_TYPES = [0x0, 0x1, 0x2, 0x3, 0x4, 0x9, 0xC, 0xD, 0xE]


@st.composite
def random_streams(draw):
    """A hand-built stream of random shape, with the batches it must come out as."""
    width = draw(st.sampled_from([32, 64]))
    guest = draw(st.sampled_from(["pv", "hvm"]))
    p2m_size = draw(st.integers(min_value=4, max_value=40))
    s = hb.Stream(width)
    guest_width = draw(st.sampled_from([4, 8]))
    if guest == "pv":
        s.pv_header(p2m_size, guest_width)
    else:
        s.ulong(p2m_size).tsc()
    checkpoints = draw(st.integers(min_value=1, max_value=3))
    last = checkpoints == 1 and draw(st.booleans())
    batches = []
    online = [0]  # the last VCPU_INFO's map holds across checkpoints
    for _ in range(checkpoints):
        for kind in draw(st.lists(st.sampled_from(["batch", "tsc", "param", "vcpus", "toolstack"]), max_size=5)):
            if kind == "batch":
                pfns = draw(st.lists(st.integers(0, p2m_size - 1), unique=True, min_size=1, max_size=6))
                types = [draw(st.sampled_from(PAGE_TYPES)) for _ in pfns]
                entries = [t << 28 | pfn for t, pfn in zip(types, pfns)] + [0xF0000000] * draw(st.integers(0, 2))
                pages = [hb.page(pfn + 16 * t) for t, pfn in zip(types, pfns) if t < 0xD]
                s.batch(entries, pages)
                batches.append((entries, b"".join(pages)))
            elif kind == "tsc":
                s.tsc(*draw(st.tuples(st.integers(0, 3), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                      st.integers(0, 2**32 - 1))))
            elif kind == "param":
                s.hvm_param(draw(st.sampled_from(sorted(hb.HVM_PARAMS))), draw(st.integers(0, 2**64 - 1)))
            elif kind == "vcpus":
                online = sorted(draw(st.sets(st.integers(0, 70), min_size=1, max_size=3)))
                words = [0] * (max(online) // 64 + 1)
                for vcpu in online:
                    words[vcpu // 64] |= 1 << (vcpu % 64)
                s.vcpu_info(max(online), *words)
            else:
                s.toolstack(hb.toolstack_blob([(1, 2, 3, b"n\0")] * draw(st.integers(0, 2)), width))
        if last:
            s.i32(-9)
        s.end_body()
        if guest == "pv":
            s.pv_tail(online, unmapped=draw(st.lists(st.integers(0, p2m_size - 1), max_size=3)),
                      guest_width=guest_width)
        else:
            s.hvm_tail().dm_record(draw(st.binary(max_size=64)))
    return s.bytes(), batches, checkpoints, last


def merged_page_data(pairs):
    """Passthrough PageData pieces follow the feeding; merge each run into one for comparisons."""
    out = []
    for offset, event in pairs:
        if isinstance(event, ev.PageData) and out and isinstance(out[-1][1], ev.PageData):
            out[-1] = (out[-1][0], ev.PageData(bytes(out[-1][1].data) + bytes(event.data)))
        else:
            out.append((offset, ev.PageData(bytes(event.data)) if isinstance(event, ev.PageData) else event))
    return out


@settings(max_examples=20, deadline=None)
@given(random_streams(), st.randoms(use_true_random=False), st.booleans())
def test_random_streams_whole_byte_by_byte_and_chunked(stream, rng, passthrough):
    data, batches, checkpoints, last = stream

    def parse(sizes):
        return merged_page_data(feed_in_pieces(data, sizes, passthrough=passthrough))

    whole = parse([len(data)])
    assert whole == parse([1])
    assert whole == parse([rng.randint(1, 5000) for _ in range(20)])
    events = [event for _, event in whole]
    parsed = [event for event in events if isinstance(event, ev.PageBatch)]
    assert [list(batch.entries) for batch in parsed] == [entries for entries, _ in batches]
    if not passthrough:
        assert [bytes(batch.payload) for batch in parsed] == [pages for _, pages in batches]
    assert [e.index for e in events if isinstance(e, ev.CheckpointEnd)] == list(range(1, checkpoints + 1))
    assert events[-1] == ev.EndOfStream(checkpoints, "last-checkpoint" if last else "end-of-input")


def test_a_checkpoint_without_vcpu_info_keeps_the_last_map():
    """Xen 4.5's restorer never resets its VCPU map between checkpoints."""
    s = hb.Stream(64).pv_header(16).vcpu_info(2, 0b101).end_body().pv_tail([0, 2])
    s.batch([1], [hb.page(1)]).end_body().pv_tail([0, 2])
    events = parse_bytes(s.bytes())
    assert [e.vcpu_id for e in events if isinstance(e, ev.VcpuBasic)] == [0, 2, 0, 2]
    assert events[-1] == ev.EndOfStream(2, "end-of-input")


def test_unknown_extended_info_blocks_are_kept_as_the_restorer_skips_them():
    vcpu = b"vcpu" + struct.pack("<I", 0x1430) + bytes(0x1430)
    blocks = b"abcd" + struct.pack("<I", 3) + b"xyz" + vcpu + b"extv" + struct.pack("<I", 0)
    s = hb.Stream(64).ulong(16).raw(b"\xff" * 8).u32(len(blocks)).raw(blocks).ulong(0)
    s.i32(-9).end_body().pv_tail([0])
    ext = next(e for e in parse_bytes(s.bytes(), guest="pv") if isinstance(e, ev.ExtendedInfo))
    assert [(b.block_id, b.data) for b in ext.blocks][0] == (b"abcd", b"xyz")
    assert ext.guest_width == 8 and ext.has_extended_context and ext.xsave_record_size == 0
