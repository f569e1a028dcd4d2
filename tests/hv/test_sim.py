"""The simulated Xen enforces what the real one does: ownership, M2P, page types, pins, log-dirty."""

from __future__ import annotations

import errno
from array import array

import attrs
import pytest

from xenstream.hv import abi
from xenstream.hv.interface import Hypervisor, HypervisorError, TscInfo, XsaveState
from xenstream.hv.sim.builder import build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.hv.sim.xen import SimXen

PIN_L4 = (abi.PAGETYPE_L4TAB | abi.PAGETYPE_LPINTAB) << 28


@pytest.fixture
def host():
    return SimXen(capacity_frames=1 << 14, seed=11)


def _guest(xen: SimXen, spec: str = "pv64:mem=4M,vcpus=2,seed=3") -> PvGuest:
    built = build_guest(xen, spec)
    return PvGuest(xen, built.domid, built.layout)


def _bitmap_pfns(bitmap: bytearray, nr: int) -> set[int]:
    return {pfn for pfn in range(nr) if bitmap[pfn >> 3] >> (pfn & 7) & 1}


def test_implements_the_protocol(host):
    assert isinstance(host, Hypervisor)
    missing = [name for name in dir(Hypervisor) if not name.startswith("_") and not hasattr(host, name)]
    assert missing == []


def test_max_mfn_is_highest_frame_plus_one_and_m2p_covers_it(host):
    g = _guest(host)
    frames = host.owned_frames(g.domid)
    assert max(frames) < host.get_max_mfn()
    assert len(host.m2p_view()) >= host.get_max_mfn()
    with pytest.raises(TypeError):
        host.m2p_view()[frames[0]] = 0


def test_m2p_and_p2m_are_a_bijection(host):
    g = _guest(host)
    table = g.p2m_table()
    m2p = host.m2p_view()
    assert sorted(table) == sorted(host.owned_frames(g.domid))
    assert all(m2p[mfn] == pfn for pfn, mfn in enumerate(table))


def test_no_such_domain(host):
    with pytest.raises(HypervisorError) as info:
        host.get_domain_info(99)
    assert info.value.errno == errno.ESRCH


def test_page_types(host):
    g = _guest(host)
    other = _guest(host, "pv64:mem=2M,seed=4")
    d = g.domid
    root = g.p2m(g.layout.pinned[0].pfn)
    data = g.p2m(g.layout.nr_pages - 1)
    shared = host.get_domain_info(d).shared_info_frame
    foreign = other.p2m(0)
    codes = host.get_page_types(d, [root, data, shared, foreign, abi.INVALID_MFN, host.get_max_mfn() + 9])
    assert list(codes) == [PIN_L4, abi.PFINFO_NOTAB, abi.PFINFO_XTAB, abi.PFINFO_XTAB, abi.PFINFO_XTAB,
                           abi.PFINFO_XTAB]
    l1 = next(g.p2m(t.pfn) for t in g.layout.tables if t.level == 1)
    assert list(host.get_page_types(d, [l1])) == [abi.PAGETYPE_L1TAB << 28]
    host.mark_broken(d, data)
    assert list(host.get_page_types(d, [data])) == [abi.PFINFO_BROKEN]
    with pytest.raises(HypervisorError):
        host.get_page_types(d, [data] * 1025)


def test_map_foreign(host):
    g = _guest(host)
    d = g.domid
    data = g.p2m(g.layout.nr_pages - 2)
    root = g.p2m(g.layout.pinned[0].pfn)
    views = host.map_foreign(d, [data, root, abi.INVALID_MFN, _guest(host, "pv64:mem=2M,seed=1").p2m(0)])
    assert views[0].readonly and bytes(views[0]) == g.read_page(g.layout.nr_pages - 2)
    assert views[1] is not None and views[2] is None and views[3] is None
    writable = host.map_foreign(d, [data, root], writable=True)
    assert writable[0] is not None and not writable[0].readonly
    assert writable[1] is None  # Xen refuses writable mappings of pagetables
    writable[0][0:4] = b"abcd"
    assert g.read_page(g.layout.nr_pages - 2)[:4] == b"abcd"


