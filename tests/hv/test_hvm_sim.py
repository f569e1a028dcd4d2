"""Simulated HVM guests: memory map with its holes, special pages and params, the context blob as Xen checks it."""

from __future__ import annotations

import errno
import hashlib
import struct

import pytest

from xenstream.hv import abi, hvm_context, hvm_params
from xenstream.hv.interface import HypervisorError
from xenstream.hv.sim.builder import GuestSpecError
from xenstream.hv.sim.builder_hvm import (
    HIGH_RAM_START,
    MMIO_HOLE_START,
    SPECIAL_PAGE_PARAMS,
    HvmGuest,
    HvmGuestSpec,
    build_hvm_guest,
    ram_layout,
)
from xenstream.hv.sim.xen import SimXen

SPEC = "hvm:mem=4M,vcpus=3,online=2,seed=5"
XTAB = abi.pfinfo_from_pagetype(abi.PAGETYPE_XTAB)
NOTAB = abi.pfinfo_from_pagetype(abi.PAGETYPE_NOTAB)


def built(spec=SPEC, host_seed=0):
    parsed = HvmGuestSpec.parse(spec)
    xen = SimXen(capacity_frames=parsed.nr_pages + 4096, seed=host_seed)
    return xen, build_hvm_guest(xen, parsed)


def memory_digest(xen, domid) -> dict[int, str]:
    top = xen.get_max_gpfn(domid) + 1
    out = {}
    for first in range(0, top, 1024):
        gfns = range(first, min(first + 1024, top))
        codes = xen.get_page_types(domid, gfns)
        live = [g for g, c in zip(gfns, codes) if c != XTAB]
        for gfn, view in zip(live, xen.map_foreign(domid, live) if live else []):
            out[gfn] = hashlib.sha256(view).hexdigest()
    return out


@pytest.fixture(scope="module")
def guest():
    return built()


def test_spec_parsing_and_errors():
    spec = HvmGuestSpec.parse("hvm:mem=1G,vcpus=4,online=2,seed=9")
    assert (spec.nr_pages, spec.vcpus, spec.online, spec.seed) == (1 << 18, 4, 2, 9)
    assert HvmGuestSpec.parse(str(spec)) == spec
    for bad in ("pv64:mem=1M", "hvm:vcpus=2", "hvm:mem=1M,online=2", "hvm:mem=3000", "hvm:mem=1M,colour=red"):
        with pytest.raises(GuestSpecError):
            HvmGuestSpec.parse(bad)


def test_memory_has_the_vga_and_mmio_holes(guest):
    xen, g = guest
    codes = xen.get_page_types(g.domid, range(0x80, 0xE0))
    assert [c == XTAB for c in codes] == [0xA0 <= gfn < 0xC0 for gfn in range(0x80, 0xE0)]
    top = xen.get_max_gpfn(g.domid)
    assert top == 0xFEFFF  # the special pages are the highest gfns of a guest below the MMIO hole
    hole = xen.get_page_types(g.domid, range(MMIO_HOLE_START, MMIO_HOLE_START + 1024))
    assert set(hole) == {XTAB}
    special = xen.get_page_types(g.domid, range(0xFEFF0, 0xFF000))
    assert set(special) == {NOTAB}
    assert xen.get_domain_info(g.domid).nr_pages == 1024 + 16


def test_large_guests_continue_above_4g():
    layout = ram_layout(4 << 18)  # 4 GiB of RAM
    low = sum(end - start for start, end in layout.ram[:2])
    assert layout.ram[1][1] == MMIO_HOLE_START
    assert layout.ram[2] == (HIGH_RAM_START, HIGH_RAM_START + (4 << 18) - low)
    assert layout.max_gpfn == layout.ram[2][1] - 1


def test_special_pages_are_named_by_params(guest):
    xen, g = guest
    special = g.layout.special
    for index, param in SPECIAL_PAGE_PARAMS.items():
        assert xen.get_hvm_param(g.domid, param) == special[index]
    assert xen.get_hvm_param(g.domid, hvm_params.IDENT_PT) == special[6] << 12
    assert xen.get_hvm_param(g.domid, hvm_params.IOREQ_SERVER_PFN) == g.layout.ioreq_server[0]
    assert xen.get_hvm_param(g.domid, hvm_params.NR_IOREQ_SERVER_PAGES) == len(g.layout.ioreq_server)
    console = xen.map_foreign(g.domid, [special[7]])[0]
    assert console[:3072] != bytes(3072)


def test_builds_are_deterministic_across_hosts():
    (xen_a, a), (xen_b, b) = built(host_seed=1), built(host_seed=2)
    assert memory_digest(xen_a, a.domid) == memory_digest(xen_b, b.domid)
    assert xen_a.get_hvm_context(a.domid) == xen_b.get_hvm_context(b.domid)
    assert a.emulator == b.emulator
    params = [(i, xen_a.get_hvm_param(a.domid, i)) for i in range(hvm_params.NR_PARAMS)]
    assert params == [(i, xen_b.get_hvm_param(b.domid, i)) for i in range(hvm_params.NR_PARAMS)]
    xen_c, c = built("hvm:mem=4M,vcpus=3,online=2,seed=6")
    assert memory_digest(xen_c, c.domid) != memory_digest(xen_a, a.domid)


