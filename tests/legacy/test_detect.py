"""Variant detection (spec 10): decisions, their evidence, and undecidable input naming the option to pass."""

import struct

import pytest

from tests.legacy import handbuilt as hb
from xenstream.legacy.detect import detect_guest, detect_width, identify_wrapper
from xenstream.legacy.errors import DetectionError, MalformedStream, StreamError, TruncatedStream, UnsupportedStream
from xenstream.legacy.parser import parse_bytes


def test_width_from_bytes_4_to_7():
    assert detect_width(struct.pack("<Q", 0x40000), 0, None)[0] == 64
    assert detect_width(struct.pack("<II", 0x40000, 0xFFFFFFFF), 0, None)[0] == 32  # PV marker
    assert detect_width(struct.pack("<Ii", 0x100000, -7), 0, None)[0] == 32  # HVM, TSC_INFO first
    width, evidence = detect_width(struct.pack("<Q", 0x500), 0, None)
    assert evidence.source == "detected" and "upper half" in evidence.reason


def test_width_option_wins_over_bytes():
    width, evidence = detect_width(struct.pack("<Q", 0x500), 0, 32)
    assert width == 32 and evidence.source == "option"


@pytest.mark.parametrize(
    "head",
    [
        struct.pack("<II", 0, 0xFFFFFFFF),  # p2m_size 0 with a 32-bit reading
        struct.pack("<II", 0x10000000, 5),  # p2m_size beyond 2^28 either way
        struct.pack("<Q", 0),  # zero everywhere
        b"\x01\x02\x03",  # too short to tell
    ],
)
def test_undecidable_width_names_the_option(head):
    with pytest.raises(DetectionError, match=r"width=32\|64 \(--width\)"):
        detect_width(head, 0, None)


def test_guest_from_the_word_after_p2m_size():
    pv = hb.minimal_pv().bytes()
    guest, evidence = detect_guest(pv[:28], 0, 8, None)
    assert guest == "pv" and "vcpu" in evidence.reason
    for first in (-5, -7, 1, 1024):
        assert detect_guest(struct.pack("<Qi", 0x100, first) + bytes(4), 0, 8, None)[0] == "hvm"


@pytest.mark.parametrize("first", [-2, -18, 0, 1025, -1])
def test_undecidable_guest_names_the_option(first):
    head = struct.pack("<Qi", 0x100, first) + bytes(16)
    with pytest.raises(DetectionError, match=r"guest=pv\|hvm \(--guest\)") as caught:
        detect_guest(head, 100, 8, None)
    assert caught.value.offset == 108


def test_undecidable_stream_is_decided_by_the_options():
    s = hb.Stream(64).ulong(0x20).vcpu_info(0, 1).i32(-9).end_body().hvm_tail().dm_record()
    with pytest.raises(DetectionError, match="--guest"):
        parse_bytes(s.bytes())
    events = parse_bytes(s.bytes(), guest="hvm")
    assert events[0].guest == "hvm" and events[-1].reason == "last-checkpoint"


def test_wrappers():
    assert identify_wrapper(hb.XL_MAGIC, None)[0] == "xl"
    assert identify_wrapper(b"LinuxGuestRecord" + bytes(16), None)[0] == "xend"
    assert identify_wrapper(b"libvirt-xml\n \0 \r" + bytes(16), None)[0] == "libvirt"
    assert identify_wrapper(b"XenSavedDomain\n" + bytes(17), None)[0] == "xenops"
    wrapper, evidence = identify_wrapper(struct.pack("<Q", 5) + bytes(24), None)
    assert wrapper == "none" and evidence.source == "detected"
    assert identify_wrapper(struct.pack("<Q", 5) + bytes(24), False)[1].source == "option"


@pytest.mark.parametrize(
    "head,what",
    [(b"LibxlFmt" + bytes(24), "v2 libxl"), (b"\xff" * 8 + b"XENF" + bytes(20), "v2 libxc")],
)
def test_v2_streams_are_recognised_and_refused(head, what):
    with pytest.raises(UnsupportedStream, match=what):
        parse_bytes(head)


def test_xl_header_with_the_v2_flag_is_refused():
    data = hb.Stream().xl_header(flags=3).raw(hb.minimal_pv().bytes()).bytes()
    with pytest.raises(UnsupportedStream, match="STREAMV2") as caught:
        parse_bytes(data)
    assert caught.value.offset == 36


def test_bad_xl_magic():
    almost = hb.XL_MAGIC[:-1] + b"\n" + bytes(16)
    with pytest.raises(MalformedStream, match="bad xl magic"):
        parse_bytes(almost + hb.minimal_pv().bytes())
    with pytest.raises(MalformedStream, match="bad xl magic") as caught:
        parse_bytes(hb.minimal_pv().bytes(), xl=True)
    assert caught.value.offset == 0


def test_xl_header_when_told_there_is_none():
    data = hb.Stream().xl_header().raw(hb.minimal_pv().bytes()).bytes()
    with pytest.raises(DetectionError, match=r"xl=True \(--xl\)"):
        parse_bytes(data, xl=False)
    assert parse_bytes(data, xl=True)[1].wrapper == "xl"


def test_evidence_is_reported_for_each_property():
    detected = parse_bytes(hb.Stream().xl_header().raw(hb.minimal_pv(32, 4).bytes()).bytes())[1]
    assert (detected.wrapper, detected.width, detected.guest, detected.guest_width) == ("xl", 32, "pv", 4)
    assert [e.what for e in detected.evidence] == ["wrapper", "width", "guest", "guest_width"]
    assert detected.offset == 48 + 4 + len(b'{"c_info": {"type": "pv"}}\0')


@pytest.mark.parametrize("length", [0, 3, 7, 27])
def test_tiny_inputs_fail_with_a_stream_error(length):
    data = hb.minimal_pv().bytes()[:length]
    with pytest.raises((DetectionError, TruncatedStream)):
        parse_bytes(data)
    with pytest.raises(StreamError):
        parse_bytes(data, width=64, guest="pv")
