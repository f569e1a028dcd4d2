"""Both ends of a simulated live migration, each a simulated host (behind `xenstream migrate` / `receive`).

Sender: `migrate_to_fd(fd, MigrateOptions(...))` builds the seeded guest on a fresh simulated Xen, starts
its workload and live-migrates it into `fd` - a libxl v2 stream from the v2 live engine, or with
`legacy=True` a Xen 4.5 v1 live stream - and returns a JSON-ready report (per round: pages dirtied and
sent, bytes, seconds; final-round pages, total pages, bytes, durations). The workload runs on the
migration's own clock: virtual (bytes on the wire / `link_rate`) unless `realtime`. With
`checkpoint_interval`, the v2 sender keeps checkpointing like Remus: after each checkpoint the guest
resumes for the interval, then the next checkpoint follows, `checkpoints` of them, then the stream
simply stops (no END, as Xen does today).

Receiver: `receive_from_fd(fd, ReceiveOptions(...))` restores whatever v2 stream arrives (plain, live or
checkpointed, libxc or libxl) into a new domain of a fresh simulated Xen, committing checkpoints only
when complete and failing over to the last one when the stream breaks off.

Both can report `guest_digest`: a sha256 over the guest as a save would carry it (per pfn: type, pin and
contents; per vcpu: the normalised context), leaving out the pages the restore rewrites on purpose
(start_info, the console ring, the P2M leaves), so sender and receiver digests are equal exactly when
the guest arrived intact.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

import attrs

from xenstream.convert.commands.save import build_suspendable
from xenstream.hv import abi
from xenstream.hv.guestview import PvGuestView
from xenstream.hv.lazylog import get_logger
from xenstream.hv.sim.builder import GuestSpec
from xenstream.hv.sim.workloads import LinkClock, WallClock, parse_workload
from xenstream.hv.sim.xen import SimXen
from xenstream.legacy.save_live import save_pv_legacy_live
from xenstream.v2.checkpoint import CheckpointRestorer
from xenstream.v2.live import save_pv_live
from xenstream.v2.policy import make_policy
from xenstream.v2.snapshot import GuestDigest, snapshot
from xenstream.v2.writer import V2Writer

log = get_logger(__name__)

READ_SIZE = 1 << 20
HEAD_READ = 64 << 10
STORE_EVTCHN = 1
CONSOLE_EVTCHN = 2


class MigrateError(ValueError):
    """Options that do not go together."""


@attrs.frozen
class MigrateOptions:
    guest: str
    workload: str = "idle"
    seed: int = 1
    policy: str = "xen"
    downtime: float | None = None  # seconds, adaptive policy only
    legacy: bool = False
    toolstack_width: int = 64
    link_rate: float = 125e6  # bytes per second of the virtual link
    realtime: bool = False
    checkpoint_interval: float | None = None  # seconds
    checkpoints: int = 3
    digest: bool = False


@attrs.frozen
class ReceiveOptions:
    max_vcpus: int = 8
    host_frames: int = 1 << 20
    digest: bool = False


def guest_digest(digest: GuestDigest, exempt: set[int]) -> str:
    """One sha256 for a GuestDigest, the contents of `exempt` pfns left out."""
    h = hashlib.sha256(f"{digest.width}/{digest.levels}/{digest.p2m_size}".encode())
    for page in digest.pages:
        contents = None if page.pfn in exempt else page.sha256
        h.update(f"|{page.pfn}:{page.type}:{int(page.pinned)}:{contents}".encode())
    for vcpu in digest.vcpus:
        h.update(f"|v{vcpu.id}:{int(vcpu.online)}:{vcpu.sha256}".encode())
    return h.hexdigest()


def migrate_to_fd(fd: int, options: MigrateOptions, on_round: Callable | None = None) -> dict:
    if options.legacy and options.checkpoint_interval is not None:
        raise MigrateError("checkpointed migration is v2 only")
    if options.legacy and options.policy != "xen":
        raise MigrateError("a legacy (Xen 4.5) sender has its own fixed policy; --policy is for v2")
    spec = GuestSpec.parse(options.guest)
    built_at = time.monotonic()
    xen, guest = build_suspendable(spec)
    workload = parse_workload(options.workload, guest, seed=options.seed)
    clock = WallClock() if options.realtime else LinkClock(options.link_rate)
    digests: list[str] = []

    def suspend() -> bool:
        guest.suspend()
        if options.digest:
            view = PvGuestView.open(xen, guest.domid)
            exempt = {guest.layout.start_info_pfn, guest.layout.console_pfn, *view.p2m_pfns}
            digests.append(guest_digest(snapshot(view), exempt))
        return True

    def guest_runs(nbytes: int) -> None:
        clock.transmitted(nbytes)
        workload.run_until(clock.now())

    def checkpoint(done: int) -> bool:
        if done >= options.checkpoints:
            return False
        xen.resume_domain(guest.domid)
        guest.resume_cancelled()
        clock.elapse(options.checkpoint_interval)
        workload.run_until(clock.now())
        return True

    log.info("migrating", guest=str(spec), workload=options.workload, build_seconds=round(time.monotonic() - built_at, 3))
    started_at, started = time.time(), time.monotonic()
    if options.legacy:
        with open(fd, "wb", buffering=1 << 20, closefd=False) as sink:
            result = save_pv_legacy_live(xen, guest.domid, sink, toolstack_width=options.toolstack_width,
                                         suspend=suspend, clock=clock, guest_runs=guest_runs, on_round=on_round)
    else:
        policy = make_policy(options.policy, options.downtime)
        result = save_pv_live(xen, guest.domid, V2Writer(fd), suspend, policy=policy, clock=clock,
                              guest_runs=guest_runs, on_round=on_round, libxl=True, payload_fd=fd,
                              checkpoint=checkpoint if options.checkpoint_interval is not None else None)
    finished = time.monotonic()
    report = {"role": "sender", "guest": str(spec), "workload": options.workload, "seed": options.seed,
              "format": "v1" if options.legacy else "v2", **result.as_dict(),
              "clock": "wall" if options.realtime else "link", "link_rate": None if options.realtime else options.link_rate,
              "wall_seconds": finished - started, "started_at": started_at, "finished_at": time.time(),
              "workload_actions": workload.actions}
    if options.digest:
        report["digests"] = digests
    return report


def prepare_host(options: ReceiveOptions) -> SimXen:
    """The receiving simulated host, its RAM touched once: a real host's memory exists before a migration
    arrives, so first-touch page faults of the simulator are not part of receiving."""
    xen = SimXen(capacity_frames=options.host_frames)
    memory = xen.machine.memview
    for offset in range(0, len(memory), abi.PAGE_SIZE):
        memory[offset] = 0
    return xen


def receive_from_fd(fd: int, options: ReceiveOptions, on_commit: Callable[[int], None] | None = None,
                    xen: SimXen | None = None) -> dict:
    xen = xen or SimXen(capacity_frames=options.host_frames)
    domid = xen.create_domain(max_vcpus=options.max_vcpus, max_pages=options.host_frames)
    restorer = CheckpointRestorer(xen, domid, store_evtchn=STORE_EVTCHN, console_evtchn=CONSOLE_EVTCHN,
                                  on_commit=on_commit)
    received = 0
    first_byte_at = None
    started = time.monotonic()
    buffer = bytearray(READ_SIZE)  # reused: a fresh 1 MiB object per read costs page faults every time
    view = memoryview(buffer)
    try:
        after_payload = False
        while True:
            targets = restorer.payload_targets()  # page payloads go from the socket straight into the guest
            # Right after a payload a record head follows: a short read, so little of the next payload
            # arrives in the buffer (it would be copied from there).
            n = os.readv(fd, targets or [view[:HEAD_READ] if after_payload else buffer])
            if first_byte_at is None:
                first_byte_at = time.time()
            received += n
            after_payload = bool(targets)
            if targets and n:
                restorer.payload_filled(n)
                continue
            restorer.feed(view[:n] if n else b"")
            if not n:
                break
        outcome = restorer.finish()
    except BaseException:
        restorer.close()
        xen.destroy_domain(domid)
        raise
    result = outcome.result
    xen.set_max_mem(domid, xen.get_domain_info(domid).nr_pages)
    report = {"role": "receiver", "domid": domid, "bytes": received, "checkpoints": outcome.checkpoints,
              "failover": outcome.failover, "ended": outcome.reason, "max_pfn": result.max_pfn,
              "pages_written": result.pages_written, "pages_populated": result.pages_populated,
              "seconds": time.monotonic() - started, "first_byte_at": first_byte_at, "finished_at": time.time()}
    if options.digest:
        view = PvGuestView.with_p2m(xen, domid, result.p2m, result.max_pfn)
        console_pfn = xen.m2p_view()[result.console_mfn]
        exempt = {result.start_info_pfn, console_pfn, *result.p2m_pfns}
        report["digest"] = guest_digest(snapshot(view), exempt)
    return report


def round_line(report) -> str:
    """One progress line for a round (v2 RoundReport or legacy LegacyIteration)."""
    kind = "live" if report.live else "final"
    dirty = getattr(report, "dirty", None)
    parts = [f"round {report.number:>2} {kind:5s}"]
    if dirty is not None:
        parts.append(f"dirty {dirty:>8}")
    parts += [f"sent {report.sent:>8}", f"skipped {report.skipped:>7}", f"{report.bytes / (1 << 20):8.1f} MiB",
              f"{report.seconds * 1000:8.1f} ms"]
    return "  ".join(parts)


def host_frames_for(size_bytes: int) -> int:
    return max(size_bytes // abi.PAGE_SIZE, 16 * abi.SUPERPAGE_FRAMES)
