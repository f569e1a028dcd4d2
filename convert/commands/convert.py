"""`xenstream convert IN OUT`: convert a legacy (v1) stream into a v2 stream.

IN and OUT are paths, fd numbers, or '-' for stdin / stdout. The options are those of Xen's
`convert-legacy-stream`; width, guest type and wrapper are detected when not given, and without
--format an xl save file becomes an xl save file of a libxl stream, an HVM stream a libxl stream (the only
layer that carries the device-model state), a PV stream a bare libxc stream.
"""

from __future__ import annotations

import os

from xenstream.convert import convert_args
from xenstream.convert.pipeline import convert_fds
from xenstream.convert.transform import AUTO_FORMAT
from xenstream.hv.lazylog import get_logger

log = get_logger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert a legacy v1 stream into a v2 stream",
                                   description=__doc__.split(": ", 1)[1])
    parser.add_argument("input", metavar="IN", help="v1 stream: path, fd number, or - for stdin")
    parser.add_argument("output", metavar="OUT", help="v2 output: path, fd number, or - for stdout")
    convert_args.add_stream_options(parser, format_default=None)
    parser.set_defaults(func=run)


def _open_input(spec: str) -> tuple[int, bool]:
    if spec == "-":
        return 0, False
    if spec.isdigit():
        return int(spec), False
    return os.open(spec, os.O_RDONLY | os.O_CLOEXEC), True


def _open_output(spec: str) -> tuple[int, str | None]:
    if spec == "-":
        return 1, None
    if spec.isdigit():
        return int(spec), None
    return os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644), spec


def run(args) -> int:
    fd_in, owned_in = _open_input(args.input)
    fd_out, path_out = _open_output(args.output)
    done = False
    try:
        result = convert_fds(fd_in, fd_out, convert_args.convert_options(args, fmt=args.format or AUTO_FORMAT),
                             verify=args.verify, **convert_args.parser_options(args))
        done = True
    finally:
        if owned_in:
            os.close(fd_in)
        if path_out is not None:
            os.close(fd_out)
            if not done:
                os.unlink(path_out)  # no half-written stream left under the name asked for
    log.info("converted", bytes_in=result.bytes_in, bytes_out=result.bytes_out, seconds=round(result.seconds, 3),
             checkpoints=result.summary.checkpoints, moved_by=result.moved_by,
             verified=None if result.report is None else result.report.ok)
    return 0
