"""Sans-IO reader for v2/v3 streams: bare libxc, libxl-wrapped, and xl save files.

API::

    reader = V2Reader(layer="auto", payload="views", strict=True, colo=False)
    reader.feed(data)            # bytes / bytearray / memoryview; b"" means end of input
    event = reader.next_event()  # an event from xenstream.v2.events, or NEED_DATA

``layer``: "auto" (detect from the first 8 bytes), "xl", "libxl" or "libxc" (what the input starts with).

Events, in stream order: ``Header`` (xl, libxl, image, domain headers), ``LibxlRecord``, ``LibxcRecord``,
``PagePayload`` (views mode), ``SkippedRecord`` (unknown optional libxc record, also logged as a warning),
and finally ``EndOfStream``, which ``next_event`` then keeps returning. Every event has the absolute
``offset`` of its first byte; ``reader.offset`` is the offset of the next byte not yet consumed.

PAGE_DATA payloads are never copied out of the input buffer:

* ``payload="views"``: after the ``LibxcRecord`` of a PAGE_DATA record come ``PagePayload`` events, each a
  memoryview of whole pages currently buffered (valid until the next ``feed``).
* ``payload="passthrough"``: after that ``LibxcRecord``, ``reader.payload_remaining`` bytes of payload
  belong to the driver. It takes what is already buffered with ``reader.take_payload(max_bytes=None)``
  (a memoryview, consumed), and may move the rest straight from its source (e.g. ``os.splice``), telling
  the reader with ``reader.payload_consumed(n)`` (only allowed while nothing is buffered). Calling
  ``next_event`` before the payload is done is a programming error (RuntimeError), except at end of input
  where it raises ``TruncatedStream``.

Layers: after the libxl LIBXC_CONTEXT record the libxc stream is read until its END, then libxl records
resume. Checkpointed streams: a libxc CHECKPOINT inside a libxl stream hands over to libxl until
CHECKPOINT_END (with ``colo=True`` also one CHECKPOINT_STATE), then libxc records continue without new
headers. Input ending right after such a checkpoint boundary gives ``EndOfStream(complete=False)``.

After ``EndOfStream``, ``reader.trailing_bytes`` counts input bytes seen beyond the end.

Bad input raises ``TruncatedStream``, ``MalformedStream`` or ``UnsupportedStream`` with the offset of the
element at fault. Memory is bounded: a record's length is checked against the 128 MiB limit before
anything is buffered, and PAGE_DATA payloads are never accumulated. ``strict`` rejects non-zero padding and
reserved fields (what the reference verifier rejects); ``strict=False`` ignores them as Xen does.
"""

from __future__ import annotations

import struct

from xenstream.hv.abi import PAGE_SIZE
from xenstream.hv.lazylog import get_logger
from xenstream.v2 import constants as C
from xenstream.v2.errors import MalformedStream, TruncatedStream, UnsupportedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, Header, LibxcRecord, LibxlRecord, PagePayload, SkippedRecord
from xenstream.v2.libxl_records import LIBXL_RECORDS, LibxlHeader
from xenstream.v2.records import LIBXC_RECORDS, BodyError, DomainHeader, ImageHeader, PageData
from xenstream.v2.xl_header import XlHeader

log = get_logger(__name__)

_RECORD_HEADER = struct.Struct("<II")
_COUNT = struct.Struct("<II")

_MAGICS = {
    C.XL_MAGIC[:8]: "xl",
    struct.pack(">Q", C.LIBXL_IDENT): "libxl",
    struct.pack(">Q", C.IMAGE_MARKER): "libxc",
}

LAYERS = ("auto", "xl", "libxl", "libxc")
PAYLOAD_MODES = ("views", "passthrough")


def _padding(length: int) -> int:
    return -length & (C.RECORD_ALIGN - 1)


