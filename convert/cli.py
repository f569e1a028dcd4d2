"""xenstream: inspect, verify, convert, save and restore Xen domain save/migration images.

One command line; its subcommands are discovered from xenstream.convert.commands.
"""

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


GLOBAL_OPTIONS_WITH_VALUE = frozenset({"--log-format"})


def requested_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line, or None (help, --version, nothing)."""
    skip_next = False
    for token in argv:
        if skip_next:
            skip_next = False
        elif token in GLOBAL_OPTIONS_WITH_VALUE:
            skip_next = True
        elif not token.startswith("-"):
            return token
    return None


def command_modules(command: str | None) -> list[str]:
    """Modules to import: only the named command's own (`NAME` and its plug-ins `NAME_*`), all for help.

    Importing every command costs most of a second of start-up, which a drop-in exec'd per
    migration should not pay.
    """
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    if command is not None:
        own = [n for n in names if n == command or n.startswith(command + "_")]
        if own:
            return own
    return names


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xenstream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version_text())
    logsetup.add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = requested_command(sys.argv[1:] if argv is None else argv)
    for name in command_modules(command):
        module = importlib.import_module(f"{commands.__name__}.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return edge.EXIT_BAD_STREAM
    logsetup.configure(args.log_format, -1 if args.quiet else args.verbose)
    return edge.run("xenstream", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
