"""The legacy live save engine: the live form of a Xen 4.5 v1 stream (spec legacy-v1-stream 2.5)."""

from __future__ import annotations

import io

import pytest

from tests.v2 import engine_support as es
from xenstream.hv.guestview import PvGuestView
from xenstream.hv.sim.builder import GuestSpec, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.hv.sim.workloads import LinkClock, parse_workload
from xenstream.legacy import events as ev
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser
from xenstream.legacy.save import LegacySaveError
from xenstream.legacy.save_live import MAX_ITERS, STOP_BELOW, save_pv_legacy_live
from xenstream.v2.snapshot import snapshot

SPECS = ["pv64:mem=4M,vcpus=2,seed=41", "pv32:mem=4M,vcpus=2,online=1,seed=42"]


def live_legacy(spec_text: str, workload: str, width: int = 64, seed: int = 2, guest_runs=None):
    spec = GuestSpec.parse(spec_text)
    xen = es.new_host(spec)
    built = build_guest(xen, spec)
    guest = PvGuest(xen, built.domid, built.layout)
    load = parse_workload(workload, guest, seed=seed)
    clock = LinkClock(125e6)
    at_suspend = []

    def suspend() -> bool:
        guest.suspend()
        at_suspend.append(snapshot(PvGuestView.open(xen, guest.domid)))
        return True

    def runs(nbytes: int) -> None:
        clock.transmitted(nbytes)
        load.run_until(clock.now())
        if guest_runs is not None:
            guest_runs(guest)

    out = io.BytesIO()
    result = save_pv_legacy_live(xen, guest.domid, out, toolstack_width=width, suspend=suspend, clock=clock,
                                 guest_runs=runs)
    return xen, guest, result, out.getvalue(), at_suspend


def parse(stream: bytes) -> list:
    parser = LegacyParser()
    parser.feed(stream)
    parser.feed(b"")
    events = []
    while (event := parser.next_event()) is not DONE:
        assert event is not NEED_DATA
        events.append(event)
    return events


@pytest.mark.parametrize("width", [64, 32])
@pytest.mark.parametrize("spec", SPECS)
def test_live_v1_stream_shape(spec, width):
    xen, guest, result, stream, _ = live_legacy(spec, "uniform:rate=20000", width)
    events = parse(stream)
    kinds = [type(e).__name__ for e in events[1:]]
    assert kinds[:3] == ["P2mSize", "ExtendedInfo", "P2mFrames"]
    tsc = kinds.index("TscInfo")
    assert set(kinds[3:tsc]) == {"PageBatch"}  # the live iterations come before TSC_INFO
    tail = kinds.index("VcpuInfo")
    assert set(kinds[tsc + 1:tail]) <= {"PageBatch"}
    assert kinds[tail:tail + 5] == ["VcpuInfo", "Toolstack", "LastCheckpoint", "EndOfBody", "UnmappedPfns"]
    pfns = [p for e in events if isinstance(e, ev.PageBatch) for p in e.pfns]
    assert len(set(pfns)) == result.p2m_size and len(pfns) > result.p2m_size
    assert len(result.iterations) >= 3 and not result.iterations[-1].live
    assert not xen.domains[guest.domid].logdirty.enabled


def test_redirtied_pages_are_skipped_and_the_loop_ends_under_fifty():
    _, _, result, _, _ = live_legacy("pv64:mem=8M,seed=41", "uniform:rate=20000")  # two batches per pass
    live = [i for i in result.iterations if i.live]
    assert sum(i.skipped for i in live) > 0
    assert live[-1].sent + live[-1].skipped < STOP_BELOW
    assert all(i.sent + i.skipped >= STOP_BELOW for i in live[:-1])


def test_at_most_thirty_iterations_or_three_times_memory():
    _, _, result, _, _ = live_legacy(SPECS[0], "hotset:pages=512,rate=60000,cold=0")
    assert len(result.iterations) <= MAX_ITERS + 1
    live_total = sum(i.sent for i in result.iterations if i.live)
    assert len(result.iterations) == MAX_ITERS + 1 or live_total > 3 * result.p2m_size - result.iterations[-2].sent


def test_a_ballooned_page_is_fixed_up_or_listed_unmapped():
    holder = {}

    def balloon(guest):
        if "pfn" not in holder:
            machine = guest.xen.machine
            holder["pfn"] = next(p for p in reversed(guest.data_pfns())
                                 if machine.tcount[machine.slot_of(guest.p2m(p))] == 1)
            guest.balloon_out(holder["pfn"])

    _, _, result, stream, _ = live_legacy(SPECS[0], "idle", guest_runs=balloon)
    unmapped = next(e for e in parse(stream) if isinstance(e, ev.UnmappedPfns))
    assert holder["pfn"] in unmapped.pfns
    assert result.unmapped_pfns == len(unmapped.pfns)


def test_a_pagetable_race_is_fatal_only_after_the_suspend():
    # The fixmap L1 maps shared_info (not a guest frame) while the guest runs: sent with frame 0 live.
    _, _, result, stream, _ = live_legacy(SPECS[0], "idle")
    assert result.iterations[0].live and result.iterations[-1].sent >= 1
    spec = GuestSpec.parse(SPECS[0])
    xen = es.new_host(spec)
    built = build_guest(xen, spec)
    guest = PvGuest(xen, built.domid, built.layout)

    def suspend_keeping_the_mapping() -> bool:
        xen.guest_suspend(guest.domid, guest.p2m(guest.layout.start_info_pfn))
        table = guest.p2m(guest.layout.fixmap_l1_pfn)
        xen.mmu_update(guest.domid, table, 1, xen.machine.frame(table).cast("Q")[0])  # dirties the L1
        return True

    with pytest.raises(LegacySaveError, match="race"):
        save_pv_legacy_live(xen, guest.domid, io.BytesIO(), suspend=suspend_keeping_the_mapping)
