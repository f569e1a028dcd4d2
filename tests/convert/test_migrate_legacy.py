"""The legacy live stream and the v1 checkpointed form, converted to v2, restore like v2's own streams."""

from __future__ import annotations

import io

import pytest

from tests.conftest import SHARED
from tests.convert.v2state import convert_bytes
from tests.v2 import engine_support as es
from tests.v2.live_support import LINK, migrate, start_guest
from tests.v2.test_live_checkpoint import boundaries
from xenstream.convert.commands.restore import legacy_chunks
from xenstream.hv.guestview import PvGuestView
from xenstream.hv.sim.workloads import LinkClock, parse_workload
from xenstream.hv.sim.xen import SimXen
from xenstream.legacy.save_live import save_pv_legacy_live
from xenstream.v2.checkpoint import CheckpointRestorer
from xenstream.v2.restore import restore_new_domain
from xenstream.v2.snapshot import snapshot

# The workload finishes (limit) during the first pass of either engine, so the guest at suspension is
# the same whichever engine migrates it, while both streams still carry pages sent several times.
WORKLOAD = "uniform:rate=40000,limit=600"


def legacy_live(spec_text: str, width: int):
    run = start_guest(spec_text)
    guest, xen = run.guest, run.xen
    load = parse_workload(WORKLOAD, guest, seed=1)
    clock = LinkClock(LINK)

    def suspend() -> bool:
        guest.suspend()
        run.suspended.append((snapshot(PvGuestView.open(xen, guest.domid)), b""))
        return True

    def runs(nbytes: int) -> None:
        clock.transmitted(nbytes)
        load.run_until(clock.now())

    out = io.BytesIO()
    result = save_pv_legacy_live(xen, guest.domid, out, toolstack_width=width, suspend=suspend, clock=clock,
                                 guest_runs=runs)
    return run, result, out.getvalue()


@pytest.mark.parametrize("width", [64, 32])
@pytest.mark.parametrize("spec", ["pv64:mem=8M,vcpus=2,seed=61", "pv32:mem=8M,vcpus=2,seed=62"])
def test_converted_legacy_live_stream_restores_to_the_v2_live_guest(spec, width):
    v1_run, v1_result, v1_stream = legacy_live(spec, width)
    v2_run = migrate(start_guest(spec), WORKLOAD, seed=1)
    assert v1_run.suspended[0][0] == v2_run.suspended[0][0]  # the same guest at suspension
    assert len(v1_result.iterations) >= 2 and v2_run.result.live_rounds >= 2
    converted = b"".join(legacy_chunks(v1_stream[:1], [v1_stream[1:]], fmt="libxl"))
    v1_xen, v1_restored = es.restore(converted, v1_run.spec)
    v2_xen, v2_restored = es.restore(v2_run.stream, v2_run.spec)
    v1_digest = es.restored_digest(v1_xen, v1_restored)
    exempt = es.exempt_pfns(v2_run.guest)
    es.assert_same_guest(v1_run.suspended[0][0], v1_digest, exempt)
    es.assert_same_guest(es.restored_digest(v2_xen, v2_restored), v1_digest, exempt)


def _vector(name: str) -> bytes:
    path = SHARED / "vectors" / f"{name}.v1"
    if not path.exists():
        pytest.skip(f"conformance vector {path} not present")
    return path.read_bytes()


def _checkpoint_restore(stream: bytes):
    xen = SimXen(capacity_frames=1 << 16)
    domid = xen.create_domain(max_vcpus=4, max_pages=1 << 15)
    restorer = CheckpointRestorer(xen, domid, store_evtchn=es.STORE_EVTCHN, console_evtchn=es.CONSOLE_EVTCHN)
    restorer.feed(stream)
    outcome = restorer.finish()
    return xen, outcome


def _plain_restore(stream: bytes):
    xen = SimXen(capacity_frames=1 << 16)
    result = restore_new_domain(xen, [stream], max_vcpus=4, max_pages=1 << 15, store_evtchn=es.STORE_EVTCHN,
                                console_evtchn=es.CONSOLE_EVTCHN)
    return xen, result


@pytest.mark.parametrize("fmt", ["libxl", "libxc"])
def test_v1_remus_stream_converted_with_checkpoints_restores_the_last_checkpoint(tmp_path, fmt):
    v1 = _vector("pv64-remus")
    every, result = convert_bytes(v1, tmp_path, fmt=fmt, checkpoints=True)
    last_only, _ = convert_bytes(v1, tmp_path, fmt=fmt)
    xen, outcome = _checkpoint_restore(every)
    assert outcome.checkpoints == result.summary.checkpoints >= 2
    plain_xen, plain = _plain_restore(last_only)
    assert es.restored_digest(xen, outcome.result) == es.restored_digest(plain_xen, plain)


def test_v1_remus_stream_cut_in_its_last_checkpoint_fails_over_to_the_one_before(tmp_path):
    every, _ = convert_bytes(_vector("pv64-remus"), tmp_path, fmt="libxl", checkpoints=True)
    _, commits = boundaries(every)
    assert len(commits) >= 2
    start_of_last = commits[-2]
    before_xen, before = _checkpoint_restore(every[:start_of_last])
    cut_xen, cut = _checkpoint_restore(every[:(start_of_last + commits[-1]) // 2])
    assert (before.checkpoints, cut.checkpoints) == (len(commits) - 1, len(commits) - 1)
    assert cut.failover
    assert es.restored_digest(cut_xen, cut.result) == es.restored_digest(before_xen, before.result)
