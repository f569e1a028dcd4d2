"""Bad input: each kind raises the right StreamError subclass at the right offset, memory stays bounded."""

from __future__ import annotations

import io
import struct
import tracemalloc

import pytest

from tests.v2.codec_strategies import read_events
from xenstream.v2 import constants as C
from xenstream.v2 import libxl_records as L
from xenstream.v2 import records as R
from xenstream.v2.errors import MalformedStream, StreamError, TruncatedStream, UnsupportedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, LibxcRecord, SkippedRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.writer import V2Writer, encode_record
from xenstream.v2.xl_header import XlHeader

PV_INFO_AT = 40  # first record after image (24) and domain (16) headers


def libxc_stream(*records, version=3, end=True) -> bytes:
    sink = io.BytesIO()
    w = V2Writer(sink)
    w.image_header(R.ImageHeader(version=version))
    w.domain_header(R.DomainHeader(guest_type=1))
    for record in records:
        if isinstance(record, bytes):
            w.write(record)
        else:
            w.record(record)
    if end:
        w.record(R.End())
    return sink.getvalue()


def libxl_stream(libxc: bytes, *after, end=True) -> bytes:
    out = L.LibxlHeader().pack() + encode_record(1, b"") + libxc
    out += b"".join(x if isinstance(x, bytes) else encode_record(x.TYPE, x.pack()) for x in after)
    return out + (encode_record(0, b"") if end else b"")


def read_all(data: bytes, **options):
    return read_events([data], **options)


def error_of(data: bytes, **options) -> StreamError:
    with pytest.raises(StreamError) as info:
        read_all(data, **options)
    return info.value


def patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def page_data_record(pfns, types, fill=b"\xaa") -> bytes:
    from xenstream.v2.writer import encode_page_data_header, page_data_payload_length

    return encode_page_data_header(pfns, types) + fill * page_data_payload_length(types)


GOOD = libxc_stream(R.X86PvInfo(8, 4), R.StaticDataEnd(), page_data_record([0, 1], [0, 0xF]))


def test_good_stream_reads():
    events = read_all(GOOD)
    assert events[-1] == EndOfStream(offset=len(GOOD), complete=True, checkpoints=0)


@pytest.mark.parametrize("layer", ["auto", "libxc"])
@pytest.mark.parametrize("payload", ["views", "passthrough"])
def test_every_truncation_is_reported(layer, payload):
    libxl = libxl_stream(GOOD)
    full = XlHeader.with_config(b"{}\0").pack() + libxl
    data = {"auto": full, "libxc": GOOD}[layer]
    for cut in range(len(data)):
        reader = V2Reader(layer=layer, payload=payload)
        reader.feed(data[:cut])
        reader.feed(b"")
        with pytest.raises(TruncatedStream) as info:
            while True:
                event = reader.next_event()
                assert event is not NEED_DATA and not isinstance(event, EndOfStream)
                if reader.payload_remaining and payload == "passthrough":
                    reader.take_payload()
        assert 0 <= info.value.offset <= cut, cut
        assert "\n" not in str(info.value)


def test_empty_input_is_truncated():
    assert isinstance(error_of(b""), TruncatedStream)


@pytest.mark.parametrize(
    "offset, new, layer, kind, text",
    [
        (0, b"\xfe", "libxc", MalformedStream, "marker"),
        (0, b"\xfe", "auto", UnsupportedStream, "not a v2 stream"),
        (8, b"XENG", "auto", MalformedStream, "id"),
        (12, struct.pack(">I", 4), "auto", MalformedStream, "version 4"),
        (12, struct.pack(">I", 1), "auto", MalformedStream, "version 1"),
        (16, struct.pack(">H", 2), "auto", MalformedStream, "reserved option"),
        (20, b"\x01", "auto", MalformedStream, "reserved"),
        (16, struct.pack(">H", 1), "auto", UnsupportedStream, "big-endian"),
        (24, struct.pack("<I", 3), "auto", MalformedStream, "guest type"),
        (28, struct.pack("<H", 13), "auto", MalformedStream, "page_shift"),
        (30, b"\x01", "auto", MalformedStream, "reserved"),
    ],
)
def test_header_errors_at_offset_zero_or_24(offset, new, layer, kind, text):
    error = error_of(patched(GOOD, offset, new), layer=layer)
    assert type(error) is kind
    assert error.offset == (0 if offset < 24 else 24)
    assert text in error.message


def test_record_length_over_limit_is_refused_before_buffering():
    header = libxc_stream(end=False)
    for length in (C.RECORD_LENGTH_MAX + 1, 0xFFFFFFFF):
        tracemalloc.start()
        error = error_of(header + struct.pack("<II", R.HvmContext.TYPE, length) + bytes(64))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(error, MalformedStream) and error.offset == len(header)
        assert "limit" in error.message
        assert peak < 1 << 20


