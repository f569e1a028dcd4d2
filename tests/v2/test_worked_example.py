"""Spec section 7: the worked example is reproduced byte for byte by our writer (its published sha256s)."""

from __future__ import annotations

import hashlib
import io

import pytest

from tests.v2.codec_strategies import read_events
from xenstream.v2 import libxl_records as L
from xenstream.v2 import records as R
from xenstream.v2.events import EndOfStream, LibxcRecord
from xenstream.v2.writer import V2Writer, encode
from xenstream.v2.xl_header import XlHeader

EXPECTED = {
    "libxc": (9400, "7e5ec5d368b02f9f8dd453be9776fddf22156829fb45cb913f40b5405e70283d"),
    "libxl": (9432, "9afab0ead2d460a8f0973b142c7f930b0b9c73ae4d606a47d43aec9decc6376e"),
    "xl": (9487, "3db02c1c2e22dc6602413a0d0aec3bb2b17d53401730ed0ec3e9bb7bfe1122b2"),
}


def worked_example(wrap: str) -> bytes:
    sink = io.BytesIO()
    w = V2Writer(sink)
    if wrap == "xl":
        w.xl_header(XlHeader.with_config(b"{}\0"))
    if wrap != "libxc":
        w.libxl_header(L.LibxlHeader())
        w.libxl_record(L.LibxcContext())
    w.image_header(R.ImageHeader(version=3))
    w.domain_header(R.DomainHeader(guest_type=1, xen_major=4, xen_minor=20))
    w.record(R.X86PvInfo(guest_width=8, pt_levels=4))
    w.record(R.StaticDataEnd())
    w.record(R.X86PvP2mFrames(start_pfn=0, end_pfn=0, frames=[0]))
    w.page_data([0], [0], [bytes(4096)])
    w.record(R.X86PvVcpuBasic(vcpu_id=0, context=bytes(5168)))
    w.record(R.End())
    if wrap != "libxc":
        w.libxl_record(L.LibxlEnd())
    assert w.position == len(sink.getvalue())
    return sink.getvalue()


@pytest.mark.parametrize("wrap", ["libxc", "libxl", "xl"])
def test_sha256_matches_spec(wrap):
    data = worked_example(wrap)
    assert (len(data), hashlib.sha256(data).hexdigest()) == EXPECTED[wrap]


def test_listing_bytes():
    data = worked_example("libxc")
    assert data[0x00:0x18].hex(" ") == "ff ff ff ff ff ff ff ff 58 45 4e 46 00 00 00 03 00 00 00 00 00 00 00 00"
    assert data[0x18:0x28].hex(" ") == "01 00 00 00 0c 00 00 00 04 00 00 00 14 00 00 00"
    assert data[0x58:0x60].hex(" ") == "01 00 00 00 10 10 00 00"
    assert data[0x1070:0x1078].hex(" ") == "04 00 00 00 38 14 00 00"
    assert data[0x24B0:] == bytes(8)
    xl = worked_example("xl")
    assert xl[0x20:0x37].hex(" ") == "04 03 02 01 03 00 00 00 00 00 00 00 07 00 00 00 03 00 00 00 7b 7d 00"
    assert xl[0x37:0x3F] == b"LibxlFmt"


def test_section_7_record_examples():
    tsc = "08 00 00 00 18 00 00 00 00 00 00 00 80 84 1e 00 " + "00 " * 8 + "00 " * 7 + "00"
    assert encode(R.X86TscInfo(mode=0, khz=2000000)).hex(" ") == tsc
    emulator = "03 00 00 00 0d 00 00 00 02 00 00 00 00 00 00 00 b0 b1 b2 b3 b4 00 00 00"
    assert encode(L.EmulatorContext(emulator_id=2, index=0, data=bytes.fromhex("b0b1b2b3b4"))).hex(" ") == emulator
    assert encode(R.SharedInfo(bytes(4096)))[:8].hex(" ") == "07 00 00 00 00 10 00 00"


@pytest.mark.parametrize("wrap", ["libxc", "libxl", "xl"])
def test_reader_reads_it_back(wrap):
    data = worked_example(wrap)
    events = read_events([data])
    assert events[-1] == EndOfStream(offset=len(data), complete=True, checkpoints=0)
    start = {"libxc": 0, "libxl": 24, "xl": 0x37 + 24}[wrap]
    page_data = next(e for e in events if isinstance(e, LibxcRecord) and e.type == 1)
    assert page_data.offset == start + 0x58 and page_data.length == 4112
