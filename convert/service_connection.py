"""One migration stream through `xenstream serve`: read the source, convert, write the destination.

Runs in its own thread with blocking sockets, which is what gives backpressure end to end: while a
write to the destination blocks, nothing is read from the source, its socket buffer fills and TCP
stops the sender. Memory per stream is one read buffer plus what the conversion may hold (bounded).

Failure semantics: any failure ends the stream with `sink.abort()`, so the destination never receives
the final END of a stream that did not arrive complete and valid; the source is always closed. A
failure is confined to its own connection and logged once, with the stream offset when it is a bad
stream. A v1 Remus stream whose source breaks off (end of input, reset, timeout) inside a checkpoint
first gets the records that close its last complete checkpoint, if they were still held, so that the
receiver can fail over to it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import traceback

import structlog

from xenstream.convert.edge import STREAM_ERRORS
from xenstream.convert.service_sink import DestinationError, open_sink, set_kernel_timeout
from xenstream.convert.service_stream import BrokenOffCheckpoint, classify


F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
PIPE_SIZE = 1 << 20


class Pipe:
    """The kernel buffer that splice moves payloads through, enlarged to cut the number of calls."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.write_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above the system's pipe-max-size or the user's pipe quota: keep the default
            pass
        self.capacity = fcntl.fcntl(self.write_fd, F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


def _splice_moving(source_fd: int, pipe_fd: int, count: int) -> int:
    return os.splice(source_fd, pipe_fd, count, flags=os.SPLICE_F_MOVE)


class SourceError(Exception):
    """The source misbehaved at the transport level; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _closing_of_broken_checkpoint(conversion) -> list:
    """The source failed: the records a Remus receiver still needs to keep its last complete checkpoint
    (those held until the next checkpoint began), or nothing. Never END."""
    try:
        conversion.finish()
    except BrokenOffCheckpoint as exc:
        return exc.output
    except STREAM_ERRORS:
        pass
    return []


class Aborted(Exception):
    """The service is shutting down and the grace period is over."""


class Empty(Exception):
    """The source closed without sending a byte (a port probe, a health check)."""


class SourceReader:
    """Reads from the source with an idle timeout, an optional deadline, and a minimum-rate guard.

    The rate guard only counts time spent waiting for the source: a source slowed down by a slow
    destination (backpressure) is never punished, a source trickling bytes (slow-loris) is.
    """

    def __init__(self, sock: socket.socket, timeouts):
        self._sock = sock
        self._timeouts = timeouts
        self._timeout = None
        self._window_wait = 0.0
        self._window_bytes = 0
        sock.settimeout(None)

    def read_into(self, view: memoryview, deadline: float | None = None, what: str = "data") -> int:
        return self._read(self._sock.recv_into, view, deadline=deadline, what=what)

    def splice_into(self, pipe_fd: int, count: int) -> int:
        """Move up to `count` bytes from the source into a pipe, in the kernel (0 at end of input)."""
        return self._read(_splice_moving, self._sock.fileno(), pipe_fd, count)

    def _read(self, call, *args, deadline: float | None = None, what: str = "data") -> int:
        timeout = self._timeouts.idle
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout < 0.001:
                raise SourceError("timeout", f"no complete {what} within {self._timeouts.header:g}s")
        if timeout != self._timeout:
            set_kernel_timeout(self._sock, socket.SO_RCVTIMEO, timeout)
            self._timeout = timeout
        started = time.monotonic()
        try:
            got = call(*args)
        except (BlockingIOError, TimeoutError):
            raise SourceError("timeout", f"source sent no {what} for {timeout:.3g}s") from None
        except OSError as exc:
            raise SourceError("reset", f"reading the source: {exc.strerror or exc}") from None
        self._window_wait += time.monotonic() - started
        self._window_bytes += got
        if self._window_wait >= self._timeouts.rate_window:
            rate = self._window_bytes / self._window_wait
            if rate < self._timeouts.min_rate:
                raise SourceError("slow", f"source sends {rate:.0f} bytes/s, below the {self._timeouts.min_rate:g} minimum")
            self._window_wait, self._window_bytes = 0.0, 0
        return got


class Connection:
    def __init__(self, *, ident: int, listener, sock: socket.socket, peer: str, config, metrics, conversions,
                 restore_host=None):
        self.ident = ident
        self.listener = listener
        self._sock = sock
        self.peer = peer
        self._config = config
        self._metrics = metrics
        self._conversions = conversions  # classify result -> factory(listener, config) -> StreamConversion
        self._restore_host = restore_host
        self._sink = None
        self._pipe: Pipe | None = None
        self.conversion = None
        self.destination: str | None = None
        self._aborted = threading.Event()
        self._sink_lock = threading.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        self._log = structlog.get_logger("xenstream.serve").bind(conn=ident, listener=listener.name, peer=peer)

    # ---- control from the service thread ----------------------------------------------------------

    def abort(self) -> None:
        """Shutdown deadline: make the worker fail at its next (or current) blocking call."""
        self._aborted.set()
        for action in (lambda: self._sock.shutdown(socket.SHUT_RDWR), self._interrupt_sink):
            try:
                action()
            except OSError:
                pass

    def _interrupt_sink(self) -> None:
        with self._sink_lock:
            if self._sink is not None:
                self._sink.interrupt()

    # ---- the worker ---------------------------------------------------------------------------------

    def run(self) -> None:
        started = time.monotonic()
        fields: dict = {}
        result = "ok"
        try:
            self._pump(started)
        except STREAM_ERRORS as exc:
            result = "bad_stream"
            fields = {"error": exc.message, "offset": exc.offset}
        except SourceError as exc:
            result = f"source_{exc.reason}"
            fields = {"error": str(exc)}
        except DestinationError as exc:
            result = f"destination_{exc.reason}"
            fields = {"error": str(exc)}
        except Aborted:
            result = "aborted"
        except Empty:
            result = "empty"
        except Exception as exc:  # our bug: confined to this stream, reported in full
            result = "internal_error"
            fields = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        finally:
            if result != "ok":
                self._abort_sink()
            self._sock.close()
            if self._pipe is not None:
                self._pipe.close()
        if self._aborted.is_set() and result != "ok":
            result = "aborted"
        self._report(result, fields, self.conversion, time.monotonic() - started)

    def _pump(self, started: float):
        timeouts = self._config.timeouts
        source = SourceReader(self._sock, timeouts)
        buffer = memoryview(bytearray(self._config.buffer_size))

        head = bytearray()
        deadline = started + timeouts.header
        kind = None
        while kind is None:
            got = source.read_into(buffer, deadline, "stream header")
            self._count_in(got)
            head += buffer[:got]
            if not got and not head:
                raise Empty()
            kind = classify(head, at_eof=not got)
        conversion = self.conversion = self._conversions[kind](self.listener, self._config)
        self._log.debug("detected", kind=kind)
        self._write(conversion, conversion.feed(memoryview(head)))
        del head

        try:
            while got:
                self._check_aborted()
                direct = conversion.direct_payload
                if direct and self._sink is not None and self._sink.SPLICES:
                    got = self._splice(source, conversion, direct)
                    continue
                got = source.read_into(buffer)
                if not got:
                    break
                self._count_in(got)
                self._write(conversion, conversion.feed(buffer[:got]))
        except SourceError:
            self._write(conversion, _closing_of_broken_checkpoint(conversion))
            raise
        try:
            rest = conversion.finish()
        except BrokenOffCheckpoint as exc:  # the receiver keeps the last complete checkpoint: it gets it all
            self._write(conversion, exc.output)
            raise
        self._write(conversion, rest)
        self._check_aborted()
        self._open_sink(conversion)
        self.destination = self._sink.commit()

    def _splice(self, source: SourceReader, conversion, direct: int) -> int:
        """Page payload the conversion need not see: source -> pipe -> destination, never in user space."""
        if self._pipe is None:
            self._pipe = Pipe()
        got = source.splice_into(self._pipe.write_fd, min(direct, self._pipe.capacity))
        if got:
            self._count_in(got)
            self._sink.splice_from(self._pipe.read_fd, got)
            self._count_out(got)
            self._write(conversion, conversion.payload_moved(got))
        return got

    def _check_aborted(self) -> None:
        if self._aborted.is_set():
            raise Aborted()

    def _count_in(self, got: int) -> None:
        self.bytes_in += got
        self._metrics.add("xenstream_bytes_in_total", got, listener=self.listener.name)

    def _open_sink(self, conversion) -> None:
        if self._sink is None:
            sink = open_sink(self.listener.destination, listener=self.listener.name, connection=self.ident,
                             suffix=conversion.suffix, timeouts=self._config.timeouts,
                             restore_host=self._restore_host)
            with self._sink_lock:
                self._sink = sink
            if self._aborted.is_set():
                sink.interrupt()

    def _write(self, conversion, buffers: list) -> None:
        size = sum(len(b) for b in buffers)
        if not size:
            return
        self._check_aborted()
        self._open_sink(conversion)
        self._sink.write(buffers)
        self._count_out(size)

    def _count_out(self, size: int) -> None:
        self.bytes_out += size
        self._metrics.add("xenstream_bytes_out_total", size, listener=self.listener.name)

    def _abort_sink(self) -> None:
        with self._sink_lock:
            sink, self._sink = self._sink, None
        if sink is not None:
            try:
                sink.abort()
            except OSError as exc:
                self._log.warning("closing the destination failed", error=str(exc))

    def _report(self, result: str, fields: dict, conversion, seconds: float) -> None:
        name = self.listener.name
        variant = conversion.variant if conversion is not None else "unknown"
        pages = conversion.pages if conversion is not None else 0
        metrics = self._metrics
        metrics.add("xenstream_pages_total", pages, listener=name)
        metrics.add("xenstream_streams_total", variant=variant, result=result)
        metrics.observe_duration(seconds, listener=name)
        if result not in ("ok", "empty"):
            metrics.add("xenstream_connections_failed_total", listener=name, reason=result)
        summary = dict(variant=variant, bytes_in=self.bytes_in, bytes_out=self.bytes_out, pages=pages,
                       duration=round(seconds, 6), result=result)
        if result == "ok":
            self._log.info("stream done", destination=self.destination, **summary)
        elif result == "empty":
            self._log.info("closed without data", **summary)
        elif result == "internal_error":
            self._log.error("stream failed", **summary, **fields)
        else:
            self._log.warning("stream failed", **summary, **fields)
