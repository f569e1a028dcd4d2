"""The v2 live save engine and the restore of live streams (spec save-restore-engines 4.1-4.6, 8.4)."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.v2 import engine_support as es
from tests.v2.live_support import LINK, assert_restored_as_suspended, migrate, start_guest
from xenstream.hv import abi
from xenstream.hv.sim.workloads import LinkClock, parse_workload
from xenstream.v2 import constants as C
from xenstream.v2.live import SaveError, save_pv_live
from xenstream.v2.policy import (
    CONTINUE,
    STOP_AND_COPY,
    STOP_NOW,
    AdaptivePolicy,
    PrecopyStats,
    RoundHistory,
    XenPolicy,
)
from xenstream.v2.verify import verify_bytes
from xenstream.v2.writer import V2Writer

WORKLOADS = ["idle", "uniform:rate=20000", "hotset:pages=256,rate=15000,cold=300", "scan:rate=20000",
             "ptchurn:rate=3000,pool=16"]
GUESTS = ["pv64:mem=8M,vcpus=2,seed=21", "pv32:mem=8M,vcpus=2,online=1,seed=22,p2m=linear"]


@pytest.mark.parametrize("policy", ["xen", "adaptive"])
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("guest", GUESTS)
def test_restored_guest_is_the_source_at_suspension(guest, workload, policy):
    run = migrate(start_guest(guest), workload, policy=policy, seed=3)
    xen, result = assert_restored_as_suspended(run)
    es.assert_shared_info(xen, result, es.shared_info_record(run.stream))
    es.assert_guest_p2m(xen, result, run.guest.layout)
    assert verify_bytes(run.stream).ok


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), workload=st.sampled_from(WORKLOADS[1:]), policy=st.sampled_from(["xen", "adaptive"]),
       chunk=st.sampled_from([1 << 20, 4093, 65536]))
def test_any_seed_restores_to_the_suspended_source(seed, workload, policy, chunk):
    run = migrate(start_guest("pv64:mem=4M,seed=5", host_seed=seed), workload, policy=policy, seed=seed)
    assert_restored_as_suspended(run, chunk=chunk)


def _records(stream: bytes) -> list[es.Record]:
    return es.split(stream)[1]


def test_live_record_order_and_pages_sent_many_times():
    run = migrate(start_guest(GUESTS[0]), "uniform:rate=20000")
    kinds = [r.type for r in _records(run.stream)]
    first_page = kinds.index(C.REC_PAGE_DATA)
    last_page = len(kinds) - 1 - kinds[::-1].index(C.REC_PAGE_DATA)
    policy = [k for k in kinds[:first_page] if k in (C.REC_X86_CPUID_POLICY, C.REC_X86_MSR_POLICY)]
    assert kinds[:first_page] == [C.REC_X86_PV_INFO, *policy, C.REC_STATIC_DATA_END, C.REC_X86_PV_P2M_FRAMES]
    assert set(kinds[first_page:last_page + 1]) == {C.REC_PAGE_DATA}
    assert kinds[last_page + 1:last_page + 3] == [C.REC_X86_TSC_INFO, C.REC_SHARED_INFO]
    assert kinds[-1] == C.REC_END
    seen: dict[int, int] = {}
    for record in _records(run.stream):
        if record.type == C.REC_PAGE_DATA:
            for pfn in es.page_data_entries(record.body)[0]:
                seen[pfn] = seen.get(pfn, 0) + 1
    assert len(seen) == run.result.p2m_size
    assert max(seen.values()) > 1
    assert sum(seen.values()) == sum(r.entries for r in run.result.rounds)


def test_xen_policy_bounds_and_round_one():
    run = migrate(start_guest(GUESTS[0]), "hotset:pages=1024,rate=60000,cold=0")  # never converges
    rounds = run.result.rounds
    assert run.result.live_rounds == 5 and [r.live for r in rounds] == [True] * 5 + [False]
    assert rounds[0].entries == run.result.p2m_size
    assert all(r.skipped == 0 for r in rounds)


def test_xen_policy_stops_after_sending_a_round_under_fifty():
    run = migrate(start_guest(GUESTS[0]), "uniform:rate=1500")
    live = [r for r in run.result.rounds if r.live]
    assert live[-1].dirty < 50 <= live[-2].dirty
    assert live[-1].sent + live[-1].entries > 0  # the small round is still sent live, then the loop stops


def test_idle_guest_needs_one_round_and_a_tiny_final_pass():
    result = migrate(start_guest(GUESTS[0]), "idle").result
    assert [r.sent for r in result.rounds if r.live][0] > 0
    assert result.final_pages <= 4  # the suspend itself touches start_info and the fixmap L1


def test_log_dirty_is_off_afterwards():
    run = migrate(start_guest(GUESTS[0]), "uniform:rate=2000")
    assert not run.xen.domains[run.guest.domid].logdirty.enabled


def test_adaptive_sends_less_and_leaves_less_for_the_final_pass_on_a_converging_guest():
    xen_run = migrate(start_guest(GUESTS[0]), "uniform:rate=20000", policy="xen", capture=False)
    ours = migrate(start_guest(GUESTS[0]), "uniform:rate=20000", policy="adaptive", capture=False)
    assert ours.result.final_pages * 2 <= xen_run.result.final_pages
    assert ours.result.total_pages <= xen_run.result.total_pages
    assert sum(r.skipped for r in ours.result.rounds) > 0


def _history(*dirty: int, rate: float = 0.0, size: int = 4096) -> RoundHistory:
    return RoundHistory(rounds=tuple((d, d, 0.01) for d in dirty), p2m_size=size, bytes_per_second=rate)


@pytest.mark.parametrize(("stats", "history", "decision"), [
    (PrecopyStats(0, 0, 4096), _history(4096), CONTINUE),
    (PrecopyStats(3, 9000, 49), _history(4096, 60, 49), STOP_AND_COPY),
    (PrecopyStats(3, 9000, 50), _history(4096, 60, 50), CONTINUE),
    (PrecopyStats(5, 9000, 500), _history(4096, 500, 500), STOP_AND_COPY),
    (PrecopyStats(4, 9000, -1), _history(4096, 500), CONTINUE),
    (PrecopyStats(5, 9000, -1), _history(4096, 500), STOP_AND_COPY),
])
def test_xen_policy_is_xens(stats, history, decision):
    assert XenPolicy().decide(stats, history) == decision


@pytest.mark.parametrize(("policy", "stats", "history", "decision"), [
    (AdaptivePolicy(), PrecopyStats(6, 9000, 300), _history(4096, 1000, 500, 300), CONTINUE),  # still shrinking
    (AdaptivePolicy(), PrecopyStats(6, 9000, 450), _history(4096, 1000, 500, 450), STOP_AND_COPY),  # stalled
    (AdaptivePolicy(), PrecopyStats(2, 9000, 900), _history(4096, 1000, 900), CONTINUE),  # never before Xen
    (AdaptivePolicy(), PrecopyStats(7, 9000, 40), _history(4096, 60, 40), STOP_AND_COPY),
    (AdaptivePolicy(downtime_budget=0.01), PrecopyStats(2, 9000, 200), _history(4096, 400, 200, rate=1e8), STOP_NOW),
    (AdaptivePolicy(downtime_budget=0.001), PrecopyStats(2, 9000, 200), _history(4096, 400, 200, rate=1e8), CONTINUE),
    (AdaptivePolicy(), PrecopyStats(9, 3 * 4096, 300), _history(4096, 400, 300), STOP_AND_COPY),  # traffic cap
    (AdaptivePolicy(max_iterations=8), PrecopyStats(8, 100, -1), _history(4096, 400), STOP_NOW),
])
def test_adaptive_policy_decisions(policy, stats, history, decision):
    assert policy.decide(stats, history) == decision


def test_a_seeded_run_is_reproducible():
    first = migrate(start_guest(GUESTS[0]), "uniform:rate=20000", policy="adaptive", seed=9)
    second = migrate(start_guest(GUESTS[0]), "uniform:rate=20000", policy="adaptive", seed=9)
    assert first.stream == second.stream
    assert [r.as_dict() for r in first.result.rounds] == [r.as_dict() for r in second.result.rounds]


def test_downtime_budget_stops_without_sending_the_round_live():
    run = start_guest(GUESTS[0])
    workload = parse_workload("uniform:rate=20000", run.guest, seed=1)
    clock = LinkClock(LINK)

    def runs(n):
        clock.transmitted(n)
        workload.run_until(clock.now())

    def suspend():
        run.guest.suspend()
        return True

    result = save_pv_live(run.xen, run.guest.domid, V2Writer(io.BytesIO()), suspend,
                          policy=AdaptivePolicy(downtime_budget=1.0), clock=clock, guest_runs=runs)
    live = [r for r in result.rounds if r.live]
    assert live[-1].decision == "stop-now" and live[-1].sent == 0
    assert len(live) == 2
    assert result.final_pages >= live[-1].dirty  # what was not sent live went in the final pass


def balloonable(run) -> int:
    """A data page only the kernel's direct map maps (so it can be ballooned out)."""
    machine = run.xen.machine
    return next(pfn for pfn in reversed(run.guest.data_pfns())
                if machine.tcount[machine.slot_of(run.guest.p2m(pfn))] == 1)


