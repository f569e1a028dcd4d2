"""Loggers that import structlog only when a message is actually emitted.

`import structlog` pulls in asyncio, ssl and the stdlib logging machinery: about 40 ms, a tenth of what
converting a whole 1 GiB file takes, paid by every `convert-legacy-stream` that libxl execs, though a
run at the default level usually has nothing to say. Modules take `log = get_logger(__name__)` from
here; the command lines hand their level and their structlog set-up to `defer_configuration`. A call
below that level returns at once while structlog is not loaded; the first call at or above it loads and
configures structlog and from then on every call goes straight to it.

Without a deferred configuration (a library user, the tests) nothing is filtered here: structlog and
whatever configuration its user gave it decide, exactly as with `structlog.get_logger`. This module sits
in `hv` because that is the package every other one may import; it imports nothing of ours.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

_LEVELS = {"debug": 10, "info": 20, "msg": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40,
           "critical": 50, "fatal": 50}

_threshold: int | None = None  # set by defer_configuration: calls below it are dropped while structlog is not loaded
_pending_configuration: Callable[[], None] | None = None


def defer_configuration(threshold: int, configure: Callable[[], None]) -> None:
    """Drop calls below `threshold` (a logging level) until structlog is needed; run `configure` (which
    imports and configures structlog) before the first call that is not dropped."""
    global _threshold, _pending_configuration
    _threshold = threshold
    _pending_configuration = configure
    if "structlog" in sys.modules:  # already paid for: configure now, as an eager set-up would
        activate()


def activate() -> None:
    """Run a deferred configuration now (a no-op when there is none or it already ran)."""
    global _pending_configuration
    configure, _pending_configuration = _pending_configuration, None
    if configure is not None:
        configure()


def _discard(*args, **kwargs) -> None:
    return None


class LazyLogger:
    """Stands for `structlog.get_logger(name).bind(**context)` until a message gets through."""

    __slots__ = ("_name", "_context")

    def __init__(self, name: str | None = None, context: dict | None = None) -> None:
        self._name = name
        self._context = context or {}

    def bind(self, **values) -> LazyLogger:
        return LazyLogger(self._name, {**self._context, **values})

    def __getattr__(self, method: str):
        level = _LEVELS.get(method)
        if level is not None and _threshold is not None and level < _threshold and "structlog" not in sys.modules:
            return _discard
        activate()
        import structlog

        logger = structlog.get_logger(self._name) if self._name else structlog.get_logger()
        if self._context:
            logger = logger.bind(**self._context)
        return getattr(logger, method)


def get_logger(name: str | None = None) -> LazyLogger:
    return LazyLogger(name)