class V2Reader:
    def __init__(self, layer: str = "auto", payload: str = "views", strict: bool = True, colo: bool = False):
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}")
        if payload not in PAYLOAD_MODES:
            raise ValueError(f"payload must be one of {PAYLOAD_MODES}")
        self._strict = strict
        self._colo = colo
        self._passthrough = payload == "passthrough"
        self._buf = bytearray()
        self._pos = 0
        self._base = 0  # absolute offset of _buf[0]
        self._eof = False
        self._dropped_trailing = 0
        self._state = {
            "auto": self._read_detect,
            "xl": self._read_xl_header,
            "libxl": self._read_libxl_header,
            "libxc": self._read_image_header,
        }[layer]
        self._nested = False  # libxc stream inside a libxl stream
        self._in_checkpoint = False  # libxl records after a libxc CHECKPOINT, before CHECKPOINT_END
        self._expect_checkpoint_state = False
        self._at_checkpoint_boundary = False
        self._checkpoints = 0
        self._libxc_index = 0
        self._libxl_index = 0
        self._payload_remaining = 0
        self._payload_record_offset = 0
        self._payload_record_index = 0
        self._payload_page = 0
        self._skip_remaining = 0
        self._skip_offset = 0
        self._end_event: EndOfStream | None = None

    # ------------------------------------------------------------ input side

    @property
    def offset(self) -> int:
        """Absolute offset of the next byte not yet consumed."""
        return self._base + self._pos

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def trailing_bytes(self) -> int:
        """Bytes fed beyond the end of the stream (meaningful after EndOfStream)."""
        if self._end_event is None:
            return 0
        return self.buffered + self._dropped_trailing

    @property
    def at_eof(self) -> bool:
        return self._eof

    def feed(self, data) -> None:
        if self._eof:
            if data:
                raise RuntimeError("feed() after end of input")
            return
        if not data:
            self._eof = True
            return
        if self._end_event is not None:
            self._dropped_trailing += memoryview(data).nbytes
            return
        pos = self._pos
        buf = self._buf
        try:
            if pos:
                del buf[:pos]
            buf += data
        except BufferError:
            # A PagePayload view still points into the old buffer: leave it to its holder.
            fresh = bytearray(memoryview(buf)[pos:])
            fresh += data
            self._buf = fresh
        self._base += pos
        self._pos = 0

    def _have(self, n: int, offset: int, what: str) -> bool:
        """True when n bytes from the current position are buffered; at end of input, TruncatedStream."""
        if len(self._buf) - self._pos >= n:
            return True
        if self._eof:
            raise TruncatedStream(f"truncated {what}: needs {n} bytes, input ends after {len(self._buf) - self._pos}", offset)
        return False

    def _view(self, start: int, length: int) -> memoryview:
        return memoryview(self._buf)[start : start + length]

    # ------------------------------------------------------------ passthrough payloads

    @property
    def payload_remaining(self) -> int:
        return self._payload_remaining

    def take_payload(self, max_bytes: int | None = None) -> memoryview:
        """Consume and return up to ``max_bytes`` of the pending PAGE_DATA payload that is buffered."""
        n = min(self._payload_remaining, len(self._buf) - self._pos)
        if max_bytes is not None:
            n = min(n, max_bytes)
        view = self._view(self._pos, n)
        self._pos += n
        self._payload_done(n)
        return view

    def payload_consumed(self, n: int) -> None:
        """The driver moved ``n`` payload bytes from the source itself, without feeding them."""
        if n < 0 or n > self._payload_remaining:
            raise ValueError(f"payload_consumed({n}) with {self._payload_remaining} payload bytes pending")
        if n and len(self._buf) > self._pos:
            raise ValueError("payload_consumed() while payload bytes are still buffered; take_payload() first")
        self._base += n
        self._payload_done(n)

    def _payload_done(self, n: int) -> None:
        if not n:
            return
        self._payload_remaining -= n
        if self._payload_remaining == 0:
            self._state = self._read_libxc_record

    def _read_passthrough_pending(self):
        if self._eof and len(self._buf) - self._pos < self._payload_remaining:
            raise TruncatedStream(
                f"truncated PAGE_DATA payload: {self._payload_remaining} bytes still expected", self._payload_record_offset
            )
        raise RuntimeError(f"{self._payload_remaining} PAGE_DATA payload bytes pending: take_payload() or payload_consumed() first")

    # ------------------------------------------------------------ events

    def next_event(self):
        return self._state()

    def _malformed(self, exc: BodyError, offset: int) -> MalformedStream:
        return MalformedStream(str(exc), offset)

    def _finish(self, complete: bool):
        self._end_event = EndOfStream(offset=self.offset, complete=complete, checkpoints=self._checkpoints)
        self._state = self._read_done
        return self._end_event

    def _read_done(self):
        return self._end_event

    def _detect(self, choices: tuple[str, ...], what: str) -> str | None:
        if not self._have(8, self.offset, what):
            return None
        layer = _MAGICS.get(bytes(self._buf[self._pos : self._pos + 8]))
        if layer not in choices:
            raise UnsupportedStream(
                f"no {' / '.join(choices)} header: not a v2 stream (a legacy image?)", self.offset
            )
        return layer

    def _read_detect(self):
        layer = self._detect(("xl", "libxl", "libxc"), "stream header")
        if layer is None:
            return NEED_DATA
        self._state = {"xl": self._read_xl_header, "libxl": self._read_libxl_header, "libxc": self._read_image_header}[layer]
        return self._state()

    def _read_xl_payload_detect(self):
        layer = self._detect(("libxl", "libxc"), "xl payload header")
        if layer is None:
            return NEED_DATA
        self._state = self._read_libxl_header if layer == "libxl" else self._read_image_header
        return self._state()

    def _read_xl_header(self):
        start = self.offset
        if not self._have(C.XL_HEADER_SIZE, start, "xl header"):
            return NEED_DATA
        fixed = self._view(self._pos, C.XL_HEADER_SIZE)
        try:
            _, _, _, optional_len = XlHeader.parse_fixed(fixed, self._strict)
        except BodyError as exc:
            raise self._malformed(exc, start) from None
        finally:
            fixed.release()
        if optional_len > C.XL_OPTIONAL_DATA_MAX:
            raise UnsupportedStream(f"xl header optional data of {optional_len} bytes exceeds the {C.XL_OPTIONAL_DATA_MAX} limit", start)
        size = C.XL_HEADER_SIZE + optional_len
        if not self._have(size, start, "xl header"):
            return NEED_DATA
        try:
            header = XlHeader.unpack(self._view(self._pos, size), self._strict)
        except BodyError as exc:
            raise self._malformed(exc, start) from None
        self._pos += size
        if header.streamv2:
            self._state = self._read_libxl_header
        else:
            self._state = self._read_xl_payload_detect
        return Header(offset=start, header=header)

    def _read_fixed_header(self, cls, what: str):
        start = self.offset
        if not self._have(cls.SIZE, start, what):
            return None, start
        try:
            header = cls.unpack(self._view(self._pos, cls.SIZE), self._strict)
        except BodyError as exc:
            raise self._malformed(exc, start) from None
        self._pos += cls.SIZE
        return header, start

    def _read_libxl_header(self):
        header, start = self._read_fixed_header(LibxlHeader, "libxl header")
        if header is None:
            return NEED_DATA
        if header.big_endian:
            raise UnsupportedStream("libxl header declares big-endian records (Xen rejects them too)", start)
        self._state = self._read_libxl_record
        return Header(offset=start, header=header)

    def _read_image_header(self):
        header, start = self._read_fixed_header(ImageHeader, "libxc image header")
        if header is None:
            return NEED_DATA
        if header.big_endian:
            raise UnsupportedStream("image header declares a big-endian stream (Xen rejects them too)", start)
        self._state = self._read_domain_header
        return Header(offset=start, header=header)

    def _read_domain_header(self):
        header, start = self._read_fixed_header(DomainHeader, "libxc domain header")
        if header is None:
            return NEED_DATA
        self._state = self._read_libxc_record
        return Header(offset=start, header=header)

    def _record_header(self, layer: str):
        """(type, length, offset) of the next record, None when more input is needed, or an EndOfStream
        event when input ends cleanly at a checkpoint boundary."""
        start = self.offset
        if self._eof and len(self._buf) == self._pos and self._at_checkpoint_boundary:
            return self._finish(complete=False)
        if not self._have(C.RECORD_HEADER_SIZE, start, f"{layer} record header (stream ends before its END)"):
            return None
        rtype, length = _RECORD_HEADER.unpack_from(self._buf, self._pos)
        if length > C.RECORD_LENGTH_MAX:
            raise MalformedStream(f"{layer} record type {rtype:#x} length {length} exceeds the {C.RECORD_LENGTH_MAX} byte limit", start)
        return rtype, length, start

    def _read_body(self, cls, length: int, start: int, what: str):
        """Decode the body of a record of known class; None when more input is needed."""
        padded = length + _padding(length)
        if not self._have(C.RECORD_HEADER_SIZE + padded, start, what):
            return None
        body_start = self._pos + C.RECORD_HEADER_SIZE
        if self._strict and padded != length and any(self._buf[body_start + length : body_start + padded]):
            raise MalformedStream(f"{what}: non-zero padding", start + C.RECORD_HEADER_SIZE + length)
        try:
            body = cls.unpack(self._view(body_start, length), self._strict)
        except BodyError as exc:
            raise self._malformed(exc, start) from None
        self._pos = body_start + padded
        return body

    # ------------------------------------------------------------ libxl layer

    def _read_libxl_record(self):
        head = self._record_header("libxl")
        if head is None:
            return NEED_DATA
        if isinstance(head, EndOfStream):
            return head
        rtype, length, start = head
        if self._expect_checkpoint_state and rtype != C.LIBXL_REC_CHECKPOINT_STATE:
            raise MalformedStream(f"expected CHECKPOINT_STATE after CHECKPOINT_END (COLO), found libxl record type {rtype:#x}", start)
        cls = LIBXL_RECORDS.get(rtype)
        if cls is None:
            kind = "optional" if rtype & C.OPTIONAL_RECORD_BIT else "mandatory"
            # libxl refuses every unknown type, bit 31 included (spec 1.3).
            raise MalformedStream(f"unknown {kind} libxl record type {rtype:#x}", start)
        body = self._read_body(cls, length, start, f"libxl {cls.NAME} record")
        if body is None:
            return NEED_DATA
        event = LibxlRecord(offset=start, index=self._libxl_index, type=rtype, length=length, body=body)
        self._libxl_index += 1
        self._at_checkpoint_boundary = False
        after = self._LIBXL_AFTER.get(rtype)
        return after(self, event) if after else event

    def _after_libxl_end(self, event):
        self._finish(complete=True)
        return event

    def _after_libxc_context(self, event):
        self._nested = True
        self._state = self._read_image_header
        return event

    def _after_checkpoint_end(self, event):
        if not self._in_checkpoint:
            raise MalformedStream("CHECKPOINT_END outside a checkpoint", event.offset)
        self._in_checkpoint = False
        self._at_checkpoint_boundary = True
        if self._colo:
            self._expect_checkpoint_state = True
        else:
            self._state = self._read_libxc_record
        return event

    def _after_checkpoint_state(self, event):
        if not self._expect_checkpoint_state:
            raise MalformedStream("CHECKPOINT_STATE outside a COLO checkpoint", event.offset)
        self._expect_checkpoint_state = False
        self._at_checkpoint_boundary = True
        self._state = self._read_libxc_record
        return event

    _LIBXL_AFTER = {
        C.LIBXL_REC_END: _after_libxl_end,
        C.LIBXL_REC_LIBXC_CONTEXT: _after_libxc_context,
        C.LIBXL_REC_CHECKPOINT_END: _after_checkpoint_end,
        C.LIBXL_REC_CHECKPOINT_STATE: _after_checkpoint_state,
    }

    # ------------------------------------------------------------ libxc layer

    def _read_libxc_record(self):
        head = self._record_header("libxc")
        if head is None:
            return NEED_DATA
        if isinstance(head, EndOfStream):
            return head
        rtype, length, start = head
        if rtype == C.REC_PAGE_DATA:
            return self._read_page_data(length, start)
        cls = LIBXC_RECORDS.get(rtype)
        if cls is None:
            return self._skip_unknown(rtype, length, start)
        body = self._read_body(cls, length, start, f"libxc {cls.NAME} record")
        if body is None:
            return NEED_DATA
        event = LibxcRecord(offset=start, index=self._libxc_index, type=rtype, length=length, body=body)
        self._libxc_index += 1
        self._at_checkpoint_boundary = False
        after = self._LIBXC_AFTER.get(rtype)
        return after(self, event) if after else event

    def _after_libxc_end(self, event):
        if self._nested:
            self._nested = False
            self._state = self._read_libxl_record
        else:
            self._finish(complete=True)
        return event

    def _after_checkpoint(self, event):
        self._checkpoints += 1
        if self._nested:
            self._in_checkpoint = True
            self._state = self._read_libxl_record
        else:
            self._at_checkpoint_boundary = True
        return event

    _LIBXC_AFTER = {C.REC_END: _after_libxc_end, C.REC_CHECKPOINT: _after_checkpoint}

    def _skip_unknown(self, rtype: int, length: int, start: int):
        if not rtype & C.OPTIONAL_RECORD_BIT:
            raise MalformedStream(f"unknown mandatory libxc record type {rtype:#x}", start)
        log.warning("skipping unknown optional libxc record", type=f"{rtype:#x}", length=length, offset=start)
        event = SkippedRecord(offset=start, index=self._libxc_index, type=rtype, length=length)
        self._libxc_index += 1
        self._at_checkpoint_boundary = False
        self._pos += C.RECORD_HEADER_SIZE
        self._skip_remaining = length + _padding(length)
        self._skip_offset = start
        self._state = self._read_skip
        return event

    def _read_skip(self):
        n = min(self._skip_remaining, len(self._buf) - self._pos)
        self._pos += n
        self._skip_remaining -= n
        if self._skip_remaining:
            if self._eof:
                raise TruncatedStream(f"truncated optional record: {self._skip_remaining} body bytes missing", self._skip_offset)
            return NEED_DATA
        self._state = self._read_libxc_record
        return self._state()

    def _read_page_data(self, length: int, start: int):
        pos = self._pos
        if length < 8:
            raise MalformedStream(f"PAGE_DATA length {length} too short for its count", start)
        if not self._have(16, start, "PAGE_DATA record head"):
            return NEED_DATA
        try:
            count = PageData.unpack_count(self._view(pos + 8, 8), self._strict)
        except BodyError as exc:
            raise self._malformed(exc, start) from None
        head = 8 + 8 * count
        if head > length:
            raise MalformedStream(f"PAGE_DATA length {length} too short for {count} pfn entries", start)
        if not self._have(C.RECORD_HEADER_SIZE + head, start, "PAGE_DATA pfn array"):
            return NEED_DATA
        try:
            body = PageData.unpack_words(self._view(pos + 16, 8 * count), count, self._strict)
        except BodyError as exc:
            raise self._malformed(exc, start) from None
        payload = body.payload_length
        if length != head + payload:
            raise MalformedStream(
                f"PAGE_DATA length {length}, expected {head + payload} for {count} entries with {payload // PAGE_SIZE} pages", start
            )
        self._pos = pos + C.RECORD_HEADER_SIZE + head
        event = LibxcRecord(offset=start, index=self._libxc_index, type=C.REC_PAGE_DATA, length=length, body=body)
        self._libxc_index += 1
        self._at_checkpoint_boundary = False
        if payload:
            self._payload_remaining = payload
            self._payload_record_offset = start
            self._payload_record_index = event.index
            self._payload_page = 0
            self._state = self._read_passthrough_pending if self._passthrough else self._read_payload_view
        return event

    def _read_payload_view(self):
        available = min(self._payload_remaining, len(self._buf) - self._pos) & ~(PAGE_SIZE - 1)
        if not available:
            if self._eof:
                raise TruncatedStream(
                    f"truncated PAGE_DATA payload: {self._payload_remaining} bytes still expected", self._payload_record_offset
                )
            return NEED_DATA
        event = PagePayload(
            offset=self.offset,
            record_index=self._payload_record_index,
            first_page=self._payload_page,
            data=self._view(self._pos, available),
        )
        self._pos += available
        self._payload_page += available // PAGE_SIZE
        self._payload_done(available)
        return event
