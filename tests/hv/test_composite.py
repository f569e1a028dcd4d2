"""Spec 7.6 helpers on the simulator."""

from __future__ import annotations

import struct

import pytest

from xenstream.hv import abi
from xenstream.hv.composite import clear_page, console_ring_init, seed_grant_table
from xenstream.hv.interface import HypervisorError
from xenstream.hv.sim.builder import build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.hv.sim.xen import SimXen


@pytest.fixture
def guest():
    xen = SimXen(capacity_frames=1 << 13, seed=2)
    built = build_guest(xen, "pv64:mem=2M,seed=1")
    return xen, PvGuest(xen, built.domid, built.layout)


def test_seed_grant_table(guest):
    xen, g = guest
    seed_grant_table(xen, g.domid, console_gfn=0x1_2345_6789, store_gfn=0x42, console_domid=7, store_domid=9)
    frame = bytes(xen.map_grant_frame(g.domid))
    assert struct.unpack_from("<HHI", frame, 0) == (abi.GTF_PERMIT_ACCESS, 7, 0x2345_6789)
    assert struct.unpack_from("<HHI", frame, 8) == (abi.GTF_PERMIT_ACCESS, 9, 0x42)


@pytest.mark.parametrize("clear", [False, True])
def test_console_ring_init(guest, clear):
    xen, g = guest
    before = g.read_page(g.layout.console_pfn)
    console_ring_init(xen, g.domid, g.p2m(g.layout.console_pfn), clear)
    after = g.read_page(g.layout.console_pfn)
    assert after[abi.XENCONSOLE_CONNECTION_OFFSET] == abi.XENCONSOLE_DISCONNECTED
    rest = after[:abi.XENCONSOLE_CONNECTION_OFFSET] + after[abi.XENCONSOLE_CONNECTION_OFFSET + 1:]
    expected = before[:abi.XENCONSOLE_CONNECTION_OFFSET] + before[abi.XENCONSOLE_CONNECTION_OFFSET + 1:]
    assert rest == (bytes(len(rest)) if clear else expected)


def test_clear_page(guest):
    xen, g = guest
    clear_page(xen, g.domid, g.p2m(g.layout.store_pfn))
    assert g.read_page(g.layout.store_pfn) == bytes(abi.PAGE_SIZE)
    with pytest.raises(HypervisorError):
        clear_page(xen, g.domid, g.p2m(g.layout.pinned[0].pfn))  # a pagetable cannot be mapped writable