def test_populate_limits_and_m2p(host):
    d = host.create_domain(max_vcpus=1, max_pages=1024 + 3)
    mfns = host.populate_physmap(d, [0, 512], order=9)
    m2p = host.m2p_view()
    assert all(m2p[mfns[1] + k] == 512 + k for k in range(512))
    assert mfns[0] % 512 == 0 and mfns[1] % 512 == 0
    singles = host.populate_physmap(d, [1024, 1026, 7000])
    assert [m2p[m] for m in singles] == [1024, 1026, 7000]
    assert host.get_max_gpfn(d) == 0  # PV: what the guest publishes in shared_info, nothing yet
    with pytest.raises(HypervisorError) as info:
        host.populate_physmap(d, [5000])
    assert info.value.errno == errno.ENOMEM
    with pytest.raises(HypervisorError):
        host.populate_physmap(d, [100], order=9)
    with pytest.raises(HypervisorError):
        host.set_address_size(d, 32)  # too late once memory is there


@pytest.mark.parametrize("spec", ["pv64:mem=3M,seed=1", "pv32:mem=3M,seed=1"])
def test_pv_max_gpfn_comes_from_shared_info(host, spec):
    g = _guest(host, spec)
    assert host.get_max_gpfn(g.domid) == g.layout.nr_pages - 1


def test_hvm_max_gpfn_is_highest_mapped(host):
    d = host.create_domain(max_vcpus=1, max_pages=8, hvm=True)
    host.populate_physmap(d, [3, 70])
    assert host.get_max_gpfn(d) == 70


def test_32_bit_domains_get_low_frames(host):
    d = host.create_domain(max_vcpus=1, max_pages=4096)
    host.set_address_size(d, 32)
    assert host.get_address_size(d) == 32
    mfns = host.populate_physmap(d, list(range(0, 4096, 512)), order=9)
    assert max(mfns) < 1 << 32


def _fresh_tables(xen: SimXen, pages: int = 8) -> tuple[int, list[int]]:
    domid = xen.create_domain(max_vcpus=1, max_pages=64)
    return domid, list(xen.populate_physmap(domid, list(range(pages))))


def _write(xen: SimXen, domid: int, mfn: int, entries: dict[int, int]) -> None:
    table = array("Q", bytes(abi.PAGE_SIZE))
    for i, v in entries.items():
        table[i] = v
    xen.map_foreign(domid, [mfn], writable=True)[0][:] = table.tobytes()


P_RW = abi.PTE_PRESENT | abi.PTE_RW


def test_pin_validates_a_small_tree(host):
    d, m = _fresh_tables(host)
    l4, l3, l2, l1, data = m[:5]
    _write(host, d, l1, {0: (data << 12) | P_RW, 1: (l1 << 12) | abi.PTE_PRESENT})
    _write(host, d, l2, {3: (l1 << 12) | P_RW})
    _write(host, d, l3, {0: (l2 << 12) | P_RW})
    _write(host, d, l4, {0: (l3 << 12) | P_RW})
    host.mmuext_pin(d, [(4, l4)])
    codes = host.get_page_types(d, [l4, l3, l2, l1, data])
    assert list(codes) == [PIN_L4, 3 << 28, 2 << 28, 1 << 28, 0]
    assert all(host.machine.frame(l4).cast("Q")[i] & abi.PTE_PRESENT for i in abi.L4_XEN_SLOTS_64)
    with pytest.raises(HypervisorError):
        host.mmuext_pin(d, [(4, l4)])  # already pinned
    host.guest_unpin(d, l4)
    assert list(host.get_page_types(d, [l4, l3, l2, l1])) == [0, 0, 0, 0]  # nothing holds them now


