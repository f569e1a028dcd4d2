"""The simulated Xen's HVM p2m is sparse like Xen's: a far gfn costs one small chunk, a gfn beyond the
guest-physical address width (2**36 frames) is refused with EINVAL before anything is allocated, and
lookups answer INVALID_MFN in holes and across chunk boundaries exactly as a flat map would."""

from __future__ import annotations

import errno
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenstream.hv import abi
from xenstream.hv.interface import HypervisorError
from xenstream.hv.sim.domain import P2M_CHUNK, P2M_CHUNK_SHIFT, HvmP2m
from xenstream.hv.sim.xen import HVM_GFN_LIMIT, SimXen

FAR = 0xF_0000_0000
INVALID = abi.INVALID_MFN
XTAB = abi.pfinfo_from_pagetype(abi.PAGETYPE_XTAB)


def hvm_domain(max_pages: int = 4096) -> tuple[SimXen, int]:
    xen = SimXen(capacity_frames=8192)
    return xen, xen.create_domain(max_pages=max_pages, hvm=True)


def test_limit_is_the_4_level_ept_width():
    assert HVM_GFN_LIMIT == 1 << (48 - abi.PAGE_SHIFT)


def test_a_far_gfn_populates_into_one_chunk():
    xen, domid = hvm_domain(max_pages=16)
    xen.populate_physmap(domid, [FAR])
    p2m = xen.domains[domid].hvm_p2m
    assert p2m.chunk_count == 1 and p2m.nbytes == 8 * P2M_CHUNK
    assert xen.get_max_gpfn(domid) == FAR
    mfn = p2m[FAR]
    assert mfn != INVALID and xen.machine.m2p[mfn] == FAR
    view = xen.map_foreign(domid, [FAR], writable=True)[0]
    view[:4] = b"far!"
    assert bytes(xen.map_foreign(domid, range(FAR, FAR + 1))[0][:4]) == b"far!"


def test_the_last_gfn_below_the_limit_and_an_extent_ending_there_are_accepted():
    xen, domid = hvm_domain()
    xen.populate_physmap(domid, [HVM_GFN_LIMIT - abi.SUPERPAGE_FRAMES], abi.SUPERPAGE_ORDER)
    assert xen.get_max_gpfn(domid) == HVM_GFN_LIMIT - 1
    assert xen.domains[domid].hvm_p2m.chunk_count == 1


@pytest.mark.parametrize("gfns, order", [([HVM_GFN_LIMIT], 0), ([5, HVM_GFN_LIMIT + 7], 0), ([1 << 51], 0),
                                         ([-1], 0), ([HVM_GFN_LIMIT], abi.SUPERPAGE_ORDER),
                                         ([0, HVM_GFN_LIMIT + abi.SUPERPAGE_FRAMES], abi.SUPERPAGE_ORDER)])
def test_gfns_beyond_the_limit_are_refused_and_nothing_is_allocated(gfns, order):
    xen, domid = hvm_domain()
    with pytest.raises(HypervisorError) as info:
        xen.populate_physmap(domid, gfns, order)
    assert info.value.errno == errno.EINVAL
    dom = xen.domains[domid]
    assert dom.hvm_p2m.chunk_count == 0 and dom.nr_pages == 0 and dom.max_gpfn == 0
    assert xen.owned_frames(domid) == []


