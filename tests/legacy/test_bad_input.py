"""Bad input: each class is a typed StreamError with the offset of the offending element and a one-line
message; nothing else escapes; no allocation is sized by a field before it is checked."""

import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.legacy import handbuilt as hb
from xenstream.legacy import events as ev
from xenstream.legacy.errors import (
    DetectionError,
    MalformedStream,
    StreamError,
    TruncatedStream,
    UnsupportedStream,
)
from xenstream.legacy.parser import NEED_DATA, LegacyParser, parse_bytes


def rejects(data: bytes, error=MalformedStream, match: str | None = None, **options) -> StreamError:
    with pytest.raises(error, match=match) as caught:
        parse_bytes(data, **options)
    assert caught.value.offset is not None
    assert "\n" not in str(caught.value)
    return caught.value


def small_pv(width: int = 64) -> hb.Stream:
    s = hb.Stream(width).pv_header(16, 4)
    s.batch([0, 0xF0000000, 0xD0000003], [hb.page(1)]).vcpu_info(0, 1)
    s.toolstack(hb.toolstack_blob([(1, 2, 3, b"x\0")], width)).i32(-9).end_body()
    return s.pv_tail([0], unmapped=[7], guest_width=4)


def test_truncation_at_every_byte_of_a_pv_stream():
    data = small_pv().bytes()
    for cut in range(len(data)):
        with pytest.raises((TruncatedStream, DetectionError)) as caught:
            parse_bytes(data[:cut])
        assert caught.value.offset is not None and caught.value.offset <= cut
        assert "\n" not in str(caught.value)
    assert isinstance(parse_bytes(data)[-1], ev.EndOfStream)


def test_truncation_at_every_byte_of_an_hvm_stream():
    data = hb.minimal_hvm(32).bytes()
    for cut in range(len(data)):
        with pytest.raises((TruncatedStream, DetectionError)):
            parse_bytes(data[:cut])


def test_truncation_names_the_element_and_where_it_began():
    stream = small_pv()
    error = rejects(stream.bytes()[: stream.marks["shared_info"] + 10], TruncatedStream, "shared info")
    assert error.offset == stream.marks["shared_info"]
    assert "needs 4096 bytes, 10 present" in str(error)


def test_truncation_inside_page_data_in_passthrough_mode():
    data = small_pv().bytes()
    parser = LegacyParser(passthrough=True)
    parser.feed(data[:4000])
    parser.feed(b"")
    with pytest.raises(TruncatedStream, match="page data"):
        while parser.next_event() is not NEED_DATA:
            pass
    with pytest.raises(TruncatedStream):  # sticky
        parser.next_event()


def pv_prefix() -> hb.Stream:
    return hb.Stream(64).pv_header(16)


def test_batch_count_over_1024():
    s = pv_prefix().mark("bad").i32(1025).raw(bytes(1025 * 8))
    assert rejects(s.bytes(), match="1025 entries exceeds").offset == s.marks["bad"]


@pytest.mark.parametrize("chunk_id", [-22, -100, -(2**31)])
def test_unknown_chunk_id(chunk_id):
    s = pv_prefix().mark("bad").i32(chunk_id)
    assert rejects(s.bytes(), match=f"unknown chunk id {chunk_id}").offset == s.marks["bad"]


def test_extended_info_block_overrunning_its_declared_length():
    s = hb.Stream(64).ulong(16).raw(b"\xff" * 8).u32(0x1430)
    s.mark("bad").raw(b"vcpu" + struct.pack("<I", 0x1430) + bytes(0x1430))
    error = rejects(s.bytes(), match="overruns the declared length", width=64, guest="pv")
    assert error.offset == s.marks["bad"]
    s = hb.Stream(64).ulong(16).raw(b"\xff" * 8).u32(0x1430 + 8 + 5)
    s.raw(b"vcpu" + struct.pack("<I", 0x1430) + bytes(0x1430)).mark("bad").raw(bytes(5))
    assert rejects(s.bytes(), match="too few for a block header").offset == s.marks["bad"]


@pytest.mark.parametrize(
    "block,message",
    [
        (b"vcpu" + struct.pack("<I", 0x100) + bytes(0x100), "vcpu"),
        (b"xcnt" + struct.pack("<II", 8, 0) + bytes(4), "xcnt"),
        (b"xcnt" + struct.pack("<II", 4, 8), "xsave record size"),
    ],
)
def test_bad_extended_info_blocks(block, message):
    vcpu = b"vcpu" + struct.pack("<I", 0x1430) + bytes(0x1430)
    blocks = block + vcpu if not block.startswith(b"vcpu") else block
    s = hb.Stream(64).ulong(16).raw(b"\xff" * 8).u32(len(blocks)).raw(blocks).raw(bytes(64))
    rejects(s.bytes(), match=message, width=64, guest="pv")