@pytest.mark.parametrize("case", ["foreign_l1", "foreign_l2", "wrong_level", "writable_table", "superpage",
                                  "not_ram", "special_as_table", "l4_in_32bit", "pae_l3_no_slot3"])
def test_pin_refusals(host, case):
    d, m = _fresh_tables(host)
    other, om = _fresh_tables(host, 2)
    l4, l3, l2, l1, data = m[:5]
    ops = {
        "foreign_l1": (1, l1, {l1: {0: (om[0] << 12) | abi.PTE_PRESENT}}),
        "foreign_l2": (2, l2, {l2: {0: (om[0] << 12) | P_RW}}),
        "wrong_level": (3, l3, {l3: {0: (l1 << 12) | P_RW}, l1: {0: (data << 12) | P_RW}, data: {5: 0x1234 | 1}}),
        "writable_table": (2, l2, {l2: {0: (l1 << 12) | P_RW}, l1: {0: (l2 << 12) | P_RW}}),
        "superpage": (2, l2, {l2: {0: (data << 12) | P_RW | abi.PTE_PSE}}),
        "not_ram": (1, l1, {l1: {0: ((host.get_max_mfn() + 5) << 12) | abi.PTE_PRESENT}}),
        "special_as_table": (3, l3, {l3: {0: (host.get_domain_info(d).shared_info_frame << 12) | P_RW}}),
        "l4_in_32bit": (4, l4, {}),
        "pae_l3_no_slot3": (3, l3, {l3: {0: (l2 << 12) | abi.PTE_PRESENT}}),
    }
    level, target, writes = ops[case]
    if case in ("l4_in_32bit", "pae_l3_no_slot3"):
        d2 = host.create_domain(max_vcpus=1, max_pages=16)
        host.set_address_size(d2, 32)
        m2 = list(host.populate_physmap(d2, list(range(4))))
        d, target = d2, m2[2] if case == "pae_l3_no_slot3" else m2[0]
        writes = {target: {0: (m2[1] << 12) | abi.PTE_PRESENT}} if case == "pae_l3_no_slot3" else {}
    for mfn, entries in writes.items():
        _write(host, d, mfn, entries)
    before = [host.machine.tcount[host.machine.slot_of(x)] for x in m]
    with pytest.raises(HypervisorError) as info:
        host.mmuext_pin(d, [(level, target)])
    assert info.value.index == 0
    assert list(host.get_page_types(d, [target])) == [0]
    assert [host.machine.tcount[host.machine.slot_of(x)] for x in m] == before  # refs rolled back


def test_pin_refusal_reports_failing_index(host):
    d, m = _fresh_tables(host)
    _write(host, d, m[0], {0: (m[5] << 12) | P_RW})
    _write(host, d, m[1], {0: (m[0] << 12) | P_RW})  # L2 naming m[0], which is already a pinned L1
    host.mmuext_pin(d, [(1, m[2])])
    with pytest.raises(HypervisorError) as info:
        host.mmuext_pin(d, [(1, m[0]), (1, m[2])])
    assert info.value.index == 1
    assert host.is_pinned(m[0])


def test_pae_validation_fills_and_clears_xen_slots(host):
    d = host.create_domain(max_vcpus=1, max_pages=16)
    host.set_address_size(d, 32)
    l3, l2, l1 = host.populate_physmap(d, [0, 1, 2])
    _write(host, d, l3, {3: (l2 << 12) | abi.PTE_PRESENT, 100: 0xDEAD001})
    _write(host, d, l2, {0: (l1 << 12) | P_RW})
    host.mmuext_pin(d, [(3, l3)])
    assert not any(host.machine.frame(l3).cast("Q")[4:])
    entries = host.machine.frame(l2).cast("Q")
    assert abi.pte_frame(entries[428]) == host.compat_m2p_first_mfn() and entries[428] & abi.PTE_PSE


