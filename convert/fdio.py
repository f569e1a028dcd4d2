"""Command-line stream arguments: a path, a file descriptor number, or '-' for stdin/stdout."""

from __future__ import annotations

import os
import sys


def open_input_fd(spec: str | None) -> tuple[int, bool]:
    """Return (fd, owned). Owned fds are ours to close."""
    if spec is None or spec == "-":
        return sys.stdin.fileno(), False
    if spec.isdigit():
        return int(spec), False
    return os.open(spec, os.O_RDONLY | os.O_CLOEXEC), True


def open_output_fd(spec: str | None) -> tuple[int, bool]:
    if spec is None or spec == "-":
        return sys.stdout.fileno(), False
    if spec.isdigit():
        return int(spec), False
    return os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644), True


def read_chunks(fd: int, size: int = 1 << 20):
    """Yield successive reads from fd until end of input."""
    while True:
        data = os.read(fd, size)
        if not data:
            return
        yield data