def test_context_is_in_xen_order_and_online_vcpus_are_up(guest):
    xen, g = guest
    records = hvm_context.list_records(xen.get_hvm_context(g.domid))
    assert records[0].name == "HEADER" and records[-1].name == "END"
    codes = [r.typecode for r in records[1:-1]]
    assert codes == sorted(codes)
    cpus = [r.instance for r in records if r.name == "CPU"]
    assert len(cpus) == 2 and 0 in cpus
    assert [r.instance for r in records if r.name == "LAPIC"] == [0, 1, 2]
    assert [xen.get_vcpu_online(g.domid, v) for v in range(3)] == [v in cpus for v in range(3)]


def _blob(xen, g) -> bytearray:
    return bytearray(xen.get_hvm_context(g.domid))


def _corrupt(kind: str, blob: bytearray) -> bytes:
    records = hvm_context.list_records(blob)
    first = records[1]
    if kind == "magic":
        blob[8:12] = struct.pack("<I", 0xDEADBEEF)
    elif kind == "version":
        blob[12:16] = struct.pack("<I", 2)
    elif kind == "header-length":
        blob[4:8] = struct.pack("<I", 20)
    elif kind == "no-header":
        blob = blob[8 + 24:]
    elif kind == "no-end":
        blob = blob[:records[-1].offset]
    elif kind == "cut":
        blob = blob[:first.offset + 100]
    elif kind == "unknown-type":
        struct.pack_into("<H", blob, first.offset, 99)
    elif kind == "overlong":
        struct.pack_into("<I", blob, first.offset + 4, len(blob))
    elif kind == "vcpu":
        struct.pack_into("<H", blob, first.offset + 2, 7)
    elif kind == "size":
        pic = next(r for r in records if r.name == "PIC")
        blob = blob[:pic.offset] + hvm_context.encode_record(3, 0, bytes(12)) + blob[pic.offset + 16:]
    return bytes(blob)


REFUSALS = {"magic": errno.EINVAL, "version": errno.EINVAL, "header-length": errno.ENODATA,
            "no-header": errno.ENODATA, "no-end": errno.ENODATA, "cut": errno.ENODATA,
            "unknown-type": errno.EINVAL, "overlong": errno.ENODATA, "vcpu": errno.EINVAL, "size": errno.EINVAL}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_broken_context_is_refused_and_nothing_changes(guest, kind):
    xen, g = guest
    before = xen.get_hvm_context(g.domid)
    with pytest.raises(HypervisorError) as info:
        xen.set_hvm_context(g.domid, _corrupt(kind, _blob(xen, g)))
    assert info.value.errno == REFUSALS[kind] and "HVM context refused" in str(info.value)
    assert xen.get_hvm_context(g.domid) == before


def test_bytes_after_end_are_ignored_like_xen(guest):
    xen, g = guest
    blob = bytes(_blob(xen, g))
    xen.set_hvm_context(g.domid, blob + b"trailing")
    assert hvm_context.check_context(blob + b"x", 3) == hvm_context.check_context(blob, 3)


def test_context_with_fewer_cpu_records_brings_vcpus_down():
    xen, g = built("hvm:mem=1M,vcpus=2,seed=1")
    blob = xen.get_hvm_context(g.domid)
    cpu1 = next(r for r in hvm_context.list_records(blob) if r.name == "CPU" and r.instance == 1)
    xen.set_hvm_context(g.domid, blob[:cpu1.offset] + blob[cpu1.offset + 8 + cpu1.length:])
    assert [xen.get_vcpu_online(g.domid, v) for v in (0, 1)] == [True, False]


def test_params_follow_xen_rules(guest):
    xen, g = guest
    sized = xen.get_hvm_param(g.domid, hvm_params.VM86_TSS_SIZED)
    assert xen.get_hvm_param(g.domid, hvm_params.VM86_TSS) == sized & 0xFFFF_FFFF
    xen.set_hvm_param(g.domid, hvm_params.VM86_TSS, 0xFC00_9000)
    assert xen.get_hvm_param(g.domid, hvm_params.VM86_TSS_SIZED) == (128 << 32) | 0xFC00_9000
    xen.set_hvm_param(g.domid, hvm_params.VM86_TSS_SIZED, sized)
    for index, value in ((hvm_params.NR_PARAMS, 1), (hvm_params.VM86_TSS, 1 << 32), (hvm_params.VM86_TSS_SIZED, 64 << 32)):
        with pytest.raises(HypervisorError):
            xen.set_hvm_param(g.domid, index, value)


def test_suspend_shuts_the_guest_down_for_suspend():
    xen, g = built("hvm:mem=1M,seed=2")
    HvmGuest(xen, g).suspend()
    assert xen.get_domain_info(g.domid).suspended
