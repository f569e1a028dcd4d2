"""`xenstream`: one command line, subcommands discovered from xenstream.convert.commands."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from xenstream.convert import commands, edge, logsetup


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("xenstream")
    except PackageNotFoundError:
        ours = "unknown (not installed)"
    try:
        from xenstream.hv import kernels

        kernel = kernels.BACKEND
    except ImportError:
        kernel = "none"
    return f"xenstream {ours} (pagetable kernels: {kernel})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xenstream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version_text())
    logsetup.add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return edge.EXIT_BAD_STREAM
    logsetup.configure(args.log_format, -1 if args.quiet else args.verbose)
    return edge.run("xenstream", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
