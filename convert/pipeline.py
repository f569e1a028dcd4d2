"""The converter's I/O: the one place that reads the input, writes the output and touches the spool.

    result = convert_fds(fd_in, fd_out, ConvertOptions(fmt="libxl"), width=None, guest=None, xl=None)

The legacy parser runs in passthrough mode: after a page batch's head has been converted, its payload
moves from the input fd to the output fd (or to the spool journal of a provisional checkpoint) with
os.copy_file_range / os.splice / os.sendfile where the pair of fds allows, otherwise through one reused
buffer (`fdmove.FdMover`). Only the bytes the parser had already buffered pass through Python, and
reads are kept small so that this stays a sliver of each payload. Every output byte is written as soon
as it is produced: a reader of the output pipe sees the first records before the input has ended.

With ``verify=True`` the output is checked in the same pass: everything written is also fed to a v2
reader in passthrough mode driving our verifier, and payload bytes that bypassed Python are only
counted, never read back. The check covers the v2 stream up to its outermost END (what follows it in
libxc format, the v1 device-model record Xen's converter copies there, is not part of the stream).
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Callable

import attrs

from xenstream.convert.fdmove import FdMover, InputEnded, copy_range, fd_kind, read_some, write_all
from xenstream.convert.transform import ConvertOptions, Payload, Summary, Transformer
from xenstream.hv.lazylog import get_logger
from xenstream.legacy.errors import MalformedStream
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser
from xenstream.v2.errors import StreamError as V2StreamError
from xenstream.v2.writer import V2Writer

log = get_logger(__name__)

# Small reads: whatever is read past a batch head is payload that then has to go through Python.
HEAD_READ = 64 << 10
# Pipes we read or write are grown to this (the unprivileged maximum by default): one splice then moves
# up to a MiB, not 64 KiB, and the processes on either side switch 16 times less often.
PIPE_SIZE = 1 << 20
_PAGE = 4096


class OutputVerificationFailed(V2StreamError):
    """--verify found the output invalid (one line: the first finding)."""


class InlineVerifier:
    """Our v2 verifier over the bytes as they are written; external payload bytes are only counted."""

    def __init__(self, checkpointed: bool):
        # Only --verify pays for importing the reader and the rules.
        from xenstream.v2 import events as v2events
        from xenstream.v2.reader import V2Reader
        from xenstream.v2.verify import Verifier

        self._events = v2events
        self.reader = V2Reader(layer="auto", payload="passthrough", strict=True)
        self.verifier = Verifier(fmt="auto", checkpointed=checkpointed)
        self._failed = False
        self._ended = False

    def feed(self, data) -> None:
        if self._failed or self._ended:
            return  # after END: libxc format's copied device-model record is no part of the v2 stream
        view = memoryview(data).cast("B")
        if self.reader.payload_remaining and not self.reader.buffered:
            take = min(len(view), self.reader.payload_remaining)
            self.reader.payload_consumed(take)
            view = view[take:]
        if view:
            self.reader.feed(bytes(view))
        self._pump()

    def external(self, n: int) -> None:
        if self._failed:
            return
        self.reader.payload_consumed(n)
        self._pump()

    def _pump(self) -> None:
        try:
            while True:
                if self.reader.payload_remaining:
                    if self.reader.buffered and self.reader.take_payload():
                        continue
                    return
                event = self.reader.next_event()
                if event is self._events.NEED_DATA:
                    return
                self.verifier.feed_event(event)
                if isinstance(event, self._events.EndOfStream):
                    self._ended = True
                    return
        except V2StreamError as exc:
            self._failed = True
            self.verifier.stream_error(exc)

    def check_so_far(self) -> None:
        """Raise OutputVerificationFailed if what was written so far already has an error."""
        report = self.verifier.report
        if not report.ok:
            raise OutputVerificationFailed(f"output failed verification: {report.lines()[0]}")

    def finish(self):
        if not self._failed and not self._ended:
            self.reader.feed(b"")
            self._pump()
        return self.verifier.finish()


class OutputSink:
    """The output fd as V2Writer's file: plain writes, plus payload copies that bypass Python."""

    def __init__(self, fd: int, verifier: InlineVerifier | None = None, buffer: bytearray | None = None):
        self.fd = fd
        self.verifier = verifier
        self.bytes_written = 0
        self._buffer = buffer if buffer is not None else bytearray(1 << 20)

    _held: list[bytes] | None = None

    def hold(self) -> None:
        """From now on keep writes back until release(): the stream's closing records (END and what
        follows it) reach the fd only once the inline verifier has accepted the whole stream, so a
        rule only END can settle never fails after END was written. They are small and already in
        memory (no page payload follows END)."""
        self._held = []

    def release(self) -> None:
        held, self._held = self._held or [], None
        for data in held:
            write_all(self.fd, data)

    def write(self, data) -> None:
        if self._held is not None:
            self._held.append(bytes(data))
        else:
            write_all(self.fd, data)
        self.bytes_written += memoryview(data).nbytes
        if self.verifier is not None:
            self.verifier.feed(data)

    def moved_externally(self, n: int) -> None:
        self.bytes_written += n
        if self.verifier is not None:
            self.verifier.external(n)

    def copy_from_file(self, fd: int, offset: int, length: int) -> None:
        copy_range(fd, offset, self.fd, length, self._buffer)
        self.moved_externally(length)


