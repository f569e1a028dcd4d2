"""`LegacyParser`: a sans-IO parser of legacy v1 save/migration streams (h11 style).

    parser = LegacyParser(width=None, guest=None, xl=None)   # None: detect from the first bytes
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            parser.feed(os.read(fd, 1 << 20))                 # b"" signals the end of input
            continue
        if event is DONE:
            break
        handle(event)                                         # events from xenstream.legacy.events

Options: ``width`` 32 | 64 (the saving toolstack's word size), ``guest`` "pv" | "hvm", ``xl`` True |
False (an xl save-file header is / is not present). Each one left at None is detected from the first
bytes (spec 10); the `Detected` event (also `parser.detected`) says what was decided and on what
evidence. A detection the bytes cannot decide raises `DetectionError` naming the option to pass.

Errors: every bad input raises one of `xenstream.legacy.errors` (`TruncatedStream`, `MalformedStream`,
`UnsupportedStream`, `DetectionError`), each with the byte offset of the offending element. Errors are
sticky: later calls raise the same exception again.

End of stream (spec 5.3): after a checkpoint with LAST_CHECKPOINT, `EndOfStream` comes at once (without
waiting for the end of input: an xl migration sender waits for the receiver before it sends its "go"
message). Otherwise the end of input at a checkpoint boundary ends the stream. The end of input inside
checkpoint 2 or later is no error: `EndOfStream(last_checkpoint_complete=False)` says that partial
checkpoint (whose events were already delivered: they are provisional until `CheckpointEnd`) is to be
discarded. Anything fed after the logical end comes out as `XlGoMessage` / `TrailingData`, then `DONE`.

Page payloads. By default a `PageBatch` event carries its page data as ``payload``, a memoryview of the
fed bytes (no copy when the batch lies within one fed chunk; one join otherwise). With
``passthrough=True`` the batch comes out as soon as its pfn_type array is parsed, with ``payload`` None,
and its ``payload_length`` bytes of page data follow in the input. Before asking for the next event the
driver either

* keeps calling `next_event()`, which returns the payload as `PageData` pieces of what was fed, or
* moves the payload itself: `take_payload()` hands out the part already buffered (memoryviews, call
  until it returns an empty view), then the driver moves `payload_pending` more bytes straight from
  its input (e.g. with os.splice) and reports them with `consumed_externally(n)`. Offsets stay exact.

Compressed checkpoints (spec 6) are decoded: Format B batches come out as `PageBatch(compressed=True)`
(no payload), each COMPRESSED_DATA chunk as `CompressedData` followed by `DecodedPages` holding the
pages it completed. The decoder keeps the last content of every PFN decoded from compressed data
(bounded by the guest's size); the saver's first compressed copy of any PFN is a FULL page, so this is
enough for every stream a Xen saver writes. ``keep_all_pages=True`` also keeps the pages of
uncompressed batches, as the receiver's memory does (buffered mode only), for streams that send a delta
against a page last seen uncompressed.

``device_model_optional=True`` accepts an HVM stream that ends right after its HVM context (reason
"no-device-model"): a bare libxc stream, whose device-model record libxl or xend never appended (what
Xen's converter takes with --skip-qemu). By default the record is required there.
"""

from __future__ import annotations

from xenstream.legacy.buffer import InputBuffer
from xenstream.legacy.demand import NOT_YET, InputEnded
from xenstream.legacy.errors import StreamError, TruncatedStream
from xenstream.legacy.events import Detected, EndOfStream, Event, PageBatch, PageData
from xenstream.legacy.walk import Walker


class _Sentinel:
    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
DONE = _Sentinel("DONE")

_WIDTHS = (None, 32, 64)
_GUESTS = (None, "pv", "hvm")
_XL = (None, True, False)