def test_pv_stream_without_extended_info_is_unsupported():
    s = hb.Stream(64).ulong(16).ulong(0)
    rejects(s.bytes(), UnsupportedStream, "without the extended-info block", guest="pv")


@pytest.mark.parametrize("entries", [[5, 5], [5, 0x10000005], [0xF0000000, 0, 7, 0]])
def test_duplicate_pfn_within_one_batch(entries):
    s = pv_prefix().mark("bad").batch(entries, [hb.page(0)] * len(entries))
    error = rejects(s.bytes(), match="appears twice")
    assert error.offset == s.marks["bad"] + 4 + 8 * (len(entries) - 1)


def test_repeated_xtab_entries_and_pfn_0_are_not_duplicates():
    s = pv_prefix().batch([0xF0000000, 0, 0xF0000000, 1], [hb.page(0), hb.page(1)]).i32(-9).end_body()
    s.pv_tail([0])
    batch = next(e for e in parse_bytes(s.bytes()) if isinstance(e, ev.PageBatch))
    assert batch.data_pages == 2


@pytest.mark.parametrize(
    "entry,message",
    [(0x50000001, "undefined page type 0x5"), (0x70000001, "undefined page type 0x7"),
     (0x100000001, "upper 32 bits"), (16, "beyond p2m_size"), (0xD0000020, "beyond p2m_size")],
)
def test_bad_pfn_type_entries(entry, message):
    s = pv_prefix().mark("bad").batch([1, entry], [hb.page(0)] * 2)
    assert rejects(s.bytes(), match=message).offset == s.marks["bad"] + 4 + 8


def test_p2m_frame_beyond_p2m_size():
    s = hb.Stream(64).pv_header(16, frames=[16])
    assert rejects(s.bytes(), match="p2m frame list").offset == s.marks["p2m_frames"]


@pytest.mark.parametrize("width", [32, 64])
def test_pv_p2m_size_0_given_width(width):
    """With --width given, detection no longer vets p2m_size: a PV stream with p2m_size 0 has no pfn
    at all (no p2m frame, no start-info page); it must be a MalformedStream at p2m_size, not reach the
    converter (which packed p2m_end_pfn = -1 into a u32 and died with struct.error)."""
    s = hb.Stream(width).pv_header(0).i32(-9).end_body().pv_tail([0])
    error = rejects(s.bytes(), match="p2m_size 0", width=width, guest="pv")
    assert error.offset == s.marks["p2m_size"]


@pytest.mark.parametrize("max_id", [4096, 5000, -1])
def test_vcpu_max_id_out_of_range(max_id):
    s = pv_prefix().mark("bad").i32(-2).i32(max_id).raw(bytes(8))
    assert rejects(s.bytes(), match="max_vcpu_id").offset == s.marks["bad"] + 4


def test_unknown_device_model_signature():
    s = hb.minimal_hvm(dm=b"DeviceModelRecord0003")
    assert rejects(s.bytes(), match="unknown device-model signature").offset == s.marks["dm"]


def test_qemu_record_without_qevm():
    s = hb.minimal_hvm(dm=b"")
    data = s.bytes()[: s.marks["dm"]] + b"QemuDeviceModelRecord" + b"XXXX"
    rejects(data, match="not QEVM")


def test_bad_xl_header_fields():
    rejects(hb.XL_MAGIC + struct.pack("<IIII", 0x04030201, 0, 0, 0), match="byte-order")
    rejects(hb.XL_MAGIC + struct.pack("<IIII", 0x01020304, 4, 0, 0), UnsupportedStream, "unknown mandatory")
    rejects(hb.XL_MAGIC + struct.pack("<IIII", 0x01020304, 1, 0, 2) + b"ab", match="cannot hold")
    rejects(hb.XL_MAGIC + struct.pack("<IIII", 0x01020304, 1, 0, 8) + struct.pack("<I", 5) + b"abcd",
            match="overruns")
    rejects(hb.XL_MAGIC + struct.pack("<IIII", 0x01020304, 1, 0, 0x7FFFFFFF), match="sane bounds")


def compressed_checkpoint_prefix() -> hb.Stream:
    s = pv_prefix().batch([0], [hb.page(0)]).i32(-13).end_body().pv_tail([0])
    return s.batch([0])