class FileSpool:
    """Transform.Spool over two anonymous temporary files: the journal (append-only, the provisional
    checkpoint's data pages) and the state (one 4096-byte slot per pfn, sparse)."""

    def __init__(self, sink: OutputSink, directory: str | None = None):
        import tempfile  # (only checkpointed conversions spool)

        self._sink = sink
        self._journal = tempfile.TemporaryFile(dir=directory)
        self._state = tempfile.TemporaryFile(dir=directory)
        self.journal_fd = self._journal.fileno()
        self._state_fd = self._state.fileno()

    def journal_append(self, data) -> None:
        write_all(self.journal_fd, data)

    def journal_reset(self) -> None:
        os.ftruncate(self.journal_fd, 0)
        os.lseek(self.journal_fd, 0, os.SEEK_SET)

    def store_from_journal(self, pfn: int, journal_offset: int) -> None:
        try:
            done = os.copy_file_range(self.journal_fd, self._state_fd, _PAGE, journal_offset, pfn * _PAGE)
        except OSError:
            done = 0
        if done != _PAGE:
            page = os.pread(self.journal_fd, _PAGE, journal_offset)
            os.pwrite(self._state_fd, page, pfn * _PAGE)

    def send_journal(self, offset: int, length: int) -> None:
        self._sink.copy_from_file(self.journal_fd, offset, length)

    def send_state(self, pfns: list[int]) -> None:
        """The spooled pages of `pfns` (ascending), consecutive pfns in one copy."""
        start = 0
        while start < len(pfns):
            end = start + 1
            while end < len(pfns) and pfns[end] == pfns[end - 1] + 1:
                end += 1
            self._sink.copy_from_file(self._state_fd, pfns[start] * _PAGE, (end - start) * _PAGE)
            start = end

    def close(self) -> None:
        self._journal.close()
        self._state.close()


@attrs.frozen
class ConvertResult:
    summary: Summary
    bytes_in: int
    bytes_out: int
    seconds: float
    moved_by: dict
    report: object | None  # xenstream.v2.verify_report.Report with verify=True


