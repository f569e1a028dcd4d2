"""An HVM stream's gfns come unchecked from the stream: one far gfn must cost the restore a page, not a p2m
up to it, and a gfn past Xen's guest-physical width (2**36 frames) is the hypervisor's EINVAL, reported
as a MalformedStream at the PAGE_DATA record with no domain left behind."""

from __future__ import annotations

import os

import pytest

from tests.v2 import hvm_support as hs
from xenstream.hv import abi
from xenstream.hv.sim.xen import HVM_GFN_LIMIT
from xenstream.v2 import constants as C
from xenstream.v2.errors import MalformedStream
from xenstream.v2.events import LibxcRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.records import PageData
from xenstream.v2.restore_hvm import restore_hvm_new_domain
from xenstream.v2.writer import encode_record

FAR = 0xF_0000_0000
PAGE = bytes(range(256)) * 16


@pytest.fixture(scope="module")
def source() -> hs.Saved:
    return hs.saved()


def with_page_at(stream: bytes, gfn: int) -> tuple[bytes, int]:
    """The stream with one more PAGE_DATA record (gfn, NOTAB, PAGE) after its first; and that record's offset."""
    reader = V2Reader(layer="auto")
    reader.feed(stream)
    reader.feed(b"")
    while not (isinstance(event := reader.next_event(), LibxcRecord) and event.type == C.REC_PAGE_DATA):
        pass
    at = event.offset + 8 + event.length + (-event.length % 8)
    record = encode_record(C.REC_PAGE_DATA, PageData([gfn], bytes([abi.PAGETYPE_NOTAB])).pack() + PAGE)
    return stream[:at] + record + stream[at:], at


def test_a_far_gfn_restores_into_one_more_p2m_chunk(source):
    stream, _ = with_page_at(source.stream, FAR)
    ref_xen, ref = hs.restore(source.stream)
    spec = hs.HvmGuestSpec.parse(hs.SPEC)
    xen = hs.host(spec)
    result = restore_hvm_new_domain(xen, [stream], max_vcpus=3, max_pages=spec.nr_pages + 17)  # room for the page
    assert bytes(xen.map_foreign(result.domid, [FAR])[0]) == PAGE
    assert xen.get_max_gpfn(result.domid) == FAR
    assert result.pages_populated == ref.pages_populated + 1
    chunks = xen.domains[result.domid].hvm_p2m.chunk_count
    assert chunks == ref_xen.domains[ref.domid].hvm_p2m.chunk_count + 1


@pytest.mark.parametrize("gfn", [HVM_GFN_LIMIT, (1 << 52) - 1])
@pytest.mark.parametrize("source_kind", ["chunks", "fd"])
def test_a_gfn_past_the_guest_physical_width_is_malformed(source, tmp_path, gfn, source_kind):
    stream, at = with_page_at(source.stream, gfn)
    spec = hs.HvmGuestSpec.parse(hs.SPEC)
    xen = hs.host(spec)
    free_before = xen.machine.free_frames(False)
    with pytest.raises(MalformedStream) as info:
        if source_kind == "chunks":
            restore_hvm_new_domain(xen, [stream], max_vcpus=3, max_pages=spec.nr_pages + 16)
        else:
            path = tmp_path / "far.v2"
            path.write_bytes(stream)
            fd = os.open(path, os.O_RDONLY)
            try:
                restore_hvm_new_domain(xen, fd, max_vcpus=3, max_pages=spec.nr_pages + 16)
            finally:
                os.close(fd)
    assert info.value.offset == at
    assert "populate" in str(info.value) and f"{gfn:#x}" in str(info.value)
    assert xen.domains == {}  # the half-restored domain is destroyed
    assert xen.machine.free_frames(False) == free_before  # and its memory given back