def test_record_past_end_of_input_is_truncated_with_bounded_memory():
    header = libxc_stream(end=False)
    tracemalloc.start()
    reader = V2Reader()
    reader.feed(header + struct.pack("<II", R.HvmContext.TYPE, C.RECORD_LENGTH_MAX))
    for _ in range(64):  # 4 MiB of a 128 MiB record, fed in 64 KiB pieces
        assert reader.next_event() is not None
        reader.feed(bytes(65536))
    reader.feed(b"")
    with pytest.raises(TruncatedStream) as info:
        while True:
            reader.next_event()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.value.offset == len(header)
    assert peak < 16 << 20


def test_page_data_claiming_huge_count_is_refused():
    header = libxc_stream(end=False)
    record = struct.pack("<IIII", 1, 4096, 0xFFFFFFFF, 0)
    error = error_of(header + record)
    assert isinstance(error, MalformedStream) and error.offset == len(header)


def test_nonzero_padding():
    data = libxc_stream(R.HvmContext(b"abc"))
    at = PV_INFO_AT + 8 + 3
    error = error_of(patched(data, at, b"\x01"))
    assert isinstance(error, MalformedStream) and error.offset == at and "padding" in error.message
    assert read_all(patched(data, at, b"\x01"), strict=False)[-1].complete


@pytest.mark.parametrize(
    "record, patch_at, new, text",
    [
        (page_data_record([1], [0]), 12, b"\x01", "reserved"),  # PAGE_DATA reserved word
        (page_data_record([1], [0]), 16 + 6, b"\x10", "reserved bits"),  # pfn bits 52-55
        (page_data_record([1], [0]), 16 + 7, b"\x01", "reserved bits"),  # pfn bits 56-59
        (R.X86PvVcpuBasic(0, b"x" * 8), 12, b"\x01", "reserved"),
        (R.X86TscInfo(), 8 + 20, b"\x01", "reserved"),
        (R.HvmParams([(1, 2)]), 12, b"\x01", "reserved"),
        (R.X86PvInfo(8, 4), 8 + 2, b"\x01", "reserved"),
        (R.Verify(), 4, b"\x08", "expected 0"),
    ],
)
def test_reserved_fields_strict_only(record, patch_at, new, text):
    raw = record if isinstance(record, bytes) else encode_record(record.TYPE, record.pack())
    bad = patched(raw, patch_at, new)
    if isinstance(record, R.Verify):
        bad += bytes(8)  # the length now claims an 8-byte body
    data = libxc_stream(bad)
    error = error_of(data)
    assert isinstance(error, MalformedStream) and error.offset == PV_INFO_AT and text in error.message
    assert read_all(data, strict=False)[-1].complete


@pytest.mark.parametrize(
    "body, text",
    [
        (struct.pack("<II", 0, 0), "count is 0"),
        (struct.pack("<IIQ", 1, 0, 5 << 60) + bytes(4096), "invalid page type 0x5"),
        (struct.pack("<IIQ", 1, 0, 8 << 60) + bytes(4096), "invalid page type 0x8"),
        (struct.pack("<IIQ", 1, 0, 0), "expected 4112"),
        (struct.pack("<IIQ", 1, 0, 0xF << 60) + bytes(4096), "expected 16"),
        (struct.pack("<II", 2, 0) + bytes(8), "too short for 2"),
    ],
)
def test_page_data_structure(body, text):
    error = error_of(libxc_stream(encode_record(1, body)))
    assert isinstance(error, MalformedStream) and error.offset == PV_INFO_AT and text in error.message


@pytest.mark.parametrize(
    "record_type, body, text",
    [
        (R.X86TscInfo.TYPE, bytes(16), "expected 24"),
        (R.SharedInfo.TYPE, bytes(4000), "expected 4096"),
        (R.HvmContext.TYPE, b"", "empty"),
        (R.HvmParams.TYPE, struct.pack("<II", 2, 0) + bytes(16), "expected 40"),
        (R.X86CpuidPolicy.TYPE, bytes(25), "multiple of 24"),
        (R.X86MsrPolicy.TYPE, b"", "multiple of 16"),
        (R.X86PvP2mFrames.TYPE, bytes(12), "multiple of 8"),
        (R.X86PvVcpuXsave.TYPE, bytes(4), "at least 8"),
        (R.CheckpointDirtyPfnList.TYPE, bytes(4), "multiple of 8"),
    ],
)
def test_record_body_lengths(record_type, body, text):
    error = error_of(libxc_stream(encode_record(record_type, body)))
    assert isinstance(error, MalformedStream) and error.offset == PV_INFO_AT and text in error.message


