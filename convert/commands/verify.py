"""`xenstream verify PATH|-|FD`: strictly verify a v2/v3 stream (bare libxc, libxl, or xl save file)."""

from __future__ import annotations

import json
import os
import sys

from xenstream.convert import edge, fdio
from xenstream.v2.verify import FORMATS, GUEST_TYPES, verify_fd

CHECKPOINTED = {"auto": None, "yes": True, "no": False}


def register(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="strictly verify a v2/v3 stream",
                                   description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("input", metavar="PATH|-|FD", help="stream file, '-' for stdin, or an open fd number")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="what the stream starts with (auto: detect an xl header, a libxl or a bare libxc stream)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--checkpointed", choices=tuple(CHECKPOINTED), default="auto",
                        help="whether the stream is checkpointed (Remus/COLO); auto: a CHECKPOINT record says so")
    parser.add_argument("--colo", action="store_true", help="COLO stream: a CHECKPOINT_STATE follows each CHECKPOINT_END")
    parser.add_argument("--max-vcpus", type=int, metavar="N", help="the target domain's vcpu count (vcpu ids must be below it)")
    parser.add_argument("--guest", choices=tuple(GUEST_TYPES), help="the type of the domain the stream is for")
    parser.add_argument("--max-findings", type=int, default=100, metavar="N", help="report at most N errors and N warnings")
    parser.add_argument("--stop-at-end", action="store_true",
                        help="stop reading at the outermost END (a live socket, or a migration capture with more after "
                             "it); by default bytes after END are an error")
    parser.set_defaults(func=run)


def run(args) -> int:
    fd, owned = fdio.open_input_fd(args.input)
    try:
        report = verify_fd(fd, args.format, checkpointed=CHECKPOINTED[args.checkpointed], colo=args.colo,
                           max_vcpus=args.max_vcpus, guest=args.guest, cap=args.max_findings,
                           trailing=not args.stop_at_end)
    finally:
        if owned:
            os.close(fd)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for line in report.lines():
            print(line)
        print(summary(report))
    return edge.EXIT_OK if report.ok else edge.EXIT_BAD_STREAM


def summary(report) -> str:
    verdict = "valid" if report.ok else "INVALID"
    what = " ".join(str(x) for x in (report.format, f"v{report.version}" if report.version else None, report.guest_type) if x)
    checkpoints = f", {report.checkpoints} checkpoints" if report.checkpoints else ""
    counts = f"{len(report.errors) + report.dropped_errors} errors, {len(report.warnings) + report.dropped_warnings} warnings"
    return f"{verdict}: {what or 'unrecognised'} stream, {report.records} records, {report.pages} pages{checkpoints}; {counts}"
