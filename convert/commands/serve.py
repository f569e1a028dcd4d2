"""`xenstream serve`: a migration relay that converts v1 streams to v2 (and checks v2 streams) as they flow."""

from __future__ import annotations

import argparse
import signal

import attrs

from xenstream.convert import edge, logsetup
from xenstream.convert.service import Service
from xenstream.convert.service_config import (
    FORMATS,
    GUESTS,
    REMUS,
    WIDTHS,
    ConfigError,
    Timeouts,
    config_from_settings,
    load_toml,
    merge_command_line,
)

# Timeouts.<field> -> (option, metavar, help)
_TIMEOUT_OPTIONS = {
    "header": ("--header-timeout", "SECONDS", "from accept until the first bytes tell v1 from v2"),
    "idle": ("--idle-timeout", "SECONDS", "one read from a source or one write to a destination may wait"),
    "connect": ("--connect-timeout", "SECONDS", "to connect to a destination"),
    "min_rate": ("--min-rate", "BYTES", "per second a source must deliver while the service waits on it"),
    "rate_window": ("--rate-window", "SECONDS", "of waiting over which --min-rate is averaged"),
    "shutdown_grace": ("--shutdown-grace", "SECONDS", "streams in flight may take to finish after SIGTERM"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="relay migration streams, converting v1 to v2 as they flow",
        description=__doc__.split(": ", 1)[1],
        epilog="Listener addresses: HOST:PORT, [V6]:PORT, PORT (binds 127.0.0.1), unix:/PATH. "
               "Destinations: HOST:PORT, unix:/PATH, dir:/ABSOLUTE/DIRECTORY, restore:sim (a simulated Xen host). "
               "Command-line listeners are added to those of --config; other options override it.")
    parser.add_argument("--config", metavar="TOML", help="configuration file ([service], [timeouts], [[listener]])")
    parser.add_argument("--listen", action="append", metavar="ADDRESS", help="listen here (repeatable)")
    parser.add_argument("--to", action="append", metavar="DESTINATION",
                        help="destination of the matching --listen (repeatable, one per --listen)")
    parser.add_argument("--format", choices=FORMATS, help="v2 layer written for converted v1 streams (default libxc)")
    parser.add_argument("--width", choices=tuple(WIDTHS), help="v1 toolstack width in bits (default detect)")
    parser.add_argument("--guest", choices=tuple(GUESTS), help="v1 guest type (default detect)")
    parser.add_argument("--remus", choices=REMUS,
                        help="a v1 Remus (checkpointed) stream: 'checkpoints' forwards it as a v2 checkpointed "
                             "stream for a Remus secondary, each checkpoint closed by CHECKPOINT (libxl: "
                             "CHECKPOINT_END), as `convert --checkpoints` writes it, nothing spooled; a source "
                             "breaking off inside a checkpoint closes the destination without END, so the "
                             "receiver fails over to the last complete checkpoint (restore:sim does). "
                             "'refuse' rejects the stream when its checkpoint 2 begins (default checkpoints)")
    parser.add_argument("--max-connections", type=int, metavar="N", help="streams handled at once (default 32)")
    parser.add_argument("--buffer-size", type=int, metavar="BYTES", help="read buffer per stream (default 1 MiB)")
    parser.add_argument("--max-buffered", type=int, metavar="BYTES",
                        help="largest record a stream may make the service hold (default 16 MiB)")
    parser.add_argument("--restore-frames", type=int, metavar="N",
                        help="size of each restore:sim host in 4 KiB frames (default 262144: 1 GiB)")
    parser.add_argument("--allow", action="append", metavar="CIDR",
                        help="accept TCP sources only from these networks (repeatable; default any)")
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at /metrics here")
    for field in attrs.fields(Timeouts):
        option, metavar, text = _TIMEOUT_OPTIONS[field.name]
        parser.add_argument(option, dest=f"timeout_{field.name}", type=float, metavar=metavar,
                            help=f"{metavar.lower()} {text} (default {field.default:g})")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration, print it, and exit")
    # Also accepted after `serve`; SUPPRESS keeps the value given before it otherwise.
    parser.add_argument("--log-format", choices=("auto", "console", "plain", "json"), default=argparse.SUPPRESS,
                        help="log rendering (json for machines)")
    parser.set_defaults(func=run)


def build_config(args):
    try:
        settings = load_toml(args.config) if args.config else {}
        return config_from_settings(merge_command_line(settings, args))
    except ConfigError as exc:
        raise edge.UsageError(f"serve: {exc}") from None


def run(args) -> int:
    config = build_config(args)
    if args.check_config:
        print(config)
        return edge.EXIT_OK
    # A daemon reports every stream: info unless told to be quiet.
    logsetup.configure(args.log_format, -1 if args.quiet else max(1, args.verbose + 1), eager=True)
    service = Service(config)
    service.bind()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: service.request_stop())
    service.serve()
    return edge.EXIT_OK
