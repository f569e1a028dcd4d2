"""Moving N bytes from one fd to another without passing them through Python when the kernel can.

Part of the pipeline's I/O layer (the transform never sees an fd). The fastest primitive that the
pair of fds allows is chosen once; if the kernel refuses it at run time (an O_APPEND file, a
filesystem without copy_file_range, a socket where splice is not supported), the mover falls back
to the next one for good. The last resort reads into one reused buffer.
"""

from __future__ import annotations

import errno
import os
import select
import stat

# Errors meaning "this primitive cannot serve this pair of fds", as opposed to a real I/O failure.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.EBADF,
                          errno.ESPIPE, errno.ENOTSUP})
# "Try again": a non-blocking fd (O_NONBLOCK belongs to the open file, so whoever shares it may have set
# it) has no data or no room yet. Not a failure: wait until it has, then retry.
_WOULD_BLOCK = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})
_SPLICE_CHUNK = 1 << 20
_BUFFER_SIZE = 1 << 20


class InputEnded(Exception):
    """The input ended after `moved` of the requested bytes."""

    def __init__(self, moved: int):
        super().__init__(f"input ended after {moved} bytes")
        self.moved = moved


def fd_kind(fd: int) -> str:
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "other"


class FdMover:
    """Moves bytes from the current position of `fd_in` to the current position of `fd_out`."""

    def __init__(self, fd_in: int, fd_out: int, *, buffer: bytearray | None = None):
        self.fd_in = fd_in
        self.fd_out = fd_out
        kinds = (fd_kind(fd_in), fd_kind(fd_out))
        self._strategies = []
        if kinds == ("file", "file"):
            self._strategies.append(self._copy_file_range)
        if "pipe" in kinds:
            self._strategies.append(self._splice)
        if kinds[0] == "file":
            self._strategies.append(self._sendfile)
        self._strategies.append(self._buffered)
        self._buffer = buffer if buffer is not None else bytearray(_BUFFER_SIZE)
        self.bytes_by_method: dict[str, int] = {}

    def move(self, count: int) -> None:
        """Move exactly `count` bytes; raise InputEnded if the input runs out first."""
        moved = 0
        while moved < count:
            strategy = self._strategies[0]
            try:
                step = strategy(count - moved)
            except OSError as exc:
                if exc.errno in _WOULD_BLOCK:  # either side may be the non-blocking one
                    wait_readable(self.fd_in)
                    wait_writable(self.fd_out)
                    continue
                if exc.errno in _UNSUPPORTED and strategy is not self._buffered:
                    self._strategies.pop(0)
                    continue
                raise
            if step == 0:
                raise InputEnded(moved)
            moved += step
            name = strategy.__name__.lstrip("_")
            self.bytes_by_method[name] = self.bytes_by_method.get(name, 0) + step

    def _copy_file_range(self, count: int) -> int:
        return os.copy_file_range(self.fd_in, self.fd_out, count)

    def _splice(self, count: int) -> int:
        return os.splice(self.fd_in, self.fd_out, min(count, _SPLICE_CHUNK))

    def _sendfile(self, count: int) -> int:
        return os.sendfile(self.fd_out, self.fd_in, None, count)

    def _buffered(self, count: int) -> int:
        view = memoryview(self._buffer)[:min(count, len(self._buffer))]
        got = os.readv(self.fd_in, [view])
        if got:
            write_all(self.fd_out, view[:got])
        return got


def _wait(fd: int, events: int) -> None:
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()  # also returns on POLLHUP / POLLERR: the retried call then reports end or error


def wait_readable(fd: int) -> None:
    _wait(fd, select.POLLIN)


def wait_writable(fd: int) -> None:
    _wait(fd, select.POLLOUT)


def read_some(fd: int, size: int) -> bytes:
    """os.read that waits on a non-blocking fd with no data yet (b"" still means the end of input)."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            wait_readable(fd)


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:  # a non-blocking fd that is full for now
            wait_writable(fd)
            continue
        view = view[written:]


def copy_range(fd_src: int, offset: int, fd_out: int, count: int, buffer: bytearray) -> None:
    """Copy `count` bytes at `offset` of the (regular) file fd_src to the current position of fd_out."""
    while count:
        try:
            step = os.sendfile(fd_out, fd_src, offset, count)
        except OSError as exc:
            if exc.errno in _WOULD_BLOCK:
                wait_writable(fd_out)
                continue
            if exc.errno not in _UNSUPPORTED:
                raise
            view = memoryview(buffer)[:min(count, len(buffer))]
            step = os.preadv(fd_src, [view], offset)
            if step:
                write_all(fd_out, view[:step])
        if step == 0:
            raise InputEnded(0)
        offset += step
        count -= step
