"""Page payloads of a regular file read into guest memory by worker threads, while the restorer parses on.

One thread copying 1 GiB from the page cache into guest memory is bound by its own copy loop and TLB
walks, not by memory bandwidth; two threads on two cores each copying their own payloads finish in
about 60% of the time. This is the I/O-driver side of the restore engines (their record logic stays
single-threaded and sans-IO): for a regular-file input the engine reads record heads with `pread` at a
position it keeps, and hands each PAGE_DATA payload (a list of guest-memory buffers and the file offset
it starts at) to `submit`. Workers fill the buffers with `preadv`, in no particular order between
payloads, so the engine calls `wait` before anything that reads or rewrites guest memory outside a
payload (pagetables to localise, END processing), `wait_for` before its own thread copies payload bytes
that came with a record head (a pfn sent twice keeps its later copy), and before it reports end of input
(so that a payload cut short by the end of the file is the error reported, with its record's offset).

Pipes and sockets never come here: they are read in order as before.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import deque

from xenstream.v2 import constants as C
from xenstream.v2.errors import TruncatedStream
from xenstream.v2.events import LibxcRecord

HEAD_READ = 16 << 10  # a whole PAGE_DATA head of 1024 pfns with little payload (a pread costs no extra read)
SEQUENTIAL_HEAD_READ = 64 << 10  # in-order reads: what is read past a record head goes through Python
WORKERS = 2
MAX_QUEUED = 8  # payloads submitted and not yet taken by a worker: bounds how far parsing runs ahead


def run_fd(restorer, fd: int, initial: bytes = b"") -> None:
    """Feed `restorer` (PvRestorer or HvmRestorer in passthrough mode) the whole stream of `fd`, after
    `initial` (bytes already read from it): by position with worker threads for a regular file, else in
    order, each pending payload read by the restorer's `_receive_payload(fd)` straight into its targets."""
    reader = restorer._reader
    if initial:
        reader.feed(initial)
    if usable(fd):
        run_positional(fd, restorer)
        return
    while not restorer._drain():
        if reader.payload_remaining:
            restorer._receive_payload(fd)
        else:
            reader.feed(os.read(fd, SEQUENTIAL_HEAD_READ))


def run_positional(fd: int, restorer) -> None:
    """Drive `restorer` (PvRestorer or HvmRestorer in passthrough mode) over the regular file `fd` until its
    stream ends: record heads read with pread from a position kept here, each pending payload handed to
    the restorer's `_submit_payload(fill, position)` (which returns its length in the file). After a
    complete stream the fd's offset is just past the last bytes read, somewhere after END, as after
    sequential reads (whose read-ahead differs); after a failure it is not moved. The restorer's
    `_positional` is the fill meanwhile, so that it can wait for the workers before touching guest
    memory itself."""
    reader = restorer._reader
    position = os.lseek(fd, 0, os.SEEK_CUR)
    fill = restorer._positional = PositionalFill(fd)
    try:
        while not restorer._drain():
            if reader.payload_remaining:
                position += restorer._submit_payload(fill, position)
                continue
            data = os.pread(fd, HEAD_READ, position)
            if not data:
                fill.wait()  # a payload cut short by the end of the file is the error to report
            position += len(data)
            reader.feed(data)
        fill.wait()
    finally:
        restorer._positional = None
        fill.close()
    os.lseek(fd, position, os.SEEK_SET)


def is_page_data(event) -> bool:
    """Whether the restorer may handle `event` while workers fill earlier payloads (only a PAGE_DATA head)."""
    return type(event) is LibxcRecord and event.type == C.REC_PAGE_DATA


