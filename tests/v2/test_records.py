"""Record codecs: pack/unpack round trips for every class, the registries, and decoding rules."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.v2.codec_strategies import domain_header, image_header, libxc_body, libxl_body, xl_header
from xenstream.v2 import constants as C
from xenstream.v2 import libxl_records as L
from xenstream.v2 import records as R
from xenstream.v2.xl_header import XlHeader


@settings(max_examples=300, deadline=None)
@given(st.one_of(libxc_body, libxl_body))
def test_body_round_trip(record):
    assert type(record).unpack(memoryview(record.pack())) == record


@settings(max_examples=100, deadline=None)
@given(st.one_of(image_header, domain_header, xl_header))
def test_header_round_trip(header):
    packed = header.pack()
    assert type(header).unpack(memoryview(packed)) == header
    assert len(packed) == getattr(header, "SIZE", None) or getattr(header, "size", None)


def test_libxl_header_round_trip():
    for options in (0, C.LIBXL_OPTION_LEGACY):
        assert L.LibxlHeader.unpack(L.LibxlHeader(options).pack()) == L.LibxlHeader(options)
    assert L.LibxlHeader().pack().hex(" ") == "4c 69 62 78 6c 46 6d 74 00 00 00 02 00 00 00 00"


def test_registries_cover_every_spec_type():
    assert sorted(R.LIBXC_RECORDS) == list(range(0x13))
    assert sorted(L.LIBXL_RECORDS) == list(range(6))
    assert R.LIBXC_RECORD_NAMES[0x11] == "X86_CPUID_POLICY"
    assert R.libxc_record_name(0x80000001) == "UNKNOWN(0x80000001)"
    assert L.libxl_record_name(5) == "CHECKPOINT_STATE"


def test_page_data_words_layout():
    record = R.PageData(pfns=[0x12345, 7, 9], types=[0xC, 0xF, 0x0])
    packed = record.pack()
    assert struct.unpack("<IIQQQ", packed) == (3, 0, (0xC << 60) | 0x12345, (0xF << 60) | 7, 9)
    assert record.page_count == 2 and record.payload_length == 8192 and record.length == 8 + 24 + 8192
    assert record.data_pfns() == [0x12345, 9]


def test_page_types_without_payload():
    assert R.data_page_count([0xD, 0xE, 0xF, 0x0, 0x9]) == 2


def test_p2m_frame_count_formula():
    assert R.X86PvP2mFrames.frame_count(0, 0, 8) == 1
    assert R.X86PvP2mFrames.frame_count(0, 511, 8) == 1
    assert R.X86PvP2mFrames.frame_count(0, 512, 8) == 2
    assert R.X86PvP2mFrames.frame_count(1000, 1100, 4) == 2


def test_toolstack_is_read_only():
    assert R.Toolstack.unpack(b"abc") == R.Toolstack(b"abc")
    with pytest.raises(TypeError):
        R.Toolstack(b"abc").pack()


def test_non_strict_tolerates_what_xen_ignores():
    with pytest.raises(R.BodyError):
        R.End.unpack(b"x")
    assert R.End.unpack(b"x", strict=False) == R.End()
    long_info = bytes([8, 4]) + bytes(8)
    with pytest.raises(R.BodyError):
        R.X86PvInfo.unpack(long_info)
    assert R.X86PvInfo.unpack(long_info, strict=False) == R.X86PvInfo(8, 4)
    flagged = struct.pack("<IIQ", 0x10, 1, 5)
    with pytest.raises(R.BodyError):
        R.X86MsrPolicy.unpack(flagged)
    assert R.X86MsrPolicy.unpack(flagged, strict=False).entries[0] == R.MsrEntry(idx=0x10, val=5, flags=1)


def test_xenstore_pairs():
    record = L.EmulatorXenstoreData.from_pairs([(b"a/b", b"1"), (b"c", b"")])
    assert record.data == b"a/b\x001\x00c\x00\x00"
    assert record.pairs() == [(b"a/b", b"1"), (b"c", b"")]
    with pytest.raises(R.BodyError):
        L.EmulatorXenstoreData(2, 0, b"odd\0").pairs()
    with pytest.raises(R.BodyError):
        L.EmulatorXenstoreData(2, 0, b"key\0value").pairs()


def test_checkpoint_state_length():
    assert L.CheckpointState.unpack(struct.pack("<I", 2)) == L.CheckpointState(2)
    with pytest.raises(R.BodyError):
        L.CheckpointState.unpack(struct.pack("<II", 2, 0))
    assert L.CheckpointState.unpack(struct.pack("<II", 2, 0), strict=False) == L.CheckpointState(2)


def test_xl_header_byte_orders_and_config():
    little = XlHeader.with_config(b"{}\0")
    big = XlHeader.with_config(b"{}\0", byteorder=">")
    assert little.pack()[32:36] == bytes.fromhex("04030201")
    assert big.pack()[32:36] == bytes.fromhex("01020304")
    assert XlHeader.unpack(big.pack()).config == b"{}\0"
    assert XlHeader().config is None and XlHeader().size == 48


def test_xl_config_of_odd_optional_data():
    assert XlHeader(optional_data=b"ab").config is None
    assert XlHeader(optional_data=struct.pack("<I", 10) + b"abc").config == b"abc"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, (1 << 60) - 1), st.sampled_from([0, 1, 2, 3, 4, 9, 0xA, 0xB, 0xC, 0xD, 0xE, 0xF])), min_size=1, max_size=40))
def test_pfn_words_decode_like_the_arithmetic_definition(entries):
    words = [(t << 60) | low for low, t in entries]  # low may carry reserved bits 52-59
    raw = struct.pack(f"<{len(words)}Q", *words)
    record = R.PageData.unpack_words(memoryview(raw), len(words), strict=False)
    assert tuple(record.pfns) == tuple(w & 0x000FFFFFFFFFFFFF for w in words)
    assert tuple(record.types) == tuple(w >> 60 for w in words)
    has_reserved = any(w & 0x0FF0000000000000 for w in words)
    if has_reserved:
        with pytest.raises(R.BodyError, match="reserved bits"):
            R.PageData.unpack_words(memoryview(raw), len(words), strict=True)
    else:
        assert R.PageData.unpack_words(memoryview(raw), len(words)) == record


@pytest.mark.parametrize("bad_type", [5, 6, 7, 8])
def test_invalid_page_type_names_the_entry(bad_type):
    raw = struct.pack("<3Q", 1, (bad_type << 60) | 0x77, 2)
    with pytest.raises(R.BodyError, match=f"entry 1 \\(pfn 0x77\\) has invalid page type {bad_type:#x}"):
        R.PageData.unpack_words(memoryview(raw), 3)