def test_compressed_data_length_beyond_sane_bounds():
    s = compressed_checkpoint_prefix().mark("bad").i32(-12).ulong(16 << 20 | 1)
    assert rejects(s.bytes(), match="COMPRESSED_DATA length").offset == s.marks["bad"] + 4
    s = compressed_checkpoint_prefix().i32(-12).ulong(2**63)
    rejects(s.bytes(), match="COMPRESSED_DATA length")


@pytest.mark.parametrize(
    "tmem,message",
    [
        (struct.pack("<7I", 1, 4, 0, 0, 0, 0, 0xFFFFFFFF), "separators"),
        (struct.pack("<7I", 2, 4, 0xFFFFFFFF, 0, 0, 0, 0xFFFFFFFF), "version 2"),
        (struct.pack("<7I", 1, 99999, 0xFFFFFFFF, 0, 0, 0, 0xFFFFFFFF), "max_pools"),
        (struct.pack("<7I", 1, 4, 0xFFFFFFFF, 0, 0, 0, 0xFFFFFFFF) + struct.pack("<I", 4), "not below max_pools"),
        (struct.pack("<7I", 1, 4, 0xFFFFFFFF, 0, 0, 0, 0xFFFFFFFF) + struct.pack("<III", 1, 0xF1, 1) + bytes(16),
         "page size"),
    ],
)
def test_tmem_beyond_sane_bounds(tmem, message):
    s = pv_prefix().i32(-5).raw(tmem).raw(bytes(64))
    error = rejects(s.bytes(), (MalformedStream, UnsupportedStream), message)
    assert error.offset >= len(pv_prefix().bytes())


def test_physmap_entry_overrunning_its_toolstack_record():
    blob = struct.pack("<II", 1, 1) + struct.pack("<QQQI", 1, 2, 3, 40) + b"short\0"
    s = pv_prefix().mark("bad").toolstack(blob)
    error = rejects(s.bytes(), match="overruns its")
    assert error.offset == s.marks["bad"] + 8 + 8
    blob = struct.pack("<II", 1, 3) + struct.pack("<QQQI", 1, 2, 3, 2) + b"a\0" + bytes(4)
    rejects(pv_prefix().toolstack(blob).bytes(), match="cannot hold 3 physmap entries")


@pytest.mark.parametrize("length", [0, (16 << 20) + 1, 0xFFFFFFFF])
def test_toolstack_length_out_of_bounds(length):
    rejects(pv_prefix().i32(-18).u32(length).bytes(), match="TOOLSTACK length")


def test_hvm_context_and_unmapped_counts_out_of_bounds():
    s = hb.Stream(64).ulong(0x20).i32(-9).end_body().raw(bytes(24)).u32(0xFFFFFFFF)
    rejects(s.bytes(), match="HVM context", guest="hvm")
    s = pv_prefix().i32(-9).end_body().u32(17)
    rejects(s.bytes(), match="unmapped pfn count 17")


def test_hostile_lengths_allocate_nothing_before_the_data_arrives():
    """A declared 16 MiB TOOLSTACK blob: the parser asks for data and holds only what it was fed."""
    header = pv_prefix().i32(-18).u32(16 << 20).raw(bytes(1000)).bytes()
    tracemalloc.start()
    parser = LegacyParser()
    parser.feed(header)
    while parser.next_event() is not NEED_DATA:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * len(header) + (1 << 20)


def valid_streams():
    return [small_pv().bytes(), hb.minimal_hvm(32).bytes(), small_pv(32).bytes()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(3)),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), max_size=6),
    st.integers(min_value=0),
)
def test_mutated_streams_raise_only_stream_errors(which, flips, cut):
    data = bytearray(valid_streams()[which])
    for position, value in flips:
        data[position % len(data)] = value
    data = bytes(data[: len(data) - cut % 64])
    try:
        events = parse_bytes(data)
    except StreamError as error:
        assert error.offset is not None and "\n" not in str(error)
    else:
        assert isinstance(events[-1], (ev.EndOfStream, ev.TrailingData, ev.XlGoMessage))


@pytest.mark.parametrize("form", ["qemu", "xenops"])
def test_truncation_at_every_byte_of_a_to_eof_or_xenops_qemu_record(form):
    s = hb.minimal_hvm(32, dm=b"")
    head = s.bytes()[: s.marks["dm"]]
    record = b"QemuDeviceModelRecord" + (b"QEVM" + b"q" * 20 if form == "qemu" else b"\n" + struct.pack(">I", 8) + b"QEVMqqqq")
    data = head + record
    for cut in range(len(head) - 40, len(data)):
        try:
            events = parse_bytes(data[:cut])
        except (TruncatedStream, DetectionError) as error:
            assert error.offset <= cut
        else:
            assert form == "qemu" and cut >= len(head) + 25 and events[-1].reason == "device-model-to-eof"
