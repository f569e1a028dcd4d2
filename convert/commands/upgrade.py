"""`xenstream upgrade FILE...`: upgrade archived v1 save images to v2, verified, atomically.

Each FILE is converted into a temporary file in the target directory (-o DIR, or beside the
original with --in-place), verified in the same pass, fsynced and renamed into place. v2 files are
left alone. --in-place keeps the original as FILE.v1 unless --no-backup.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from xenstream.convert import convert_args, edge
from xenstream.convert.transform import AUTO_FORMAT
from xenstream.convert.upgrade import ProgressBar, UpgradeSettings, upgrade_files


def register(subparsers) -> None:
    parser = subparsers.add_parser("upgrade", help="upgrade v1 save images to v2 (verified, atomic)",
                                   description=__doc__.split(": ", 1)[1])
    parser.add_argument("files", nargs="+", metavar="FILE")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output-dir", metavar="DIR", help="write the upgraded files into DIR")
    where.add_argument("--in-place", action="store_true", help="replace each file (original kept as FILE.v1)")
    parser.add_argument("--no-backup", action="store_true", help="with --in-place: keep no FILE.v1")
    parser.add_argument("--jobs", "-j", type=int, default=1, metavar="N", help="files converted at once (default 1)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    convert_args.add_stream_options(parser, format_default=None)
    parser.set_defaults(func=run)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    if args.no_backup and not args.in_place:
        raise edge.UsageError("--no-backup only applies to --in-place")
    if args.output_dir is not None and not os.path.isdir(args.output_dir):
        raise edge.UsageError(f"{args.output_dir} is not a directory")
    if args.jobs < 1:
        raise edge.UsageError("--jobs must be at least 1")
    settings = UpgradeSettings(
        output_dir=args.output_dir, in_place=args.in_place, backup=not args.no_backup,
        options=convert_args.convert_options(args, fmt=args.format or AUTO_FORMAT),
        parser_options=convert_args.parser_options(args))
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        results = upgrade_files(args.files, settings, jobs=args.jobs, on_start=bar.start if bar else None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.stop()
    if args.json:
        json.dump({"files": [r.to_dict() for r in results],
                   "converted": sum(r.status == "converted" for r in results),
                   "already_v2": sum(r.status == "already-v2" for r in results),
                   "failed": sum(r.status == "failed" for r in results)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in results:
            detail = {"converted": f"-> {r.output}" + (f" (original kept as {r.backup})" if r.backup else ""),
                      "already-v2": "already v2, left alone",
                      "failed": f"FAILED: {r.error}"}.get(r.status, r.status)
            print(f"{r.path}: {detail}")
        counts = {s: sum(r.status == s for r in results) for s in ("converted", "already-v2", "failed")}
        print(f"{counts['converted']} converted, {counts['already-v2']} already v2, {counts['failed']} failed")
    return 1 if any(r.status == "failed" for r in results) else 0
