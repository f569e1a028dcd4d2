"""structlog configuration shared by every command line: human on a TTY, JSON for machines, syslog on request.

The set-up is deferred (xenstream.hv.lazylog) until something is logged at the chosen level, so that a
run with nothing to say never imports structlog and the logging machinery.
"""

from __future__ import annotations

import os
import sys

from xenstream.hv import lazylog

_LEVEL_BY_VERBOSITY = {-1: 40, 0: 30, 1: 20}  # logging.ERROR, WARNING, INFO; DEBUG (10) beyond


def configure(log_format: str = "auto", verbosity: int = 0, syslog: bool = False, ident: str = "xenstream",
              *, eager: bool = False) -> None:
    """Send logs to stderr (and syslog when asked), from the first message that gets through on
    (`eager`: set structlog up now, for code that logs through structlog directly).

    verbosity: -1 quiet (errors only), 0 warnings, 1 info, 2+ debug.
    """
    level = _LEVEL_BY_VERBOSITY.get(verbosity, 10)
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "plain"
    lazylog.defer_configuration(level, lambda: _apply(log_format, level, syslog, ident))
    if eager:
        lazylog.activate()


def _apply(log_format: str, level: int, syslog: bool, ident: str) -> None:
    import logging
    import logging.handlers

    import structlog

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=True)
    elif log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if syslog:
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        syslog_handler = logging.handlers.SysLogHandler(address=address)
        syslog_handler.ident = f"{ident}: "
        syslog_handler.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(syslog_handler)

    formatter = structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=shared,
    )
    root = logging.getLogger()
    root.handlers.clear()
    for handler in handlers:
        if handler is handlers[0]:
            handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def add_arguments(parser, *, syslog: bool = False) -> None:
    parser.add_argument("--log-format", choices=("auto", "console", "plain", "json"), default="auto",
                        help="log rendering: human on a TTY by default, json for machines")
    if syslog:
        parser.add_argument("--syslog", action="store_true", help="also log to syslog")
