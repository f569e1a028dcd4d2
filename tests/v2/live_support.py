"""A seeded live migration for tests: guest, workload, virtual link clock, the v2 live engine, and the
source guest's digest (and start_info page) at every suspension."""

from __future__ import annotations

import io

import attrs

from tests.v2 import engine_support as es
from xenstream.hv.guestview import PvGuestView
from xenstream.hv.sim.builder import GuestSpec, build_guest
from xenstream.hv.sim.guest import PvGuest
from xenstream.hv.sim.workloads import LinkClock, parse_workload
from xenstream.hv.sim.xen import SimXen
from xenstream.v2.live import LiveSaveResult, save_pv_live
from xenstream.v2.policy import make_policy
from xenstream.v2.snapshot import GuestDigest, snapshot
from xenstream.v2.writer import V2Writer

LINK = 125e6


@attrs.define
class LiveRun:
    spec: GuestSpec
    xen: SimXen
    guest: PvGuest
    stream: bytes = b""
    result: LiveSaveResult | None = None
    # One per suspension: the digest a save would carry, and the start_info page as the guest left it.
    suspended: list[tuple[GuestDigest, bytes]] = attrs.field(factory=list)


def start_guest(spec_text: str, host_seed: int = 0) -> LiveRun:
    spec = GuestSpec.parse(spec_text)
    xen = es.new_host(spec, host_seed)
    built = build_guest(xen, spec)
    return LiveRun(spec=spec, xen=xen, guest=PvGuest(xen, built.domid, built.layout))


def migrate(run: LiveRun, workload_text: str = "idle", *, policy: str = "xen", seed: int = 1, libxl: bool = False,
            checkpoints: int = 0, interval: float = 0.02, guest_runs=None, capture: bool = True) -> LiveRun:
    guest, xen = run.guest, run.xen
    workload = parse_workload(workload_text, guest, seed=seed)
    clock = LinkClock(LINK)

    def suspend() -> bool:
        guest.suspend()
        if capture:
            start_info = bytes(xen.machine.frame(guest.p2m(guest.layout.start_info_pfn)))
            run.suspended.append((snapshot(PvGuestView.open(xen, guest.domid)), start_info))
        return True

    def runs(nbytes: int) -> None:
        clock.transmitted(nbytes)
        workload.run_until(clock.now())
        if guest_runs is not None:
            guest_runs(nbytes)

    def checkpoint(done: int) -> bool:
        if done >= checkpoints:
            return False
        xen.resume_domain(guest.domid)
        guest.resume_cancelled()
        clock.elapse(interval)
        workload.run_until(clock.now())
        return True

    out = io.BytesIO()
    run.result = save_pv_live(xen, guest.domid, V2Writer(out), suspend, policy=make_policy(policy), clock=clock,
                              guest_runs=runs, libxl=libxl, checkpoint=checkpoint if checkpoints else None)
    run.stream = out.getvalue()
    return run


def assert_restored_as_suspended(run: LiveRun, stream: bytes | None = None, which: int = -1, **restore_args):
    """Restore and compare with the source at its suspension `which` (spec 8.4, 8.1 items 1, 6, 7)."""
    digest, start_info = run.suspended[which]
    xen, result = es.restore(run.stream if stream is None else stream, run.spec, **restore_args)
    es.assert_same_guest(digest, es.restored_digest(xen, result), es.exempt_pfns(run.guest))
    es.assert_p2m_bijection(xen, result)
    es.assert_start_info(xen, result, start_info, run.guest.layout)
    return xen, result