class LegacyParser:
    def __init__(
        self,
        width: int | None = None,
        guest: str | None = None,
        xl: bool | None = None,
        *,
        passthrough: bool = False,
        keep_all_pages: bool = False,
        device_model_optional: bool = False,
    ):
        if width not in _WIDTHS or guest not in _GUESTS or xl not in _XL:
            raise ValueError(f"width must be one of {_WIDTHS}, guest one of {_GUESTS}, xl one of {_XL}")
        if passthrough and keep_all_pages:
            raise ValueError("keep_all_pages needs the page data, so it cannot be combined with passthrough")
        self._buffer = InputBuffer()
        self._walker = Walker(self._buffer, width, guest, xl, passthrough, keep_all_pages, device_model_optional)
        self._walk = self._walker.run()
        self._demand = None
        self._payload_left = 0
        self._error: StreamError | None = None
        self._done = False

    # --- input -----------------------------------------------------------------------------------

    def feed(self, data) -> None:
        """Give the parser more input; b"" (or any empty buffer) means the input has ended."""
        self._buffer.feed(data)

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not consumed yet."""
        return self._buffer.offset

    @property
    def detected(self) -> Detected | None:
        """The variant and its evidence, once decided (also delivered as the `Detected` event)."""
        return self._walker.detected

    # --- events ----------------------------------------------------------------------------------

    def next_event(self):
        """The next event, NEED_DATA (feed more, or b"" for the end), or DONE after everything."""
        if self._error is not None:
            raise self._error
        if self._done:
            return DONE
        try:
            return self._advance()
        except InputEnded as ended:
            return self._input_ended(ended)
        except StreamError as error:
            self._error = error
            raise

    def _advance(self):
        while True:
            if self._payload_left:
                return self._payload_piece()
            value = None
            if self._demand is not None:
                value = self._demand.attempt(self._buffer)
                if value is NOT_YET:
                    return NEED_DATA
                self._demand = None
            try:
                item = self._walk.send(value)
            except StopIteration:
                self._done = True
                return DONE
            if not isinstance(item, Event):
                self._demand = item
                continue
            if isinstance(item, PageBatch) and item.payload is None:
                self._payload_left = item.payload_length  # passthrough: the payload follows in the input
            return item

    def _payload_piece(self):
        if self._buffer.available:
            at = self._buffer.offset
            piece = self._buffer.take_upto(self._payload_left)
            self._payload_left -= len(piece)
            return PageData(piece, offset=at)
        if self._buffer.eof:
            raise InputEnded("page data", self._payload_left, 0, self._buffer.offset)
        return NEED_DATA

    def _input_ended(self, ended: InputEnded):
        self._walk.close()
        start = self._walker.checkpoint_start
        if start is None:
            self._error = TruncatedStream(ended.message(), ended.offset)
            raise self._error
        self._done = True
        return EndOfStream(
            self._walker.checkpoints,
            "end-of-input",
            last_checkpoint_complete=False,
            discarded_offset=start,
            offset=self._buffer.offset + self._buffer.available,
        )

    # --- passthrough payloads --------------------------------------------------------------------

    @property
    def payload_pending(self) -> int:
        """Page-data bytes of the last PageBatch not consumed yet (passthrough mode)."""
        return self._payload_left

    def take_payload(self, max_bytes: int | None = None) -> memoryview:
        """Consume up to max_bytes of the pending payload from what is buffered (empty when none is)."""
        limit = self._payload_left if max_bytes is None else min(max_bytes, self._payload_left)
        piece = self._buffer.take_upto(limit)
        self._payload_left -= len(piece)
        return piece

    def consumed_externally(self, n: int) -> None:
        """The driver moved n pending payload bytes itself, straight from its input."""
        if not 0 <= n <= self._payload_left:
            raise ValueError(f"{n} bytes consumed externally but only {self._payload_left} are pending")
        self._buffer.skip_external(n)
        self._payload_left -= n


def parse_bytes(data: bytes, **options) -> list[Event]:
    """Every event of a complete stream held in memory (tests, small tools)."""
    parser = LegacyParser(**options)
    parser.feed(data)
    parser.feed(b"")
    events = []
    while (event := parser.next_event()) is not DONE:
        events.append(event)
    return events
