"""Restore of checkpointed (Remus) streams with failover (spec save-restore-engines 5.10, 4.7).

    restorer = CheckpointRestorer(hv, domid, store_evtchn=1, console_evtchn=2)
    for chunk in chunks:
        restorer.feed(chunk)
    outcome = restorer.finish()          # outcome.result, outcome.checkpoints, outcome.failover

Sans-IO like `PvRestorer`, which does the actual work. This layer only decides *when* the records reach
it: the records of the first checkpoint go through as they arrive; from the first CHECKPOINT on, records
are held back until the checkpoint that contains them is complete, then handed over in order. A
checkpoint is complete at its libxc CHECKPOINT record in a bare libxc stream, and at the libxl
CHECKPOINT_END after it in a libxl stream (libxl answers libxc's checkpoint callback only once it has read
its own records up to CHECKPOINT_END). When the input ends anywhere else - mid-record, mid-checkpoint,
between CHECKPOINT and CHECKPOINT_END - the partial checkpoint is dropped and the guest is completed from
the last complete one (failover); before the first complete checkpoint that is an error, since no
consistent state exists. END completes the stream normally (4.6 senders wrote it right after a
CHECKPOINT); like Xen's restorer (`xg_sr_restore.c`: END is processed, not buffered), records between
the last CHECKPOINT and END are dropped. A plain stream goes straight through, so this also restores
ordinary (live or not) streams.

The inner engine sees a bare libxc stream (headers, then records; the xl header, libxl records and
CHECKPOINT left out, later checkpoints' records handed over only at their commit). Its errors are re-raised
with the offset in the input as fed: this layer notes where in the input each run of bytes it hands over
came from. The END it makes up at a failover stands where the CHECKPOINT record that closed the last
committed checkpoint stands, so an error completing that checkpoint is reported there.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import attrs

from xenstream.hv.interface import Hypervisor
from xenstream.hv.lazylog import get_logger
from xenstream.v2 import constants as C
from xenstream.v2.errors import StreamError, TruncatedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, Header, LibxcRecord, LibxlRecord, SkippedRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.records import DomainHeader, ImageHeader
from xenstream.v2.restore import PvRestorer, RestoreResult
from xenstream.v2.writer import encode_record

log = get_logger(__name__)

_FORWARD, _HOLD, _DROP = range(3)
_END_RECORD = encode_record(C.REC_END, b"")


@attrs.frozen
class CheckpointOutcome:
    result: RestoreResult
    checkpoints: int  # complete checkpoints committed
    failover: bool  # completed from the last complete checkpoint because the stream broke off
    reason: str  # why the stream ended: "END", or the break that caused the failover


class CheckpointRestorer:
    def __init__(self, hv: Hypervisor, domid: int, *, on_commit: Callable[[int], None] | None = None,
                 **restorer_options) -> None:
        self.inner = PvRestorer(hv, domid, payload="passthrough", **restorer_options)
        self.on_commit = on_commit
        # Passthrough: this layer only needs the stream's structure, so PAGE_DATA payloads arriving in
        # later chunks are counted, not buffered (see `_payload_bytes`).
        self._reader = V2Reader(layer="auto", payload="passthrough", strict=False)
        self._raw = bytearray()
        self._raw_base = 0  # stream offset of _raw[0]
        self._cursor = 0  # bytes before this offset have been forwarded, held or dropped
        self._class = _DROP  # what happens to the bytes of the element that began at _cursor
        self._held: list[tuple[int, bytes]] = []  # (input offset, bytes) of each element held back
        # Where the engine's offsets lie in the input: (engine offset, input offset) wherever the bytes it
        # is given stop being consecutive in the input. Cut back at each commit: the engine never names a
        # record of an earlier checkpoint again.
        self._origins: list[tuple[int, int]] = []
        self._engine_end = 0  # bytes handed to the engine so far
        self._input_end = -1  # input offset just after the last of them
        self._checkpoint_at = 0  # input offset of the latest CHECKPOINT record
        self._committed_at = 0  # ... of the CHECKPOINT that closed the last committed checkpoint
        self._libxl = False
        self._awaiting_checkpoint_end = False
        self.checkpoints = 0
        self._outcome: CheckpointOutcome | None = None

    # ------------------------------------------------------------------ driving

    def feed(self, data) -> None:
        """Stream bytes; b"" = end of input. Raises StreamError only when no checkpoint can be restored
        (or a committed checkpoint is itself bad)."""
        if self._outcome is not None:
            return
        reader = self._reader
        if data and reader.payload_remaining:
            data = memoryview(data).cast("B")
            n = min(reader.payload_remaining, data.nbytes)
            self._payload_bytes(data[:n])
            reader.payload_consumed(n)
            data = data[n:]
            if not data.nbytes:
                return
        self._raw += data
        try:
            reader.feed(data)
        except TruncatedStream as exc:
            self._fail_over(exc.message, exc.offset)
            return
        while self._outcome is None:
            if reader.payload_remaining:
                if reader.buffered:  # already in _raw: the element's bytes go on from there
                    reader.take_payload()
                    continue
                if not reader.at_eof:
                    return
            try:
                event = reader.next_event()
            except TruncatedStream as exc:  # the input broke off inside an element
                self._fail_over(exc.message, exc.offset)
                return
            if event is NEED_DATA:
                return
            _EVENTS[type(event)](self, event)

    def payload_targets(self, limit: int = 1024) -> list[memoryview]:
        """When the next stream bytes are the payload of a PAGE_DATA record going straight to the engine:
        buffers in the guest's frames to read them into (then `payload_filled`), else []."""
        reader = self._reader
        if self._outcome is not None or self._class != _FORWARD or not reader.payload_remaining or reader.buffered:
            return []
        self._settle(self._raw_base + len(self._raw))  # the element's bytes so far reach the engine first
        return self.inner.payload_targets(limit)

    def payload_filled(self, n: int) -> None:
        """The driver read the next `n` stream bytes into the buffers `payload_targets` gave."""
        self._reader.payload_consumed(n)
        self._handing(self._raw_base, n)
        try:
            self.inner.payload_filled(n)
        except StreamError as exc:
            self._in_input(exc)
            raise
        self._raw_base += n
        self._cursor = self._raw_base

    def finish(self) -> CheckpointOutcome:
        if self._outcome is None:
            self.feed(b"")
        if self._outcome is None:
            self._fail_over("stream ended")
        return self._outcome

    # ------------------------------------------------------------------ bookkeeping of byte ranges

    def _payload_bytes(self, chunk: memoryview) -> None:
        """PAGE_DATA payload bytes that arrived after their record's head: forwarded ones go to the engine
        at once (after the element's bytes before them), without a copy here; others join _raw."""
        if self._class != _FORWARD:
            self._raw += chunk
            return
        self._settle(self._raw_base + len(self._raw))
        self._handing(self._raw_base, chunk.nbytes)
        try:
            self.inner.feed_payload(chunk)
        except StreamError as exc:
            self._in_input(exc)
            raise
        self._raw_base += chunk.nbytes
        self._cursor = self._raw_base

    def _settle(self, offset: int) -> None:
        """Bytes from the cursor to `offset` belong to the element that began at the cursor: dispose of them."""
        start, end = self._cursor - self._raw_base, offset - self._raw_base
        if self._class == _FORWARD and end > start:  # (an empty feed would mean end of input)
            with memoryview(self._raw)[start:end] as chunk:  # the inner reader copies what it keeps
                self._to_engine(self._cursor, chunk)
        elif self._class == _HOLD:
            self._held.append((self._cursor, bytes(self._raw[start:end])))
        del self._raw[:end]
        self._raw_base = offset
        self._cursor = offset

    def _begin(self, offset: int, kind: int) -> None:
        self._settle(offset)
        self._class = kind

    def _record_kind(self) -> int:
        return _HOLD if self.checkpoints else _FORWARD

    # ------------------------------------------------------------------ the engine's offsets in the input

    def _handing(self, offset: int, n: int) -> None:
        """The next `n` bytes the engine gets are input bytes from `offset` on."""
        if offset != self._input_end:
            self._origins.append((self._engine_end, offset))
        self._engine_end += n
        self._input_end = offset + n

    def _to_engine(self, offset: int, data) -> None:
        """Feed the engine `data`, which stands at `offset` of the input."""
        self._handing(offset, len(data))
        try:
            self.inner.feed(data)
        except StreamError as exc:
            self._in_input(exc)
            raise

    def _in_input(self, exc: StreamError) -> None:
        """Rewrite the offset of an error the engine raised (counted in the bytes it was given) as an
        offset in the input."""
        origins = self._origins
        if exc.offset is None or not origins:
            return
        i = max(bisect.bisect_right(origins, (exc.offset, float("inf"))) - 1, 0)
        engine_offset, input_offset = origins[i]
        exc.offset = input_offset + exc.offset - engine_offset

    # ------------------------------------------------------------------ events

    def _header(self, event: Header) -> None:
        libxc = isinstance(event.header, (ImageHeader, DomainHeader))
        if not libxc:
            self._libxl = True
        self._begin(event.offset, _FORWARD if libxc else _DROP)

    def _libxc_record(self, event: LibxcRecord) -> None:
        if event.type == C.REC_CHECKPOINT:
            self._begin(event.offset, _DROP)
            self._checkpoint_at = event.offset
            if self._libxl:
                self._awaiting_checkpoint_end = True
            else:
                self._commit()
        elif event.type == C.REC_END:
            self._begin(event.offset, _DROP)
            if self._held:  # as Xen's restorer: END is processed, records buffered since CHECKPOINT are not
                log.warning("records after the last CHECKPOINT dropped at END", chunks=len(self._held))
                self._held.clear()
            self._to_engine(event.offset, _END_RECORD)
            self._complete(failover=False, reason="END")
        else:
            self._begin(event.offset, self._record_kind())

    def _libxl_record(self, event: LibxlRecord) -> None:
        self._begin(event.offset, _DROP)
        if event.type == C.LIBXL_REC_CHECKPOINT_END and self._awaiting_checkpoint_end:
            self._awaiting_checkpoint_end = False
            self._commit()

    def _skipped(self, event: SkippedRecord) -> None:
        self._begin(event.offset, self._record_kind())

    def _end_of_stream(self, event: EndOfStream) -> None:
        self._settle(event.offset)
        if self._outcome is None:
            self._fail_over("stream ended inside a checkpoint" if self._raw or self._held or self._awaiting_checkpoint_end
                            else "stream ended after a checkpoint")

    # ------------------------------------------------------------------ commit, completion, failover

    def _commit(self) -> None:
        self._settle(self._cursor)
        for offset, chunk in self._held:
            self._to_engine(offset, chunk)
        self._held.clear()
        del self._origins[:-1]
        self._committed_at = self._checkpoint_at
        self.checkpoints += 1
        log.info("checkpoint committed", checkpoint=self.checkpoints)
        if self.on_commit is not None:
            self.on_commit(self.checkpoints)

    def _fail_over(self, reason: str, offset: int | None = None) -> None:
        if not self.checkpoints:
            raise TruncatedStream(f"{reason} before the first complete checkpoint",
                                  self._cursor if offset is None else offset)
        log.warning("failover to the last complete checkpoint", checkpoints=self.checkpoints, reason=reason)
        self._held.clear()
        self._raw.clear()
        self._to_engine(self._committed_at, _END_RECORD)
        self._complete(failover=True, reason=reason)

    def _complete(self, failover: bool, reason: str) -> None:
        try:
            result = self.inner.finish()
        except StreamError as exc:
            self._in_input(exc)
            raise
        self._outcome = CheckpointOutcome(result=result, checkpoints=self.checkpoints, failover=failover,
                                          reason=reason)

    def close(self) -> None:
        self.inner.close()


_EVENTS: dict[type, Callable] = {
    Header: CheckpointRestorer._header,
    LibxcRecord: CheckpointRestorer._libxc_record,
    LibxlRecord: CheckpointRestorer._libxl_record,
    SkippedRecord: CheckpointRestorer._skipped,
    EndOfStream: CheckpointRestorer._end_of_stream,
}
