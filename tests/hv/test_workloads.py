"""Guest workloads: deterministic from the seed and the clock, seen by log-dirty, shaped as named."""

from __future__ import annotations

import hashlib

import pytest

from xenstream.hv import abi
from xenstream.hv.sim.builder import GuestSpec, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.hv.sim.workloads import LinkClock, WallClock, WorkloadError, parse_workload
from xenstream.hv.sim.xen import SimXen
from xenstream.v2.live import set_pfns

SPEC = GuestSpec.parse("pv64:mem=8M,vcpus=2,seed=11")


def fresh_guest(spec: GuestSpec = SPEC) -> PvGuest:
    xen = SimXen(capacity_frames=2 * spec.nr_pages + 16 * abi.SUPERPAGE_FRAMES, seed=3)
    built = build_guest(xen, spec)
    return PvGuest(xen, built.domid, built.layout)


def memory_hashes(guest: PvGuest) -> list[str]:
    return [hashlib.sha256(guest.read_page(pfn)).hexdigest() for pfn in range(guest.layout.nr_pages)]


def dirty_pfns(guest: PvGuest) -> list[int]:
    bitmap = bytearray(guest.layout.nr_pages // 8 + 1)
    guest.xen.logdirty_clean(guest.domid, bitmap, guest.layout.nr_pages)
    return set_pfns(bitmap, guest.layout.nr_pages)


def run(text: str, seed: int, steps: list[float]) -> tuple[list[str], list[list[int]]]:
    guest = fresh_guest()
    guest.xen.logdirty_enable(guest.domid)
    workload = parse_workload(text, guest, seed=seed)
    dirty = []
    for t in steps:
        workload.run_until(t)
        dirty.append(dirty_pfns(guest))
    return memory_hashes(guest), dirty


WORKLOADS = ["uniform:rate=4000", "hotset:pages=64,rate=8000,cold=200", "scan:rate=4000", "ptchurn:rate=2000,pool=16"]


@pytest.mark.parametrize("text", WORKLOADS)
def test_same_seed_and_clock_give_the_same_run(text):
    steps = [0.05, 0.1, 0.25]
    assert run(text, 5, steps) == run(text, 5, steps)
    assert run(text, 5, steps) != run(text, 6, steps)


@pytest.mark.parametrize("text", WORKLOADS)
def test_every_changed_page_is_dirty_and_the_guest_stays_consistent(text):
    guest = fresh_guest()
    before = memory_hashes(guest)
    guest.xen.logdirty_enable(guest.domid)
    workload = parse_workload(text, guest, seed=1)
    assert workload.run_until(0.2) == int(workload.rate * 0.2)
    after = memory_hashes(guest)
    changed = {pfn for pfn, (a, b) in enumerate(zip(before, after)) if a != b}
    assert changed, "the workload wrote nothing"
    assert changed <= set(dirty_pfns(guest))
    assert guest.problems() == []


def test_idle_writes_nothing():
    guest = fresh_guest()
    guest.xen.logdirty_enable(guest.domid)
    assert parse_workload("idle", guest).run_until(10.0) == 0
    assert dirty_pfns(guest) == []


def test_hot_set_takes_most_writes():
    guest = fresh_guest()
    guest.xen.logdirty_enable(guest.domid)
    workload = parse_workload("hotset:pages=32,rate=10000,cold=100", guest, seed=2)
    workload.run_until(0.5)
    dirty = set(dirty_pfns(guest))
    assert set(workload.hot) <= dirty
    assert len(dirty - set(workload.hot)) < 60


def test_scan_sweeps_consecutive_data_pages():
    guest = fresh_guest()
    guest.xen.logdirty_enable(guest.domid)
    workload = parse_workload("scan:rate=1000", guest, seed=4)
    workload.run_until(0.1)
    data = guest.data_pfns()
    positions = sorted(data.index(p) for p in dirty_pfns(guest))
    assert len(positions) == 100
    # One run of consecutive data pages, possibly wrapping past the last one.
    gaps = [b - a for a, b in zip(positions, positions[1:]) if b - a != 1]
    assert gaps == [] or (len(gaps) == 1 and positions[0] == 0 and positions[-1] == len(data) - 1)


def test_pagetable_churn_changes_page_types():
    guest = fresh_guest()
    workload = parse_workload("ptchurn:rate=4000,pool=8", guest, seed=9)
    types_before = guest.xen.get_page_types(guest.domid, [guest.p2m(p) for p in workload.spare])
    workload.run_until(0.5)
    assert workload.tables, "no spare page became a pagetable"
    types_after = guest.xen.get_page_types(guest.domid, [guest.p2m(p) for p in workload.spare])
    assert list(types_after) != list(types_before)
    l1_pinned = abi.PFINFO_LPINTAB | (1 << abi.PFINFO_LTAB_SHIFT)
    for pfn, code in zip(workload.spare, types_after):
        assert (code == l1_pinned) == (pfn in workload.tables)
    assert guest.problems() == []


def test_link_clock_is_bytes_over_rate_and_wall_clock_moves():
    clock = LinkClock(bytes_per_second=1000.0)
    clock.transmitted(500)
    clock.elapse(0.25)
    assert clock.now() == pytest.approx(0.75)
    wall = WallClock()
    first = wall.now()
    wall.elapse(0.01)
    assert wall.now() > first


@pytest.mark.parametrize("text", ["nosuch", "uniform:speed=3", "uniform:rate=fast", "hotset:pages=0"])
def test_bad_workload_specs_are_refused(text):
    with pytest.raises(WorkloadError):
        parse_workload(text, fresh_guest())


def test_limit_caps_the_whole_run():
    guest = fresh_guest()
    workload = parse_workload("uniform:rate=10000,limit=300", guest, seed=1)
    assert workload.run_until(0.02) == 200
    assert workload.run_until(10.0) == 100
    assert workload.run_until(20.0) == 0
