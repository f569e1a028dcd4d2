"""The HVM restorer's payload paths, in both modes (chunks fed through the reader, and passthrough from
an fd): a VERIFY pass counts the pages that differ and writes nothing, and a payload cut short is refused."""

from __future__ import annotations

import os

import pytest

from tests.v2 import hvm_support as hs
from xenstream.hv import abi
from xenstream.v2 import constants as C
from xenstream.v2.errors import TruncatedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, LibxcRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.restore_hvm import HvmRestorer
from xenstream.v2.snapshot_hvm import hvm_snapshot
from xenstream.v2.writer import encode_record

SPEC = hs.HvmGuestSpec.parse(hs.SPEC)


def _page_records(stream: bytes) -> list[LibxcRecord]:
    reader = V2Reader(layer="auto")
    reader.feed(stream)
    reader.feed(b"")
    out = []
    while not isinstance(event := reader.next_event(), EndOfStream):
        assert event is not NEED_DATA
        if isinstance(event, LibxcRecord) and event.type == C.REC_PAGE_DATA:
            out.append(event)
    return out


@pytest.fixture(scope="module")
def bare():
    """A bare libxc stream of the test guest, and its PAGE_DATA records."""
    xen, guest = hs.build()
    stream = hs.save_v2(xen, guest, libxl=False)
    return stream, _page_records(stream)


def _with_verify_pass(stream: bytes, records: list[LibxcRecord], damaged_pages: int) -> bytes:
    """The stream with VERIFY and a second copy of every PAGE_DATA record right after the memory (where
    Xen's sender puts them, before the records that clear special pages); the first byte of the first
    `damaged_pages` data pages of the copy flipped."""
    copies = bytearray(b"".join(stream[r.offset:r.offset + 8 + r.length] for r in records))
    position, left = 0, damaged_pages
    for r in records:
        head = 16 + 8 * len(r.body.pfns)
        for k in range(r.body.page_count):
            if left:
                copies[position + head + k * abi.PAGE_SIZE] ^= 0xFF
                left -= 1
        position += 8 + r.length
    after_memory = records[-1].offset + 8 + records[-1].length
    return stream[:after_memory] + encode_record(C.REC_VERIFY, b"") + bytes(copies) + stream[after_memory:]


def _restore(stream: bytes, passthrough: bool, tmp_path) -> tuple:
    xen = hs.host(SPEC, seed=99)
    domid = xen.create_domain(max_vcpus=SPEC.vcpus, max_pages=SPEC.nr_pages + 16, hvm=True)
    restorer = HvmRestorer(xen, domid, store_evtchn=1, console_evtchn=2,
                           payload="passthrough" if passthrough else "views")
    if passthrough:
        path = tmp_path / "stream"
        path.write_bytes(stream)
        fd = os.open(path, os.O_RDONLY)
        try:
            result = restorer.run_fd(fd, os.read(fd, 3000))  # a head that ends inside the first payload
        finally:
            os.close(fd)
    else:
        for start in range(0, len(stream), 10_000):  # chunks that end mid-page
            restorer.feed(stream[start:start + 10_000])
        result = restorer.finish()
    return xen, restorer, result


@pytest.mark.parametrize("passthrough", [False, True], ids=["views", "passthrough"])
@pytest.mark.parametrize("damaged", [0, 3])
def test_verify_pass_counts_differing_pages_and_writes_none(bare, tmp_path, passthrough, damaged):
    stream, records = bare
    ref_xen, _, ref = _restore(stream, passthrough, tmp_path)
    xen, restorer, result = _restore(_with_verify_pass(stream, records, damaged), passthrough, tmp_path)
    assert restorer.verify_mismatches == damaged
    assert result.pages_written == ref.pages_written == sum(r.body.page_count for r in records)
    assert hvm_snapshot(xen, result.domid) == hvm_snapshot(ref_xen, ref.domid)


@pytest.mark.parametrize("passthrough", [False, True], ids=["views", "passthrough"])
def test_payload_cut_short_is_refused(bare, tmp_path, passthrough):
    stream, records = bare
    biggest = max(records, key=lambda r: r.body.page_count)
    cut = biggest.offset + 8 + biggest.length - abi.PAGE_SIZE - 100
    with pytest.raises(TruncatedStream) as caught:
        _restore(stream[:cut], passthrough, tmp_path)
    assert caught.value.offset == biggest.offset