def test_lookups_cross_chunks_and_holes():
    xen, domid = hvm_domain()
    singles = [0, P2M_CHUNK - 2, P2M_CHUNK - 1, P2M_CHUNK, 3 * P2M_CHUNK + 7, FAR]
    xen.populate_physmap(domid, singles)
    xen.populate_physmap(domid, [5 * P2M_CHUNK], abi.SUPERPAGE_ORDER)
    populated = set(singles) | set(range(5 * P2M_CHUNK, 5 * P2M_CHUNK + abi.SUPERPAGE_FRAMES))
    p2m = xen.domains[domid].hvm_p2m
    m2p = xen.machine.m2p
    for first, count in [(0, 1024), (P2M_CHUNK - 3, 1024), (1, 7 * P2M_CHUNK), (5 * P2M_CHUNK + 500, 20),
                         (FAR - 1000, 1024), (FAR - 3, 5), (1 << 40, 1024)]:
        gfns = range(first, first + count)
        frames = p2m.frames(first, count)
        assert isinstance(frames, array) and len(frames) == count
        assert list(frames) == p2m.lookup(list(gfns))
        for gfn, mfn in zip(gfns, frames):
            assert (mfn != INVALID) == (gfn in populated)
            if mfn != INVALID:
                assert m2p[mfn] == gfn
        codes = xen.get_page_types(domid, gfns[:abi.MAX_BATCH_SIZE])
        assert [c == XTAB for c in codes] == [g not in populated for g in gfns[:abi.MAX_BATCH_SIZE]]
    extent = p2m.frames(5 * P2M_CHUNK, abi.SUPERPAGE_FRAMES)
    assert list(extent) == list(range(extent[0], extent[0] + abi.SUPERPAGE_FRAMES))
    assert p2m.lookup([-1, -P2M_CHUNK, 1 << 60]) == [INVALID] * 3 and p2m[-1] == INVALID
    assert p2m.chunk_count == 4 + 1  # chunks 0, 1, 3, 5 and the far one


@given(st.lists(st.tuples(st.integers(0, 6 * P2M_CHUNK), st.integers(1, 2 * P2M_CHUNK)), max_size=6),
       st.lists(st.tuples(st.integers(0, 8 * P2M_CHUNK), st.integers(0, 3 * P2M_CHUNK)), max_size=6))
def test_sparse_map_answers_like_a_flat_one(writes, probes):
    p2m, flat = HvmP2m(), array("Q", [INVALID]) * (11 * P2M_CHUNK)  # past the last probe
    for k, (first, count) in enumerate(writes):
        mfns = array("Q", range(k << 20, (k << 20) + count))
        if count == 1:
            p2m.set(first, mfns[0])
        else:
            p2m.set_run(first, mfns)
        flat[first:first + count] = mfns
    for first, count in probes:
        assert p2m.frames(first, count) == flat[first:first + count]
        assert p2m.lookup(range(first, first + count)) == list(flat[first:first + count])
    touched = {g >> P2M_CHUNK_SHIFT for first, count in writes for g in range(first, first + count)}
    assert p2m.chunk_count == len(touched)


def test_log_dirty_allocates_only_for_dirtied_pages():
    xen, domid = hvm_domain(max_pages=16)
    xen.populate_physmap(domid, [3, 12, 14, FAR])
    xen.logdirty_enable(domid)
    state = xen.domains[domid].logdirty
    assert state.chunks == {}  # not a bitmap over max_gpfn (FAR / 8 bytes)
    xen.map_foreign(domid, [3, FAR], writable=True)
    assert len(state.chunks) == 2 and sum(len(c) for c in state.chunks.values()) <= 2 * abi.PAGE_SIZE
    bitmap = bytearray(b"\xff" * 16)
    stats = xen.logdirty_clean(domid, bitmap, 64)
    assert bitmap == bytes([1 << 3]) + bytes(7) + b"\xff" * 8  # only the first 64 bits are written
    assert (stats.pages, stats.dirty_count, stats.fault_count) == (64, 2, 2)
    assert state.chunks == {} and state.fault_count == 0
    xen.map_foreign(domid, [12, 14], writable=True)
    view = memoryview(bytearray(b"\xff" * 4))
    stats = xen.logdirty_peek(domid, view, 13)
    assert bytes(view) == bytes([0, 1 << 4]) + b"\xff\xff"  # pfn 14 is past nr_pages: masked off
    assert stats.dirty_count == 2 and len(state.chunks) == 1  # peeking keeps the bits
