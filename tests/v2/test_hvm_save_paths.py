"""The HVM saver's fast paths: PAGE_DATA heads computed without an int per gfn equal the writer's
encoding, an unmappable gfn is reported by number, and payloads written straight to an fd survive
short writes."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.v2 import hvm_support as hs
from xenstream.hv import abi
from xenstream.v2 import save_hvm as engine
from xenstream.v2.save import SaveError
from xenstream.v2.writer import V2Writer, encode_page_data_header

KNOWN = sorted(abi.KNOWN_PAGETYPES)
uniform = st.sampled_from([abi.PAGETYPE_NOTAB, abi.PAGETYPE_XTAB]).flatmap(
    lambda t: st.integers(1, abi.MAX_BATCH_SIZE).map(lambda n: [t] * n))
mixed = st.lists(st.sampled_from(KNOWN), min_size=1, max_size=abi.MAX_BATCH_SIZE)


@settings(max_examples=60, deadline=None)
@given(first=st.integers(0, (1 << 40) - 1).map(lambda f: f * abi.MAX_BATCH_SIZE) | st.integers(0, (1 << 52) - 2048),
       types=uniform | mixed)
def test_page_data_head_equals_the_writer_encoding(first, types):
    codes = [abi.pfinfo_from_pagetype(t) for t in types]
    head = engine.page_data_head(first, codes, engine.code_set(codes))
    assert head == encode_page_data_header(range(first, first + len(types)), types)


class _DropsOneRun:
    """A hypervisor whose batch mappings lose the run holding one gfn, as a failed foreign map would."""

    def __init__(self, xen, lost_gfn: int) -> None:
        self._xen = xen
        self.lost_gfn = lost_gfn

    def __getattr__(self, name):
        return getattr(self._xen, name)

    def map_foreign_runs(self, domid, gfns, writable=False):
        runs = self._xen.map_foreign_runs(domid, gfns, writable)
        return [run for run in runs if not gfns[run.first] <= self.lost_gfn < gfns[run.first] + run.count]


def test_an_unmappable_gfn_is_named():
    xen, guest = hs.build()
    lost = 0x123
    sink = V2Writer(open(os.devnull, "wb"))
    with pytest.raises(SaveError, match=f"cannot map gfn {lost:#x}"):
        engine.save_hvm(_DropsOneRun(xen, lost), guest.domid, sink, hs.suspender(guest))


def test_short_writes_of_payloads_straight_to_the_fd(tmp_path, monkeypatch):
    expected = hs.save_v2(*hs.build())
    xen, guest = hs.build()
    real_writev = os.writev

    def short_writev(fd, buffers):  # as a pipe or a signal may cut a writev short, mid-buffer
        return real_writev(fd, [memoryview(b"".join(bytes(b) for b in buffers))[:5000]])

    monkeypatch.setattr(engine.os, "writev", short_writev)
    path = tmp_path / "out.v2"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        engine.save_hvm_libxl(xen, guest.domid, V2Writer(fd), hs.suspender(guest), lambda: guest.built.emulator,
                              payload_fd=fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == expected
