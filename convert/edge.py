"""The edge of every command line: stream errors become one line and exit 1, our own bugs exit 2."""

from __future__ import annotations

import sys
import traceback
from typing import Callable

from xenstream.hv.lazylog import get_logger
from xenstream.legacy.errors import StreamError as LegacyStreamError
from xenstream.v2.errors import StreamError as V2StreamError

EXIT_OK = 0
EXIT_BAD_STREAM = 1
EXIT_INTERNAL = 2

STREAM_ERRORS = (LegacyStreamError, V2StreamError)


class UsageError(Exception):
    """A mistake in how the command was called (bad option combination, missing file)."""


def run(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command body, mapping every failure onto one stderr line and an exit code."""
    try:
        return body() or EXIT_OK
    except STREAM_ERRORS as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_BAD_STREAM
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_BAD_STREAM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        print(f"{prog}: output closed early", file=sys.stderr)
        return EXIT_BAD_STREAM
    except OSError as exc:
        print(f"{prog}: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return EXIT_BAD_STREAM
    except Exception as exc:  # our own bug: say so in one line, keep the trace in the debug log
        get_logger(__name__).debug("internal error", trace=traceback.format_exc())
        print(f"{prog}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
