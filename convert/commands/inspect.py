"""`xenstream inspect PATH [--json]`: what a save image holds, without a hex dump.

Headers, every record with offset, type and length (runs of PAGE_DATA collapsed unless --all-records),
pages per type, pfn range, vcpus, HVM params, checkpoints. PATH is a path, an fd number, or '-' for stdin.
A bad stream still prints what was read before the fault, then one error line with its offset; exit 1.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Callable

from xenstream.convert import edge, fdio
from xenstream.v2 import constants as V2
from xenstream.v2 import summary as v2_summary

HEAD_SIZE = 48  # enough to recognise every v2 header, including the xl header's mandatory flags

# Inspector(fd, head, args) -> report with .ok, .error, .error_offset, .to_dict(), .lines().
# `head` holds the first bytes of the stream, already read from fd; `args` the parsed options.
# Keyed by the name detect_format returns; a v1 inspector registers itself here under "v1".
INSPECTORS: dict[str, Callable] = {
    "v2": lambda fd, head, args: v2_summary.inspect_fd(fd, head, colo=args.colo, collapse=not args.all_records),
}


def detect_format(head: bytes) -> str:
    """'v2' for xl (with the STREAMv2 flag), libxl and libxc v2 headers, 'v1' for anything else.

    A libxc image header with a damaged marker but the 'XENF' id in place still counts as v2, so that the
    v2 reader, not a legacy parser, reports what is wrong with it.
    """
    if head.startswith(V2.XL_MAGIC):
        if len(head) < 40:
            return "v2"  # too short to tell; the v2 reader reports the truncation
        order = "<" if head[32:36] == struct.pack("<I", V2.XL_BYTEORDER) else ">"
        (mandatory,) = struct.unpack_from(order + "I", head, 36)
        return "v2" if mandatory & V2.XL_FLAG_STREAMV2 else "v1"
    if head[:8] in (struct.pack(">Q", V2.LIBXL_IDENT), struct.pack(">Q", V2.IMAGE_MARKER)):
        return "v2"
    if head[8:12] == struct.pack(">I", V2.IMAGE_ID):
        return "v2"
    return "v1"


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="summarise a save image (headers, records, pages, vcpus)",
                                   description=__doc__.split(": ", 1)[1])
    parser.add_argument("path", metavar="PATH", help="image: path, fd number, or - for stdin")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    parser.add_argument("--all-records", action="store_true", help="list every PAGE_DATA record instead of runs")
    parser.add_argument("--colo", action="store_true", help="v2: COLO stream (CHECKPOINT_STATE after each CHECKPOINT_END)")
    parser.set_defaults(func=run)


def _read_head(fd: int) -> bytes:
    head = b""
    while len(head) < HEAD_SIZE:
        data = os.read(fd, HEAD_SIZE - len(head))
        if not data:
            break
        head += data
    return head


def run(args) -> int:
    fd, owned = fdio.open_input_fd(args.path)
    try:
        head = _read_head(fd)
        fmt = detect_format(head)
        inspector = INSPECTORS.get(fmt)
        if inspector is None:
            raise edge.UsageError(f"{args.path}: not a v2 stream and no {fmt} inspector is installed")
        report = inspector(fd, head, args)
    finally:
        if owned:
            os.close(fd)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n".join(report.lines()) + "\n")
    if not report.ok:
        offset = f"offset {report.error_offset:#x}: " if report.error_offset is not None else ""
        print(f"xenstream: {offset}{report.error}", file=sys.stderr)
        return edge.EXIT_BAD_STREAM
    return edge.EXIT_OK