def convert_fds(fd_in: int, fd_out: int, options: ConvertOptions = ConvertOptions(), *,
                width: int | None = None, guest: str | None = None, xl: bool | None = None,
                verify: bool = False, spool_dir: str | None = None,
                progress: Callable[[int], None] | None = None) -> ConvertResult:
    """Convert the v1 stream read from fd_in into a v2 stream written to fd_out.

    Raises the legacy StreamError family on bad input (output then has no END), and
    OutputVerificationFailed when ``verify`` finds the output invalid; either way the output then has no
    END (with ``verify`` the closing records are held until the verifier has passed them). ``progress`` is
    called with the input bytes consumed so far, about once per page batch.
    """
    started = time.monotonic()
    for fd in (fd_in, fd_out):
        _grow_pipe(fd)
    # libxc format with skip_qemu reads no device-model record, as Xen's --skip-qemu: a bare libxc HVM
    # stream has none. (libxl format, and auto which is libxl for HVM, carries the record: required.)
    parser = LegacyParser(width=width, guest=guest, xl=xl, passthrough=True,
                          device_model_optional=options.skip_qemu and options.fmt == "libxc")
    checker = InlineVerifier(checkpointed=options.checkpoints) if verify else None
    buffer = bytearray(1 << 20)
    sink = OutputSink(fd_out, checker, buffer)
    writer = V2Writer(sink)
    spools: list[FileSpool] = []

    def make_spool() -> FileSpool:
        spools.append(FileSpool(sink, spool_dir or _spool_directory(fd_out)))
        return spools[0]

    def before_end() -> None:
        checker.check_so_far()
        sink.hold()

    transformer = Transformer(writer, options, spool_factory=make_spool,
                              before_end=before_end if checker is not None else None)
    to_output = FdMover(fd_in, fd_out, buffer=buffer)
    to_journal: FdMover | None = None
    try:
        while not transformer.finished:
            event = parser.next_event()
            if event is NEED_DATA:
                parser.feed(read_some(fd_in, HEAD_READ))
                continue
            if event is DONE:
                break
            destination = transformer.handle(event)
            if destination is Payload.NOWHERE:
                continue
            if destination is Payload.OUTPUT:
                _move_payload(parser, writer.write, to_output, sink.moved_externally, writer.payload_written)
            else:
                spool = transformer.spool
                if to_journal is None:
                    to_journal = FdMover(fd_in, spool.journal_fd, buffer=buffer)
                _move_payload(parser, spool.journal_append, to_journal, None, None)
            if progress is not None:
                progress(parser.offset)
        if not transformer.finished:
            raise MalformedStream("the stream ended without completing a checkpoint", parser.offset)
        report = checker.finish() if checker is not None else None
        if report is not None and not report.ok:
            raise OutputVerificationFailed(f"output failed verification: {report.lines()[0]}")
        sink.release()
    finally:
        for spool in spools:
            spool.close()
    moved = dict(to_output.bytes_by_method)
    if to_journal is not None:
        for method, count in to_journal.bytes_by_method.items():
            moved[f"spool-{method}"] = moved.get(f"spool-{method}", 0) + count
    return ConvertResult(summary=transformer.summary(), bytes_in=parser.offset, bytes_out=sink.bytes_written,
                         seconds=time.monotonic() - started, moved_by=moved, report=report)


def _move_payload(parser: LegacyParser, deliver, mover: FdMover, moved_externally, payload_written) -> None:
    """The pending payload of the last PageBatch: buffered part through `deliver`, the rest fd to fd."""
    while parser.payload_pending:
        piece = parser.take_payload()
        if not piece:
            break
        deliver(piece)
    rest = parser.payload_pending
    if not rest:
        return
    try:
        mover.move(rest)
        moved = rest
    except InputEnded as ended:
        moved = ended.moved
    parser.consumed_externally(moved)
    if moved_externally is not None:
        moved_externally(moved)
    if payload_written is not None:
        payload_written(moved)
    if moved < rest:
        parser.feed(b"")  # the parser reports the truncation (or the dropped partial checkpoint)


def _grow_pipe(fd: int) -> None:
    if fd_kind(fd) != "pipe":
        return
    try:
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over the system's limit or its pipe-user quota: keep the size it has


def _spool_directory(fd_out: int) -> str | None:
    """Spool beside the output when it is a file (same filesystem: fast copies), else TMPDIR."""
    if fd_kind(fd_out) != "file":
        return None
    try:
        return os.path.dirname(os.readlink(f"/proc/self/fd/{fd_out}")) or None
    except OSError:
        return None