def usable(fd: int) -> bool:
    """Whether payloads of `fd` can be read by position (a regular file with a current offset)."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return False
    return True


class PositionalFill:
    """Worker threads reading payloads of `fd` by position into caller buffers (see the module docstring)."""

    def __init__(self, fd: int, workers: int = WORKERS) -> None:
        self.fd = fd
        self._jobs: deque = deque()
        self._changed = threading.Condition()
        self._serial = 0
        self._spans: dict[int, tuple[int, int]] = {}  # pfn bounds of the payloads queued or being read
        self._failure: tuple[int, int] | None = None  # (record offset, bytes missing) of the earliest short payload
        self._error: BaseException | None = None  # a read that failed outright (EIO, ...)
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"xenstream-fill-{n}", daemon=True)
                         for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, buffers: list[memoryview], offset: int, record_offset: int, pfns: tuple[int, int]) -> None:
        """Fill `buffers`, in order, from the file bytes at `offset` on. `record_offset` names the record in
        a truncation error; `pfns` (lowest, highest) bounds the pages the buffers belong to: a payload whose
        pages may overlap one still being read waits for it, so that the later copy of a page wins."""
        if not buffers:
            return
        with self._changed:
            while not self._stopping and (len(self._jobs) >= MAX_QUEUED or self._overlaps(pfns)):
                self._changed.wait()
            self._serial += 1
            self._spans[self._serial] = pfns
            self._jobs.append((self._serial, buffers, offset, record_offset))
            self._changed.notify_all()

    def wait_for(self, pfns: tuple[int, int]) -> None:
        """Return once no payload queued or being read may touch the pages `pfns` (lowest, highest) bounds:
        before the engine's own thread writes them (payload bytes that came with a record head), so that
        an earlier copy still with a worker cannot land on top of the later one."""
        with self._changed:
            while not self._stopping and self._overlaps(pfns):
                self._changed.wait()

    def _overlaps(self, pfns: tuple[int, int]) -> bool:
        low, high = pfns
        return any(low <= other_high and other_low <= high for other_low, other_high in self._spans.values())

    def wait(self) -> None:
        """Return once every submitted payload is in place; raise TruncatedStream if one ended early."""
        with self._changed:
            while self._spans:  # (a payload keeps its span until it is read)
                self._changed.wait()
            failure, error = self._failure, self._error
        if error is not None:
            raise error
        if failure is not None:
            record_offset, missing = failure
            raise TruncatedStream(f"truncated PAGE_DATA payload: {missing} bytes missing", record_offset)

    def close(self) -> None:
        """Stop the workers once the payloads they hold are done (queued ones are dropped); idempotent.
        After this no thread writes into guest memory, so the domain can go."""
        with self._changed:
            self._stopping = True
            self._jobs.clear()
            self._spans.clear()
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                serial, buffers, offset, record_offset = self._jobs.popleft()
                self._changed.notify_all()
            missing, error = 0, None
            try:
                missing = _read_into(self.fd, buffers, offset)
            except BaseException as exc:  # handed to the engine's thread by wait()
                error = exc
            del buffers  # no view of guest memory outlives the job
            with self._changed:
                self._spans.pop(serial, None)
                if error is not None and self._error is None:
                    self._error = error
                if missing and (self._failure is None or record_offset < self._failure[0]):
                    self._failure = (record_offset, missing)
                self._changed.notify_all()


def _read_into(fd: int, buffers: list[memoryview], offset: int) -> int:
    """preadv `buffers` from `offset`; the number of bytes the file did not have (0 when all were read)."""
    index, within = 0, 0
    while index < len(buffers):
        vector = [buffers[index][within:], *buffers[index + 1:index + C.IOV_MAX]]
        n = os.preadv(fd, vector, offset)
        if not n:
            return sum(len(v) for v in vector) + sum(len(b) for b in buffers[index + C.IOV_MAX:])
        offset += n
        index, within = advance_cursor(buffers, index, within, n)
    return 0


def advance_cursor(buffers, index: int, within: int, n: int) -> tuple[int, int]:
    """The position (buffer index, offset within it) `n` bytes past (index, within) in consecutive `buffers`."""
    within += n
    while index < len(buffers) and within >= len(buffers[index]):
        within -= len(buffers[index])
        index += 1
    return index, within
