"""The conversion core of `xenstream serve`: bytes of one stream in, bytes for the destination out.

Every stream gets a `StreamConversion`, chosen from its first bytes by `classify` (spec legacy 10.1,
v2 2.3/4.1): a v1 stream is converted to v2 as it arrives, a v2 stream is passed through unchanged while
the strict reader and verifier follow it. Both obey one contract:

* ``feed(data) -> list of buffers``: the output that may leave now. The buffers may be views of `data`
  or of internal state and are valid until the next call; the caller writes them before feeding again.
* ``finish() -> list of buffers``: at end of input. Returns the rest, including the final END, only when
  the whole input was a complete valid stream; otherwise raises a StreamError (legacy or v2 family)
  with the offset, and the destination has never been given an END that would make it look complete.
* ``direct_payload``: how many of the next input bytes are page payload that goes to the output
  unchanged and unseen (0 when none). The caller may move up to that many bytes from its source to its
  destination itself (e.g. with splice, never entering user space) and report them with
  ``payload_moved(n) -> list of buffers`` instead of feeding them.
* ``pages``: guest pages carried so far; ``variant``: what was detected, for logs and metrics;
  ``suffix``: a file name suffix for the output's layer.

Memory is bounded per stream: nothing holds more than `max_buffered` bytes of input that have not been
passed on (a record too large for that is refused), and page payloads are never accumulated.

A v1 Remus (checkpointed) stream goes to a Remus secondary, so with `remus = "checkpoints"` (the
default) it becomes a v2 checkpointed stream (CHECKPOINT, libxl CHECKPOINT_END) exactly as
`xenstream convert --checkpoints` writes it, without spooling: each later checkpoint's PAGE_DATA
records leave as soon as their pages have arrived. A source that breaks off inside a checkpoint gets
no END: the destination is closed after the last complete checkpoint's records (and what came of the
broken one, which a checkpoint-aware receiver drops), so the receiver fails over to that checkpoint.
`remus = "refuse"` refuses a stream at the start of its checkpoint 2.
"""

from __future__ import annotations

import struct
from typing import Protocol

from xenstream.convert.transform import ConvertOptions, Payload, Transformer
from xenstream.legacy.errors import MalformedStream as LegacyMalformed
from xenstream.legacy.errors import TruncatedStream as LegacyTruncated
from xenstream.legacy.errors import UnsupportedStream as LegacyUnsupported
from xenstream.legacy.events import CheckpointEnd, Detected, DeviceModelData, PageBatch, PageData
from xenstream.legacy.parser import DONE, LegacyParser
from xenstream.legacy.parser import NEED_DATA as LEGACY_NEED_DATA
from xenstream.v2 import constants as V2
from xenstream.v2.errors import MalformedStream as V2Malformed
from xenstream.v2.events import NEED_DATA, EndOfStream, Header, LibxcRecord, LibxlRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.verify import Verifier
from xenstream.v2.writer import V2Writer

CLASSIFY_PEEK = len(V2.XL_MAGIC) + 8  # xl magic, byte order, mandatory flags
_V2_PREFIXES = (struct.pack(">Q", V2.LIBXL_IDENT), struct.pack(">Q", V2.IMAGE_MARKER))
_XL_BYTE_ORDERS = {b"\x04\x03\x02\x01": "<", b"\x01\x02\x03\x04": ">"}
REMUS_MODES = ("checkpoints", "refuse")


class BrokenOffCheckpoint(LegacyTruncated):
    """The source of a Remus stream broke off inside a checkpoint. `output`: what the destination must
    still get (the closing records of the last complete checkpoint, if not sent yet) before it is closed
    without END."""

    def __init__(self, message: str, offset: int, output: list):
        super().__init__(message, offset)
        self.output = output


class StreamConversion(Protocol):
    variant: str
    suffix: str
    pages: int
    direct_payload: int

    def feed(self, data: memoryview) -> list: ...

    def payload_moved(self, count: int) -> list: ...

    def finish(self) -> list: ...