def test_ballooned_page_is_deferred_as_xtab_and_resent_in_the_final_pass():
    run = start_guest(GUESTS[0])
    target = balloonable(run)
    done = []

    def balloon(_nbytes):
        if not done:
            run.guest.balloon_out(target)
            done.append(1)

    migrate(run, "idle", guest_runs=balloon)
    entries = []
    for record in _records(run.stream):
        if record.type == C.REC_PAGE_DATA:
            pfns, types = es.page_data_entries(record.body)
            entries += [t for p, t in zip(pfns, types) if p == target]
    # Round 1 sent it before the balloon (data) or after (XTAB, deferred); either way the final pass says XTAB.
    assert entries[-1] == abi.PAGETYPE_XTAB
    assert len(entries) >= 2
    assert sum(r.deferred for r in run.result.rounds) >= 1


def test_ballooned_before_its_batch_goes_out_as_xtab_in_both_passes():
    run = start_guest(GUESTS[0])
    target = balloonable(run)
    # Without the balloon, round 1 already defers the fixmap L1 (it maps shared_info until the suspend).
    baseline = migrate(start_guest(GUESTS[0]), "idle", capture=False).result.rounds[0].deferred
    run.guest.balloon_out(target)
    migrate(run, "idle")
    entries = []
    for record in _records(run.stream):
        if record.type == C.REC_PAGE_DATA:
            pfns, types = es.page_data_entries(record.body)
            entries += [t for p, t in zip(pfns, types) if p == target]
    assert entries == [abi.PAGETYPE_XTAB, abi.PAGETYPE_XTAB]
    assert run.result.rounds[0].deferred == baseline + 1


