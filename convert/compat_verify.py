"""`verify-stream-v2`: a drop-in for Xen's script of that name, backed by the strict verifier.

Same options (-i/--in FD-or-FILE defaulting to stdin, -f/--format libxc|libxl|xl defaulting to libxc,
-v/--verbose, -q/--quiet, --syslog) and the same exit codes: 0 valid, 1 invalid, 2 internal error.
Like Xen's script it stops reading at the outermost END. Unlike it, a failure is reported as one line
per finding (offset, record, what is wrong) instead of a traceback, and checkpointed streams are verified.
"""

from __future__ import annotations

import argparse
import os
import sys
import syslog

from xenstream.convert import edge, fdio, logsetup
from xenstream.v2 import constants as C
from xenstream.v2.events import Header, LibxcRecord, LibxlRecord
from xenstream.v2.libxl_records import LibxlHeader, libxl_record_name
from xenstream.v2.records import DomainHeader, ImageHeader, libxc_record_name
from xenstream.v2.verify import verify_fd
from xenstream.v2.verify_libxc import GUEST_NAMES
from xenstream.v2.xl_header import XlHeader

PROG = "verify-stream-v2"


class Output:
    """Xen's routing: info to stdout (or syslog) only when verbose; errors to stderr (and syslog)."""

    def __init__(self, verbose: bool, quiet: bool, use_syslog: bool):
        self.verbose = verbose and not quiet
        self.quiet = quiet
        self.use_syslog = use_syslog
        if use_syslog:
            syslog.openlog(PROG, syslog.LOG_PID)

    def info(self, message: str) -> None:
        if not self.verbose:
            return
        if self.use_syslog:
            syslog.syslog(syslog.LOG_INFO, message)
        else:
            print(message, flush=True)

    def error(self, message: str) -> None:
        if self.quiet:
            return
        if self.use_syslog:
            syslog.syslog(syslog.LOG_ERR, message)
        print(message, file=sys.stderr)


class Summary:
    """Verbose mode's running description of the stream, one line per header or record (page data squashed)."""

    def __init__(self, output: Output):
        self.output = output
        self.squashed_pages = 0

    def __call__(self, event) -> None:
        if isinstance(event, LibxcRecord) and event.type == C.REC_PAGE_DATA:
            self.squashed_pages += 1
            return
        if self.squashed_pages:
            self.output.info(f"Squashed {self.squashed_pages} Page Data records together")
            self.squashed_pages = 0
        describe = _EVENT_LINES.get(type(event))
        if describe is not None:
            self.output.info(describe(event))


def _domain_header_line(header: DomainHeader) -> str:
    guest = "x86 " + GUEST_NAMES.get(header.guest_type, "?")
    if header.converted_from_legacy:
        return f"Domain Header: legacy converted {guest}"
    return f"Domain Header: {guest} from Xen {header.xen_major}.{header.xen_minor}"


_HEADER_LINES = {
    XlHeader: lambda header: "Processed xl header",
    LibxlHeader: lambda header: "Libxl Header: little endian" + (", legacy converted" if header.legacy else ""),
    ImageHeader: lambda header: f"Libxc Image Header: Version {header.version}, little endian",
    DomainHeader: _domain_header_line,
}
_EVENT_LINES = {
    Header: lambda event: _HEADER_LINES[type(event.header)](event.header),
    LibxcRecord: lambda event: f"Libxc Record: {libxc_record_name(event.type)}, length {event.length}",
    LibxlRecord: lambda event: f"Libxl Record: {libxl_record_name(event.type)}, length {event.length}",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Verify a stream according to the v2 (or later) spec")
    parser.add_argument("-i", "--in", dest="fin", metavar="<FD or FILE>", default="0",
                        help="Stream to verify (defaults to stdin)")
    parser.add_argument("-v", "--verbose", action="store_true", help="Summarise stream contents")
    parser.add_argument("-q", "--quiet", action="store_true", help="Suppress all logging/errors")
    parser.add_argument("-f", "--format", dest="format", metavar="<libxc|libxl|xl>", default="libxc",
                        choices=("libxc", "libxl", "xl"), help="Format of the incoming stream (defaults to libxc)")
    parser.add_argument("--syslog", action="store_true", help="Log to syslog instead of stdout")
    return parser


def verify(args: argparse.Namespace) -> int:
    output = Output(args.verbose, args.quiet, args.syslog)
    fd, owned = fdio.open_input_fd(args.fin)
    try:
        report = verify_fd(fd, args.format, trailing=False, observer=Summary(output) if output.verbose else None)
    finally:
        if owned:
            os.close(fd)
    for line in report.lines():
        if line.startswith("warning: "):
            output.info("Warning: " + line.removeprefix("warning: "))
    if report.ok:
        return edge.EXIT_OK
    output.error("Stream Error:")
    for line in report.lines():
        if line.startswith("error"):
            output.error(line)
    return edge.EXIT_BAD_STREAM


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The reader logs (e.g. a skipped optional record) through structlog: keep stdout for the summary.
    logsetup.configure("plain", 0 if args.verbose and not args.quiet else -1, ident=PROG)
    return edge.run(PROG, lambda: verify(args))


if __name__ == "__main__":
    sys.exit(main())