def classify(head: bytes, at_eof: bool) -> str | None:
    """"v1" or "v2" from the first bytes, or None while more are needed (never more than CLASSIFY_PEEK).

    v2 is recognised by its exact signatures (an xl header with the STREAMv2 flag, "LibxlFmt", or eight
    0xff bytes); everything else goes to the legacy parser, which knows every v1 wrapper and refuses what
    is neither.
    """
    xl_magic = V2.XL_MAGIC
    if head[: len(xl_magic)] == xl_magic[: len(head)]:
        if len(head) < CLASSIFY_PEEK:
            return "v1" if at_eof else None
        order = _XL_BYTE_ORDERS.get(bytes(head[32:36]))
        if order is None:
            return "v1"  # a broken xl header: the legacy parser names the fault
        (flags,) = struct.unpack_from(order + "I", head, 36)
        return "v2" if flags & V2.XL_FLAG_STREAMV2 else "v1"
    for prefix in _V2_PREFIXES:
        if head[:8] == prefix[: len(head)]:
            if len(head) >= 8:
                return "v2"
            return "v1" if at_eof else None
    return "v1"


class V2Passthrough:
    """A v2 stream leaves exactly as it came, each byte only once the verifier has accepted it.

    Page payloads go out as soon as their PAGE_DATA header has been checked, straight from the caller's
    buffer when the reader holds nothing else. The outermost END is held back until `finish` has seen
    the end of input with nothing after it and the verifier has no objection.
    """

    READER_STEP = 64 << 10  # the reader is fed little at a time so that payloads mostly bypass it

    def __init__(self, max_buffered: int):
        self._reader = V2Reader(layer="auto", payload="passthrough", strict=True)
        self._verifier = Verifier(fmt="auto")
        self._max_buffered = max_buffered
        self._held = bytearray()  # input bytes [forwarded, forwarded + len(held)) not yet given out
        self._forwarded = 0
        self._end_at: int | None = None  # offset of a trailing END record not yet known to be inner
        self._ended = False
        self.pages = 0
        self.variant = "v2"
        self.suffix = "v2"

    def feed(self, data) -> list:
        data = memoryview(data).cast("B")
        out: list = []
        reader = self._reader
        while data:
            if self._ended:
                raise V2Malformed(f"{len(data)} bytes after the end of the stream", reader.offset)
            if self.direct_payload:
                step = min(len(data), reader.payload_remaining)
                out.append(data[:step])
                reader.payload_consumed(step)
                self._forwarded += step
            else:
                step = min(len(data), self.READER_STEP)
                reader.feed(data[:step])
                self._drain()
                if self._ended and reader.trailing_bytes:
                    raise V2Malformed(f"{reader.trailing_bytes} bytes after the end of the stream", reader.offset)
                self._release(data[:step], out)
            data = data[step:]
        return out

    @property
    def direct_payload(self) -> int:
        reader = self._reader
        if reader.buffered or self._held:
            return 0
        return reader.payload_remaining

    def payload_moved(self, count: int) -> list:
        self._reader.payload_consumed(count)
        self._forwarded += count
        return []

    def finish(self) -> list:
        self._reader.feed(b"")
        self._drain()
        if not self._ended:
            raise V2Malformed("input ended before the end of the stream", self._reader.offset)
        report = self._verifier.finish(self._reader.trailing_bytes, self._reader.offset)
        self._raise_first_error()
        if not report.ok:
            raise V2Malformed("stream rejected by the verifier", self._reader.offset)
        self._end_at = None
        out: list = []
        self._release(memoryview(b""), out)
        return out

    def _drain(self) -> None:
        reader, verifier = self._reader, self._verifier
        while not self._ended:
            if reader.payload_remaining:
                if not reader.buffered:
                    return
                reader.take_payload()
                continue
            event = reader.next_event()
            if event is NEED_DATA:
                if reader.buffered > self._max_buffered:
                    raise V2Malformed(
                        f"a record larger than the service's {self._max_buffered} byte buffering limit", reader.offset)
                return
            verifier.feed_event(event)
            self._raise_first_error()
            self._NOTE[type(event)](self, event)

    def _raise_first_error(self) -> None:
        errors = self._verifier.report.errors
        if errors:
            raise V2Malformed(errors[0].message, errors[0].offset)

    def _note_header(self, event: Header) -> None:
        self._end_at = None
        if self.variant == "v2":
            layer = self._verifier.report.format
            self.variant, self.suffix = f"v2-{layer}", layer

    def _note_record(self, event) -> None:
        self._end_at = event.offset if event.type == V2.REC_END else None
        if isinstance(event, LibxcRecord) and event.type == V2.REC_PAGE_DATA:
            self.pages += event.body.page_count

    def _note_end(self, event: EndOfStream) -> None:
        self._ended = True

    _NOTE = {
        Header: _note_header,
        LibxcRecord: _note_record,
        LibxlRecord: _note_record,
        EndOfStream: _note_end,
    }

    def _release(self, data: memoryview, out: list) -> None:
        """Give out the input up to what is verified (minus a held-back END); keep the rest."""
        safe = self._reader.offset if self._end_at is None else self._end_at
        count = safe - self._forwarded
        held = self._held
        from_held = min(count, len(held))
        if from_held:
            out.append(bytes(held[:from_held]))
            del held[:from_held]
        from_data = count - from_held
        if from_data:
            out.append(data[:from_data])
        held += data[from_data:]
        self._forwarded = safe
        if len(held) > self._max_buffered + V2.RECORD_HEADER_SIZE:
            raise V2Malformed(f"more than {self._max_buffered} bytes pending verification", self._forwarded)


