"""Destinations of `xenstream serve`: where one converted stream goes.

A sink receives the output of one stream as lists of buffers and ends in exactly one of two ways:
`commit()` after the conversion accepted the whole input (the stream is complete), or `abort()`
otherwise: a socket is closed with what was sent so far (never an END record, so the receiver sees a
truncated stream), a file is removed before it ever gets its final name. Only the listener's configured
destination is ever opened: nothing read from the network chooses a path or an address.
"""

from __future__ import annotations

import datetime
import os
import socket
import struct

from xenstream.convert.service_config import DirectoryTarget, RestoreTarget, TcpAddress, UnixAddress
from xenstream.convert.service_restore import RestoreSink

_IOV_MAX = 512


def set_kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """A timeout enforced by the kernel on a blocking socket (SO_RCVTIMEO / SO_SNDTIMEO).

    Blocking sockets keep the GIL released for a whole send or receive; Python-level timeouts would
    return to the interpreter after every partial transfer, which many streams at once pay for dearly.
    A timed-out call fails with EAGAIN (BlockingIOError).
    """
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


class DestinationError(Exception):
    """The destination refused, stalled or failed; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"destination {reason}: {detail}")
        self.reason = reason


def _splice_all(pipe_fd: int, fd: int, count: int) -> None:
    while count:
        count -= os.splice(pipe_fd, fd, count, flags=os.SPLICE_F_MOVE | os.SPLICE_F_MORE)


class SocketSink:
    """A connected TCP or Unix stream socket; sends block at most `idle` seconds (a stalled receiver)."""

    SPLICES = True

    def __init__(self, address: TcpAddress | UnixAddress, connect_timeout: float, idle_timeout: float):
        self.description = str(address)
        self._idle = idle_timeout
        try:
            if isinstance(address, TcpAddress):
                self._sock = socket.create_connection((address.host, address.port), timeout=connect_timeout)
            else:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(connect_timeout)
                try:
                    self._sock.connect(address.path)
                except BaseException:
                    self._sock.close()
                    raise
        except TimeoutError as exc:
            raise DestinationError("timeout", f"connecting to {address}: {exc}") from None
        except OSError as exc:
            raise DestinationError("refused", f"connecting to {address}: {exc.strerror or exc}") from None
        self._sock.settimeout(None)
        set_kernel_timeout(self._sock, socket.SO_SNDTIMEO, idle_timeout)

    def write(self, buffers: list) -> None:
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        try:
            while pending:
                sent = self._sock.sendmsg(pending[:_IOV_MAX])
                while sent:
                    head = pending[0]
                    if sent >= len(head):
                        sent -= len(head)
                        pending.pop(0)
                    else:
                        pending[0] = head[sent:]
                        sent = 0
        except (BlockingIOError, TimeoutError):
            raise DestinationError("stalled", f"{self.description} accepted nothing for {self._idle:g}s") from None
        except OSError as exc:
            raise DestinationError("closed", f"writing to {self.description}: {exc.strerror or exc}") from None

    def splice_from(self, pipe_fd: int, count: int) -> None:
        """Send `count` bytes waiting in a pipe, in the kernel."""
        try:
            _splice_all(pipe_fd, self._sock.fileno(), count)
        except (BlockingIOError, TimeoutError):
            raise DestinationError("stalled", f"{self.description} accepted nothing for {self._idle:g}s") from None
        except OSError as exc:
            raise DestinationError("closed", f"writing to {self.description}: {exc.strerror or exc}") from None

    def commit(self) -> str:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise DestinationError("closed", f"finishing {self.description}: {exc.strerror or exc}") from None
        finally:
            self._sock.close()
        return self.description

    def abort(self) -> None:
        self._sock.close()

    def interrupt(self) -> None:
        """From another thread: make a blocked write fail now."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class DirectorySink:
    """One file per stream, written under a temporary name, fsynced, then linked to its final name.

    The final name comes from the listener, the time and the connection number only. `os.link` never
    replaces an existing file, so a name clash fails the stream instead of overwriting an image.
    """

    SPLICES = True

    def __init__(self, target: DirectoryTarget, listener: str, connection: int, suffix: str):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        self._dir = target.path
        self._final = os.path.join(target.path, f"{listener}-{stamp}-{connection:06d}.{suffix}")
        self._temp = os.path.join(target.path, f".{listener}-{stamp}-{connection:06d}.partial")
        self.description = self._final
        try:
            self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        except OSError as exc:
            raise DestinationError("refused", f"creating {self._temp}: {exc.strerror or exc}") from None

    def write(self, buffers: list) -> None:
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        try:
            while pending:
                written = os.writev(self._fd, pending[:_IOV_MAX])
                while written:
                    head = pending[0]
                    if written >= len(head):
                        written -= len(head)
                        pending.pop(0)
                    else:
                        pending[0] = head[written:]
                        written = 0
        except OSError as exc:
            raise DestinationError("io", f"writing {self._temp}: {exc.strerror or exc}") from None

    def splice_from(self, pipe_fd: int, count: int) -> None:
        try:
            _splice_all(pipe_fd, self._fd, count)
        except OSError as exc:
            raise DestinationError("io", f"writing {self._temp}: {exc.strerror or exc}") from None

    def commit(self) -> str:
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.link(self._temp, self._final)
            os.unlink(self._temp)
            dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.abort()
            raise DestinationError("io", f"finishing {self._final}: {exc.strerror or exc}") from None
        return self._final

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass

    def interrupt(self) -> None:
        """File writes do not block on a peer; the worker notices the abort at its next read."""


_OPENERS = {
    DirectoryTarget: lambda target, listener, connection, suffix, timeouts, host: DirectorySink(
        target, listener, connection, suffix),
    TcpAddress: lambda target, listener, connection, suffix, timeouts, host: SocketSink(
        target, timeouts.connect, timeouts.idle),
    UnixAddress: lambda target, listener, connection, suffix, timeouts, host: SocketSink(
        target, timeouts.connect, timeouts.idle),
    RestoreTarget: lambda target, listener, connection, suffix, timeouts, host: RestoreSink(host, connection),
}


def open_sink(destination, *, listener: str, connection: int, suffix: str, timeouts, restore_host=None):
    """Open the configured destination for one stream (DestinationError when it cannot be).

    `restore_host`: the listener's simulated host, for a `restore:sim` destination."""
    return _OPENERS[type(destination)](destination, listener, connection, suffix, timeouts, restore_host)
