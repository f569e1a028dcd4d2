"""`xenstream receive --listen ADDR`: wait for one migration stream and restore it on a simulated host.

Accepts one TCP connection, restores the v2 stream it carries (plain, live or checkpointed; libxc or
libxl) into a new PV domain of a fresh simulated Xen, committing checkpoints only when complete and
failing over to the last one if the stream breaks off, and reports what arrived (--report FILE, - for
stdout). Prints `listening on HOST:PORT` on stderr once ready (port 0 picks a free one).
"""

from __future__ import annotations

import json
import socket
import sys

from xenstream.convert import edge
from xenstream.convert.bench import parse_size
from xenstream.convert.migrate import ReceiveOptions, host_frames_for, prepare_host, receive_from_fd
from xenstream.convert.service_config import ConfigError, TcpAddress, parse_socket_address


def register(subparsers) -> None:
    parser = subparsers.add_parser("receive", help="wait for a migration stream and restore it (simulated host)",
                                   description=__doc__.split(": ", 1)[1])
    parser.add_argument("--listen", required=True, metavar="ADDR", help="HOST:PORT or PORT (binds 127.0.0.1)")
    parser.add_argument("--max-vcpus", type=int, default=8, metavar="N", help="vcpus of the new domain (default 8)")
    parser.add_argument("--host-mem", default="4G", metavar="SIZE", help="simulated host memory (default 4G)")
    parser.add_argument("--digest", action="store_true", help="report a digest of the restored guest")
    parser.add_argument("--report", metavar="FILE", help="write the JSON report here (- for stdout)")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        address = parse_socket_address(args.listen, "--listen")
        host_bytes = parse_size(args.host_mem)
    except (ConfigError, ValueError) as exc:
        raise edge.UsageError(str(exc)) from None
    if not isinstance(address, TcpAddress):
        raise edge.UsageError("--listen needs HOST:PORT")
    options = ReceiveOptions(max_vcpus=args.max_vcpus, host_frames=host_frames_for(host_bytes), digest=args.digest)
    xen = prepare_host(options)
    with socket.create_server((address.host, address.port)) as server:
        host, port = server.getsockname()[:2]
        print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
        conn, peer = server.accept()
    with conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        commits = (lambda n: print(f"checkpoint {n} committed", file=sys.stderr, flush=True)) \
            if sys.stderr.isatty() else None
        report = receive_from_fd(conn.fileno(), options, on_commit=commits, xen=xen)
    report["peer"] = f"{peer[0]}:{peer[1]}"
    if args.report == "-":
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()
    elif args.report:
        with open(args.report, "w") as out:
            out.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    how = f"failover to checkpoint {report['checkpoints']}" if report["failover"] else "complete"
    print(f"received {report['bytes']} bytes: guest restored as domain {report['domid']} ({how}), "
          f"{report['pages_written']} page writes in {report['seconds']:.2f} s", file=sys.stderr)
    return edge.EXIT_OK
