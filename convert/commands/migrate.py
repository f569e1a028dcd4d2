"""`xenstream migrate --guest SPEC --workload W --to ADDR`: live-migrate a simulated guest over TCP.

The sender is a simulated host: it builds the seeded guest, runs the workload on it (paced by the
migration's own clock: bytes sent over --link-rate, or real time with --realtime) and migrates it live as
a v2 libxl stream (--policy xen: Xen's stop rule; adaptive: ours), or as a Xen 4.5 v1 live stream with
--legacy (send it through `xenstream serve` to reach a v2 receiver). --checkpoint-interval MS keeps
checkpointing like Remus (--checkpoints of them, then the stream stops and the receiver fails over).
Per-round progress on a terminal; --report writes the JSON report (- for stdout).
"""

from __future__ import annotations

import json
import socket
import sys

from xenstream.convert import edge
from xenstream.convert.migrate import MigrateError, MigrateOptions, migrate_to_fd, round_line
from xenstream.convert.service_config import ConfigError, TcpAddress, parse_socket_address
from xenstream.hv.guestview import GuestStateError
from xenstream.hv.sim.builder import GuestSpec, GuestSpecError
from xenstream.hv.sim.workloads import WorkloadError, check_workload
from xenstream.legacy.save import LegacySaveError
from xenstream.v2.live import SaveError


def register(subparsers) -> None:
    parser = subparsers.add_parser("migrate", help="live-migrate a simulated guest to `xenstream receive` over TCP",
                                   description=__doc__.split(": ", 1)[1])
    parser.add_argument("--guest", required=True, metavar="SPEC", help="guest spec, e.g. pv64:mem=256M,vcpus=2,seed=7")
    parser.add_argument("--workload", default="idle", metavar="W",
                        help="idle, uniform[:rate=R], hotset[:pages=H,rate=R,cold=C], scan[:rate=R], "
                             "ptchurn[:rate=R,pool=P] (default idle)")
    parser.add_argument("--to", required=True, metavar="ADDR", help="receiver (or `xenstream serve`) HOST:PORT")
    parser.add_argument("--legacy", action="store_true", help="send a Xen 4.5 v1 live stream")
    parser.add_argument("--toolstack-width", type=int, choices=(32, 64), default=64, help="v1 only (default 64)")
    parser.add_argument("--policy", choices=("xen", "adaptive"), default="xen", help="v2 precopy stop policy")
    parser.add_argument("--downtime-ms", type=float, metavar="MS", help="adaptive only: stop once the rest fits")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--link-rate", type=float, default=125e6, metavar="BYTES",
                        help="bytes per second of the virtual link that paces the workload (default 125e6)")
    parser.add_argument("--realtime", action="store_true", help="pace the workload by the wall clock instead")
    parser.add_argument("--checkpoint-interval", type=float, metavar="MS", help="keep checkpointing (Remus)")
    parser.add_argument("--checkpoints", type=int, default=3, metavar="N", help="checkpoints to send (default 3)")
    parser.add_argument("--digest", action="store_true", help="report a digest of the guest at each suspension")
    parser.add_argument("--report", metavar="FILE", help="write the JSON report here (- for stdout)")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        address = parse_socket_address(args.to, "--to")
    except ConfigError as exc:
        raise edge.UsageError(str(exc)) from None
    if not isinstance(address, TcpAddress):
        raise edge.UsageError("--to needs HOST:PORT")
    if args.checkpoints < 1:
        raise edge.UsageError("--checkpoints must be at least 1")
    if args.legacy and (args.checkpoint_interval is not None or args.policy != "xen"):
        raise edge.UsageError("--legacy sends Xen 4.5's live stream: no --checkpoint-interval, no --policy")
    try:  # before connecting: a receiver waits for one stream only
        GuestSpec.parse(args.guest)
        check_workload(args.workload)
    except (GuestSpecError, WorkloadError) as exc:
        raise edge.UsageError(str(exc)) from None
    options = MigrateOptions(
        guest=args.guest, workload=args.workload, seed=args.seed, policy=args.policy,
        downtime=None if args.downtime_ms is None else args.downtime_ms / 1000, legacy=args.legacy,
        toolstack_width=args.toolstack_width, link_rate=args.link_rate, realtime=args.realtime,
        checkpoint_interval=None if args.checkpoint_interval is None else args.checkpoint_interval / 1000,
        checkpoints=args.checkpoints, digest=args.digest)
    progress = (lambda r: print(round_line(r), file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    try:
        with socket.create_connection((address.host, address.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            report = migrate_to_fd(sock.fileno(), options, on_round=progress)
            sock.shutdown(socket.SHUT_WR)
    except (GuestSpecError, WorkloadError, MigrateError, ValueError) as exc:
        raise edge.UsageError(str(exc)) from None
    except (SaveError, LegacySaveError, GuestStateError) as exc:
        print(f"xenstream migrate: {exc}", file=sys.stderr)
        return edge.EXIT_BAD_STREAM
    _write_report(args.report, report)
    print(f"migrated {report['guest']} ({report['format']}, {report['policy']}): {report['live_rounds']} live rounds, "
          f"final {report['final_pages']} pages, total {report['total_pages']} pages "
          f"({report['traffic_multiple']}x), {report['bytes']} bytes in {report['wall_seconds']:.2f} s",
          file=sys.stderr)
    return edge.EXIT_OK


def _write_report(target: str | None, report: dict) -> None:
    if target is None:
        return
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with open(target, "w") as out:
            out.write(text)