class _Outbox:
    """V2Writer's file: collects what the writer produces, to be handed out by the conversion."""

    def __init__(self) -> None:
        self.buffers: list = []

    def write(self, buffer) -> None:
        self.buffers.append(buffer)

    def take(self) -> list:
        buffers, self.buffers = self.buffers, []
        return buffers


class _StreamingJournal:
    """The transformer's spool under streaming_remus: the pages of a later checkpoint's PAGE_DATA record
    still being filled. Once the record is written they go to the output and are forgotten, so at most
    one record's and one v1 batch's pages are held."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox
        self._pages = bytearray()
        self._base = 0  # journal offset of _pages[0]

    @property
    def appended(self) -> int:
        return self._base + len(self._pages)

    def journal_append(self, data) -> None:
        self._pages += data

    def journal_reset(self) -> None:
        self._pages = bytearray()
        self._base = 0

    def send_journal(self, offset: int, length: int) -> None:
        end = offset + length - self._base
        self._outbox.write(bytes(self._pages[offset - self._base : end]))
        del self._pages[:end]
        self._base = offset + length


class LegacyUpgrade:
    """A v1 stream converted to v2 as it arrives: the sans-IO LegacyParser (passthrough payloads) and
    the Transformer. The parser is fed in small steps so that it never buffers much of a page payload:
    payload bytes go from the caller's buffer to the output without a copy.

    END and what the transformer writes after it are held back until `finish` has seen the end of input.
    `remus`: "checkpoints" or "refuse", what becomes of a Remus stream (see the module's description).
    """

    PARSER_STEP = 64 << 10
    TRAILING_LIMIT = 64 << 10  # after the v1 stream: an xl "go" message is a few bytes
    # Elements other than page batches, per stream. A real stream has a few per vcpu and a few dozen
    # more; the transformer keeps some of them until the end, so their number bounds its memory.
    ELEMENT_LIMIT = 1 << 16

    def __init__(self, fmt: str, width: int | None, guest: str | None, max_buffered: int,
                 remus: str = "checkpoints"):
        self._parser = LegacyParser(width=width, guest=guest, passthrough=True)
        self._outbox = _Outbox()
        self._writer = V2Writer(self._outbox)
        self._streaming_remus = remus == "checkpoints"
        self._transformer = Transformer(
            self._writer, ConvertOptions(fmt=fmt, streaming_remus=self._streaming_remus),
            spool_factory=(lambda: _StreamingJournal(self._outbox)) if self._streaming_remus else self._no_spool,
            before_end=self._note_end_record)
        self._end_record_at: int | None = None  # index in the outbox's buffers where END begins
        self._route = Payload.NOWHERE
        self._max_buffered = max_buffered
        self._fed = 0  # stream offset just past the last byte given to the parser or moved around it
        self._end: int | None = None  # where the input was when the stream was complete
        self._held: list = []
        self._done = False
        self._input_ended = False
        self._elements = 0
        self._device_model_bytes = 0  # qemu state the transformer holds until the end
        self.variant = "v1"
        self.suffix = fmt

    @property
    def pages(self) -> int:
        return self._transformer.summary().pages

    def feed(self, data) -> list:
        data = memoryview(data).cast("B")
        parser = self._parser
        while data:
            if self.direct_payload:
                step = min(len(data), parser.payload_pending)
                self._writer.write(data[:step])
                parser.consumed_externally(step)
            else:
                step = min(len(data), self.PARSER_STEP)
                parser.feed(data[:step])
            self._fed += step
            data = data[step:]
            self._drain()
        if self._fed - parser.offset > self._max_buffered:
            raise LegacyMalformed(f"an element larger than the service's {self._max_buffered} byte buffering limit",
                                  parser.offset)
        if self._end is not None and self._fed - self._end > self.TRAILING_LIMIT:
            raise LegacyMalformed(f"more than {self.TRAILING_LIMIT} bytes after the end of the stream", self._end)
        return self._outbox.take()

    @property
    def direct_payload(self) -> int:
        parser = self._parser
        if self._route is not Payload.OUTPUT or self._fed != parser.offset:
            return 0
        return parser.payload_pending

    def payload_moved(self, count: int) -> list:
        self._parser.consumed_externally(count)
        self._writer.payload_written(count)
        self._fed += count
        self._drain()
        return self._outbox.take()

    def finish(self) -> list:
        self._parser.feed(b"")
        self._input_ended = True
        self._drain()
        transformer = self._transformer
        if not transformer.finished:
            raise LegacyMalformed("the stream ended without completing a checkpoint", self._parser.offset)
        summary = transformer.summary()
        if self._streaming_remus and summary.discarded_checkpoint_offset is not None:
            raise BrokenOffCheckpoint(
                f"the source broke off inside checkpoint {summary.checkpoints + 1}; the destination keeps "
                f"checkpoint {summary.checkpoints}", self._parser.offset, self._outbox.take())
        return self._outbox.take() + self._held

    def _drain(self) -> None:
        parser, transformer, outbox = self._parser, self._transformer, self._outbox
        while not self._done:
            if self._route is not Payload.NOWHERE:
                take = self._writer.write if self._route is Payload.OUTPUT else self._journal_payload
                while parser.payload_pending and (piece := parser.take_payload()):
                    take(piece)
                if parser.payload_pending and not self._input_ended:  # at the end, the parser says what broke
                    return
                self._route = Payload.NOWHERE
            event = parser.next_event()
            if event is LEGACY_NEED_DATA:
                return
            if event is DONE:
                self._done = True
                return
            self._check_limits(event)
            finished = transformer.finished
            self._route = transformer.handle(event)
            if transformer.finished and not finished:
                self._held = [bytes(buffer) for buffer in outbox.buffers[self._end_record_at:]]
                del outbox.buffers[self._end_record_at:]
                self._end = parser.offset

    def _note_end_record(self) -> None:
        self._end_record_at = len(self._outbox.buffers)

    def _journal_payload(self, piece) -> None:
        self._transformer.handle(PageData(data=piece))

    def _check_limits(self, event) -> None:
        check = self._CHECKS.get(type(event))
        if check is not None:
            check(self, event)
            return
        self._elements += 1
        if self._elements > self.ELEMENT_LIMIT:
            raise LegacyUnsupported(f"more than {self.ELEMENT_LIMIT} stream elements besides page batches",
                                    event.offset)

    def _detected(self, event: Detected) -> None:
        self.variant = f"v1-{event.guest}-{event.width}"

    def _checkpoint_end(self, event: CheckpointEnd) -> None:
        # The transformer keeps a checkpoint's elements only until its end: the limits are per checkpoint.
        self._elements = 0
        self._device_model_bytes = 0

    def _device_model_data(self, event: DeviceModelData) -> None:
        self._device_model_bytes += len(event.data)
        if self._device_model_bytes > self._max_buffered:
            raise LegacyUnsupported(f"device-model state larger than the service's {self._max_buffered} byte "
                                    "buffering limit", event.offset)

    _CHECKS = {
        PageBatch: lambda self, event: None,
        Detected: _detected,
        DeviceModelData: _device_model_data,
        CheckpointEnd: _checkpoint_end,
    }

    @staticmethod
    def _no_spool():
        raise LegacyUnsupported('a Remus stream (checkpoint 2 begins) and this listener has remus = "refuse"')


CONVERSIONS = {
    "v1": lambda listener, config: LegacyUpgrade(listener.format, listener.width, listener.guest,
                                                 config.max_buffered, listener.remus),
    "v2": lambda listener, config: V2Passthrough(config.max_buffered),
}