def test_unknown_mandatory_libxc_record_is_an_error():
    error = error_of(libxc_stream(encode_record(0x13, b"abc")))
    assert isinstance(error, MalformedStream) and error.offset == PV_INFO_AT and "mandatory" in error.message


def test_unknown_optional_libxc_record_is_skipped():
    data = libxc_stream(encode_record(0x80000013, b"x" * 5000), R.Verify())
    for chunks in ([data], [data[i : i + 7] for i in range(0, len(data), 7)]):
        events = read_events(chunks)
        skipped = [e for e in events if isinstance(e, SkippedRecord)]
        assert skipped == [SkippedRecord(offset=PV_INFO_AT, index=0, type=0x80000013, length=5000)]
        verify = [e for e in events if isinstance(e, LibxcRecord)][0]
        assert verify.offset == PV_INFO_AT + 8 + 5000 and verify.index == 1
        assert events[-1].complete


def test_unknown_optional_libxc_record_truncated():
    data = libxc_stream(encode_record(0x80000013, b"x" * 5000), end=False)[:-10]
    error = error_of(data)
    assert isinstance(error, TruncatedStream) and error.offset == PV_INFO_AT


@pytest.mark.parametrize("record_type", [6, 0x80000000])
def test_unknown_libxl_record_is_an_error(record_type):
    data = libxl_stream(GOOD, encode_record(record_type, b""))
    error = error_of(data)
    assert isinstance(error, MalformedStream) and error.offset == 24 + len(GOOD)


def test_libxl_header_errors():
    data = libxl_stream(GOOD)
    assert "ident" in error_of(patched(data, 0, b"LibxX"), layer="libxl").message
    assert "version 3" in error_of(patched(data, 8, struct.pack(">I", 3))).message
    assert "reserved option" in error_of(patched(data, 12, struct.pack(">I", 4))).message
    assert read_all(patched(data, 12, struct.pack(">I", 4)), strict=False)[-1].complete
    assert isinstance(error_of(patched(data, 12, struct.pack(">I", 1))), UnsupportedStream)


def test_checkpoint_end_outside_checkpoint():
    error = error_of(libxl_stream(GOOD, L.CheckpointEnd()))
    assert isinstance(error, MalformedStream) and error.offset == 24 + len(GOOD)


def test_stream_without_end_is_truncated():
    data = libxc_stream(R.X86PvInfo(8, 4), end=False)
    error = error_of(data)
    assert isinstance(error, TruncatedStream) and error.offset == len(data)


def test_xl_header_errors():
    libxl = libxl_stream(GOOD)
    header = XlHeader.with_config(b"{}\0")
    assert "magic" in error_of(b"Xen saved domain, xl format\n \0 X" + header.pack()[32:] + libxl, layer="xl").message
    weird_order = patched(header.pack(), 32, b"\x01\x01\x01\x01") + libxl
    assert "byteorder" in error_of(weird_order).message
    unknown_flag = XlHeader(mandatory_flags=0x7, optional_data=header.optional_data).pack() + libxl
    assert "unknown mandatory" in error_of(unknown_flag).message
    assert read_all(unknown_flag, strict=False)[-1].complete
    bad_config = XlHeader(optional_data=struct.pack("<I", 99) + b"{}").pack() + libxl
    assert "config length" in error_of(bad_config).message


def test_xl_optional_data_claim_is_bounded():
    data = XlHeader().pack()[:44] + struct.pack("<I", 0xFFFFFFF0)
    tracemalloc.start()
    error = error_of(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(error, UnsupportedStream) and error.offset == 0 and peak < 1 << 20


def test_xl_payload_without_streamv2():
    plain = XlHeader(mandatory_flags=C.XL_FLAG_JSON).pack()
    events = read_all(plain + GOOD)
    assert events[-1] == EndOfStream(offset=48 + len(GOOD), complete=True, checkpoints=0)
    legacy = plain + struct.pack("<Q", 0x1000) + bytes(64)
    error = error_of(legacy)
    assert isinstance(error, UnsupportedStream) and error.offset == 48


def test_trailing_bytes_are_counted_not_parsed():
    reader = V2Reader()
    reader.feed(GOOD + b"garbage")
    while not isinstance(reader.next_event(), EndOfStream):
        pass
    reader.feed(b"more")
    reader.feed(b"")
    assert reader.trailing_bytes == len(b"garbagemore")
    assert isinstance(reader.next_event(), EndOfStream)


def test_messages_are_one_line_with_offset():
    error = error_of(patched(GOOD, 8, b"XENG"))
    assert str(error).startswith("offset 0x0: ") and "\n" not in str(error)


def test_page_data_too_short_for_its_count_at_end_of_input():
    error = error_of(libxc_stream(encode_record(1, b""), end=False))
    assert isinstance(error, MalformedStream) and error.offset == PV_INFO_AT