def test_linear_p2m_generation_change_aborts_without_end():
    run = start_guest("pv64:mem=4M,seed=8,p2m=linear")
    run.guest.xen.logdirty_enable(run.guest.domid)  # the engine must cope with log-dirty already on
    bumped = []

    def remap(_nbytes):
        if not bumped:
            run.guest.bump_p2m_generation()
            bumped.append(1)

    with pytest.raises(SaveError, match="p2m_generation"):
        migrate(run, "idle", guest_runs=remap)
    assert not run.xen.domains[run.guest.domid].logdirty.enabled


def test_tree_p2m_generation_change_is_not_noticed():
    run = start_guest("pv64:mem=4M,seed=8")
    migrate(run, "idle", guest_runs=lambda n: run.guest.bump_p2m_generation())
    assert _records(run.stream)[-1].type == C.REC_END


def test_libxl_wrapped_live_stream_restores():
    run = migrate(start_guest(GUESTS[0]), "uniform:rate=5000", libxl=True)
    assert verify_bytes(run.stream).ok
    assert_restored_as_suspended(run)


@pytest.mark.parametrize("policy", ["xen", "adaptive"])
def test_page_ballooned_out_and_back_in_after_it_was_sent_arrives_with_its_new_frame(policy):
    run = start_guest("pv64:mem=16M,vcpus=2,seed=23")
    machine = run.xen.machine
    target = next(p for p in run.guest.data_pfns() if machine.tcount[machine.slot_of(run.guest.p2m(p))] == 1)
    batches = []

    def balloon(_nbytes):
        batches.append(1)
        if len(batches) == 2:  # round 1 sent the target in its first batch
            run.guest.balloon_out(target)
        elif len(batches) == 3:
            run.guest.balloon_in(target)  # a fresh (zeroed) frame the guest has not written yet

    migrate(run, "uniform:rate=5000", policy=policy, guest_runs=balloon)
    xen, result = assert_restored_as_suspended(run)
    assert bytes(xen.machine.frame(result.p2m[target])) == bytes(4096)


def test_stopping_after_a_sent_round_does_not_resend_it():
    run = start_guest(GUESTS[0])
    workload = parse_workload("idle", run.guest)
    clock = LinkClock(LINK)

    def suspend():
        run.guest.suspend()
        return True

    result = save_pv_live(run.xen, run.guest.domid, V2Writer(io.BytesIO()), suspend,
                          policy=AdaptivePolicy(max_iterations=1), clock=clock,
                          guest_runs=lambda n: (clock.transmitted(n), workload.run_until(clock.now())))
    assert [r.live for r in result.rounds] == [True, False]
    assert result.final_pages <= 4  # round 1 is not sent again