def test_mmu_update_is_checked_and_marks_dirty(host):
    g = _guest(host)
    d = g.domid
    l1_pfn = g.layout.fixmap_l1_pfn
    host.logdirty_enable(d)
    foreign = _guest(host, "pv64:mem=2M,seed=1").p2m(0)
    with pytest.raises(HypervisorError):
        g.set_pte(l1_pfn, 5, (foreign << 12) | abi.PTE_PRESENT)
    root_pfn = g.layout.pinned[0].pfn
    with pytest.raises(HypervisorError):
        g.set_pte(root_pfn, 260, 0)  # a Xen slot
    g.set_pte(l1_pfn, 5, (g.p2m(g.layout.nr_pages - 1) << 12) | P_RW)
    with pytest.raises(HypervisorError):  # a writable mapping of a pagetable
        g.set_pte(l1_pfn, 6, (g.p2m(root_pfn) << 12) | P_RW)
    bitmap = bytearray(g.layout.nr_pages // 8)
    host.logdirty_clean(d, bitmap, g.layout.nr_pages)
    assert l1_pfn in _bitmap_pfns(bitmap, g.layout.nr_pages)
    with pytest.raises(HypervisorError):
        g.write(root_pfn, 0, b"x")  # typed pages change only through mmu_update


def test_log_dirty(host):
    g = _guest(host)
    d, nr = g.domid, g.layout.nr_pages
    bitmap = bytearray(nr // 8)
    with pytest.raises(HypervisorError):
        host.logdirty_clean(d, bitmap, nr)
    host.logdirty_enable(d)
    with pytest.raises(HypervisorError):
        host.logdirty_enable(d)  # as Xen: already on
    g.write(nr - 3, 100, b"dirty")
    data_mfn = g.p2m(nr - 9)
    host.map_foreign(d, [data_mfn], writable=True)
    host.map_foreign(d, [g.p2m(nr - 10)])  # read-only mappings do not dirty
    stats = host.logdirty_peek(d, bitmap, nr)
    expected = {nr - 3, nr - 9}
    assert _bitmap_pfns(bitmap, nr) == expected and stats.dirty_count == 2 and stats.pages == nr
    stats = host.logdirty_clean(d, bitmap, nr)
    assert _bitmap_pfns(bitmap, nr) == expected
    host.logdirty_clean(d, bitmap, nr)
    assert _bitmap_pfns(bitmap, nr) == set()
    root = g.layout.pinned[0]
    host.guest_unpin(d, g.p2m(root.pfn))
    g.balloon_out(nr - 20)
    host.logdirty_clean(d, bitmap, nr)
    dirty = _bitmap_pfns(bitmap, nr)
    assert {root.pfn, nr - 20} <= dirty
    partial = bytearray(1)
    host.logdirty_clean(d, partial, 5)
    host.shadow_off(d)
    with pytest.raises(HypervisorError):
        host.logdirty_peek(d, bitmap, nr)


def test_log_dirty_disabled_marks_nothing(host):
    g = _guest(host)
    g.write(3, 0, b"x")
    host.logdirty_enable(g.domid)
    bitmap = bytearray(g.layout.nr_pages // 8)
    assert host.logdirty_peek(g.domid, bitmap, g.layout.nr_pages).dirty_count == 0


def test_set_vcpu_context_validates(host):
    g = _guest(host, "pv64:mem=4M,vcpus=2,online=1,seed=5")
    d = g.domid
    good = host.get_vcpu_context(d, 0)
    data = g.p2m(g.layout.nr_pages - 1)
    for bad in (attrs.evolve(good, cr3=abi.cr3_from_mfn(data, 8)),
                attrs.evolve(good, gdt_ents=abi.MAX_GDT_ENTS + 1),
                attrs.evolve(good, gdt_frames=(data,) + good.gdt_frames[1:]),  # GDT page mapped writable
                attrs.evolve(good, cr1=data << 12)):
        with pytest.raises(HypervisorError):
            host.set_vcpu_context(d, 1, bad)
    assert not host.get_vcpu_online(d, 1)
    host.set_vcpu_context(d, 1, good)
    assert host.get_vcpu_online(d, 1)
    assert g.problems() != []  # vcpu 1 now runs although the layout says offline


def test_vcpu_blobs_round_trip(host):
    d = host.create_domain(max_vcpus=2, max_pages=4)
    host.set_ext_vcpu_context(d, 0, (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56))
    assert host.get_ext_vcpu_context(d, 1)[:4] == (1).to_bytes(4, "little")  # vcpu named inside the blob
    assert host.get_ext_vcpu_context(d, 0) == b""
    with pytest.raises(HypervisorError):
        host.set_ext_vcpu_context(d, 0, bytes(129))
    with pytest.raises(HypervisorError):
        host.set_vcpu_xsave(d, 0, XsaveState(7, bytes(15)))
    with pytest.raises(HypervisorError):
        host.set_vcpu_msrs(d, 0, bytes(17))
    host.set_tsc_info(d, TscInfo(1, 2, 3, 4))
    assert host.get_tsc_info(d) == TscInfo(1, 2, 3, 4)
    with pytest.raises(HypervisorError):
        host.get_vcpu_context(d, 2)


def test_suspend_and_cancelled_resume(host):
    g = _guest(host)
    d = g.domid
    si_mfn = g.p2m(g.layout.start_info_pfn)
    g.suspend()
    info = host.get_domain_info(d)
    assert info.suspended and not info.paused  # the guest suspends itself; no controller pause
    assert host.get_vcpu_context(d, 0).start_info == si_mfn
    start_info = g.read_page(g.layout.start_info_pfn)
    lay = abi.START_INFO_64
    assert int.from_bytes(start_info[lay.store_mfn:lay.store_mfn + 8], "little") == g.layout.store_pfn
    assert int.from_bytes(start_info[lay.console_mfn:lay.console_mfn + 8], "little") == g.layout.console_pfn
    fixmap = host.machine.frame(g.p2m(g.layout.fixmap_l1_pfn)).cast("Q")
    assert fixmap[0] == 0  # shared_info unmapped
    host.resume_domain(d)
    g.resume_cancelled()
    assert not host.get_domain_info(d).shutdown
    assert g.problems() == []
    ctx = host.get_vcpu_context(d, 0)
    rax = abi.VCPU_CONTEXT_64.rax
    assert int.from_bytes(ctx.pack()[rax:rax + 8], "little") == 1


def test_balloon(host):
    g = _guest(host)
    pfn = g.layout.nr_pages - 4
    old = g.p2m(pfn)
    g.balloon_out(pfn)
    assert g.p2m(pfn) == abi.INVALID_MFN
    assert list(host.get_page_types(g.domid, [old])) == [abi.PFINFO_XTAB]
    assert g.problems() == []
    new = g.balloon_in(pfn)
    assert g.p2m(pfn) == new and g.problems() == []


def test_pause_and_destroy(host):
    g = _guest(host)
    d = g.domid
    free_before = host.machine.free_frames()
    host.pause(d)
    assert host.get_domain_info(d).paused
    host.unpause(d)
    with pytest.raises(HypervisorError):
        host.unpause(d)
    host.destroy_domain(d)
    with pytest.raises(HypervisorError):
        host.get_domain_info(d)
    assert host.machine.free_frames() >= free_before + g.layout.nr_pages


def test_hvm_domain_memory(host):
    d = host.create_domain(max_vcpus=1, max_pages=600, hvm=True)
    assert host.populate_physmap(d, [0], order=9)[0] == 0
    host.populate_physmap(d, [700])
    views = host.map_foreign(d, [5, 700, 600], writable=True)
    assert views[0] is not None and views[1] is not None and views[2] is None
    assert list(host.get_page_types(d, [5, 600])) == [abi.PFINFO_NOTAB, abi.PFINFO_XTAB]
    host.set_hvm_param(d, 1, 0xFEFFF)
    assert host.get_hvm_param(d, 1) == 0xFEFFF and host.get_hvm_param(d, 2) == 0
    with pytest.raises(HypervisorError):
        host.set_hvm_context(d, b"")
    with pytest.raises(HypervisorError):
        host.get_address_size(d)


def test_grant_frame(host):
    g = _guest(host)
    frame = host.map_grant_frame(g.domid)
    frame[0:8] = b"\x01\x00\x00\x00\x05\x00\x00\x00"
    assert bytes(host.map_grant_frame(g.domid)[:8]) == b"\x01\x00\x00\x00\x05\x00\x00\x00"
    assert list(host.get_page_types(g.domid, [host.domains[g.domid].grant_frame])) == [abi.PFINFO_XTAB]


@pytest.mark.parametrize("spec", ["pv64:mem=4M,seed=5", "pv32:mem=4M,seed=5,p2m=linear"])
def test_log_dirty_sees_exactly_what_the_guest_changed(host, spec):
    import random

    g = _guest(host, spec)
    nr = g.layout.nr_pages
    host.logdirty_enable(g.domid)
    before = {pfn: g.read_page(pfn) for pfn in range(nr)}
    touched = g.work(random.Random(1), pages=40, ptes=10)
    bitmap = bytearray(nr // 8)
    stats = host.logdirty_clean(g.domid, bitmap, nr)
    dirty = _bitmap_pfns(bitmap, nr)
    changed = {pfn for pfn in range(nr) if g.read_page(pfn) != before[pfn]}
    assert dirty == touched and changed <= dirty and stats.dirty_count == len(dirty)
    assert any(t in {r.pfn for r in g.layout.tables} for t in dirty)  # PTE updates dirty the table
    assert g.problems() == []


def test_high_memory_falls_back_when_address_space_is_refused(monkeypatch):
    from xenstream.hv.sim import machine

    real = machine._anonymous

    def no_huge(size, sparse=True):
        if size > 1 << 33:
            raise OSError(12, "Cannot allocate memory")
        return real(size, sparse)

    monkeypatch.setattr(machine, "_anonymous", no_huge)
    xen = SimXen(capacity_frames=1 << 13, seed=1)
    assert xen.get_max_mfn() < 1 << 32
    assert _guest(xen).problems() == []


@pytest.mark.parametrize("level, entry", [(1, abi.PTE_PWT), (1, abi.PTE_PSE), (2, abi.PTE_GLOBAL), (2, abi.PTE_PCD)])
def test_disallowed_flags_are_refused(host, level, entry):
    d, m = _fresh_tables(host)
    target = m[1] if level == 1 else m[2]
    child = m[3]
    if level == 2:
        _write(host, d, child, {})
    _write(host, d, target, {0: (child << 12) | abi.PTE_PRESENT | entry})
    with pytest.raises(HypervisorError):
        host.mmuext_pin(d, [(level, target)])


def test_pae_l3_entries_take_no_nx(host):
    d = host.create_domain(max_vcpus=1, max_pages=16)
    host.set_address_size(d, 32)
    l3, l2 = host.populate_physmap(d, [0, 1])
    _write(host, d, l3, {3: (l2 << 12) | abi.PTE_PRESENT | abi.PTE_NX})
    with pytest.raises(HypervisorError):
        host.mmuext_pin(d, [(3, l3)])
    _write(host, d, l3, {3: (l2 << 12) | abi.PTE_PRESENT | abi.PTE_RW})
    host.mmuext_pin(d, [(3, l3)])


def test_pokes_bypass_xen_checks(host):
    g = _guest(host)
    d = g.domid
    l2 = next(g.p2m(t.pfn) for t in g.layout.tables if t.level == 2)
    entries = host.poke_frame(l2).cast("Q")
    first = next(i for i in range(512) if entries[i] & abi.PTE_PRESENT)
    entries[first] |= abi.PTE_PSE  # impossible through mmu_update
    assert list(host.get_page_types(d, [l2])) == [abi.PAGETYPE_L2TAB << 28]
    bad = attrs.evolve(host.get_vcpu_context(d, 0), cr3=abi.cr3_from_mfn(g.p2m(g.layout.nr_pages - 1), 8))
    host.poke_vcpu_context(d, 0, bad)
    assert host.get_vcpu_context(d, 0) == bad


@pytest.mark.parametrize("spec", ["pv64:mem=4M,seed=2", "pv32:mem=4M,seed=2,p2m=linear,maxmem=64M"])
def test_resume_in_new_domain_republishes_the_p2m(host, spec):
    """What a restorer leaves (FLL cleared, FL pages stale, store/console already mfns) and what the
    guest does about it on resume."""
    g = _guest(host, spec)
    d, width, layout = g.domid, g.width, g.layout
    g.suspend()
    shared = host.shared_info(d)
    info = abi.SHARED_INFO_LAYOUTS[width]
    shared[info.pfn_to_mfn_frame_list_list:info.pfn_to_mfn_frame_list_list + width] = bytes(width)
    shared[info.p2m_cr3:info.p2m_cr3 + width] = bytes(width)
    for pfn in layout.fl_pfns:
        host.poke_frame(g.p2m(pfn))[:] = bytes(abi.PAGE_SIZE)
    start_info = host.poke_frame(g.p2m(layout.start_info_pfn))
    si = abi.START_INFO_LAYOUTS[width]
    for field, pfn in ((si.store_mfn, layout.store_pfn), (si.console_mfn, layout.console_pfn)):
        start_info[field:field + width] = g.p2m(pfn).to_bytes(width, "little")
    g.resume_new_domain()
    assert g.problems() == []
    word = lambda off: int.from_bytes(bytes(shared[off:off + width]), "little")  # noqa: E731
    assert word(info.pfn_to_mfn_frame_list_list) == g.p2m(layout.fll_pfn)
    assert word(info.max_pfn) == max(layout.p2m_pages, layout.nr_pages)
    if layout.p2m_vaddr:
        assert abi.mfn_from_cr3(word(info.p2m_cr3), width) == g.p2m(layout.pinned[0].pfn)
    fmt = "Q" if width == abi.WIDTH_64 else "I"
    fl = array(fmt, bytes(host.machine.frame(g.p2m(layout.fl_pfns[0]))))
    assert list(fl[:len(layout.p2m_pfns)]) == [g.p2m(p) for p in layout.p2m_pfns]
    assert host.machine.frame(g.p2m(layout.fixmap_l1_pfn)).cast("Q")[0] >> 12 & ((1 << 40) - 1) == \
        host.get_domain_info(d).shared_info_frame


def test_map_foreign_runs_match_per_page_mappings(host):
    g = _guest(host, "pv64:mem=8M,seed=4")
    d = g.domid
    table = g.p2m_table()
    root = g.p2m(g.layout.pinned[0].pfn)
    gfns = list(table[:1500]) + [abi.INVALID_MFN, root] + list(table[1600:1700])
    for writable in (False, True):
        pages = host.map_foreign(d, gfns, writable=writable)
        runs = host.map_foreign_runs(d, gfns, writable=writable)
        covered = {}
        for run in runs:
            assert len(run.view) == run.count * abi.PAGE_SIZE and run.view.readonly is not writable
            for k in range(run.count):
                covered[run.first + k] = bytes(run.view[k * abi.PAGE_SIZE:(k + 1) * abi.PAGE_SIZE])
        assert covered == {i: bytes(p) for i, p in enumerate(pages) if p is not None}
        assert len(runs) < len(covered) // 50  # 2 MiB extents come back whole
        assert 1500 not in covered  # INVALID_MFN
        assert (1501 in covered) is not writable  # a pinned table maps read-only only
