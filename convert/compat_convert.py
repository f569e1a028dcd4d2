"""`convert-legacy-stream`: a drop-in for Xen's converter of legacy (v1) streams to v2.

libxl execs it through LIBXL_CONVERT_HELPER as
``--in FD --out FD --width 64 --guest hvm --format libxl``: input and output are inherited fd numbers
(or paths), the output is written as it is produced, and the exit code says how it went: 0 done,
1 bad stream (one line on stderr, no END record written), 2 internal error.
"""

from __future__ import annotations

import argparse
import os
import sys

from xenstream.convert import convert_args, edge, logsetup
from xenstream.convert.pipeline import convert_fds
from xenstream.convert.transform import CONVERTER_VERSION
from xenstream.hv.lazylog import get_logger

PROG = "convert-legacy-stream"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, usage="%(prog)s [options] -i INPUT -o OUTPUT [-w WIDTH] [-g GUEST]",
        description="Convert a legacy stream to a v2 (or later) stream")
    parser.add_argument("--version", action="version", version=str(CONVERTER_VERSION))
    parser.add_argument("-i", "--in", dest="fin", metavar="<FD or FILE>", help="legacy input to convert")
    parser.add_argument("-o", "--out", dest="fout", metavar="<FD or FILE>", help="v2 (or later) format output")
    convert_args.add_stream_options(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="summarise stream contents")
    parser.add_argument("--syslog", action="store_true", help="log to syslog as well")
    return parser


def _open(spec: str, flags: int) -> int:
    if spec.isdigit():
        return int(spec)
    return os.open(spec, flags | os.O_CLOEXEC, 0o644)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fin is None or args.fout is None:
        parser.print_help(sys.stderr)
        return edge.EXIT_BAD_STREAM
    logsetup.configure("auto", 1 if args.verbose else 0, syslog=args.syslog, ident=PROG)
    return edge.run(PROG, lambda: _convert(args))


def _convert(args) -> int:
    fd_in = _open(args.fin, os.O_RDONLY)
    fd_out = _open(args.fout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        result = convert_fds(fd_in, fd_out, convert_args.convert_options(args), verify=args.verify,
                             **convert_args.parser_options(args))
    finally:
        # Xen's converter closes its output too: the reader sees end of input when we are done.
        os.close(fd_out)
    summary = result.summary
    get_logger(__name__).info("converted", bytes_in=result.bytes_in, bytes_out=result.bytes_out,
                              pages=summary.pages, checkpoints=summary.checkpoints,
                              seconds=round(result.seconds, 3), moved_by=result.moved_by)
    return edge.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
