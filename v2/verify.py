"""The strict verifier: a state machine fed with a strict V2Reader's events, independent of any I/O.

    verifier = Verifier(fmt="auto")
    for event in events:                 # from V2Reader (views or passthrough mode)
        verifier.feed_event(event)
    report = verifier.finish()           # Report: .ok, .errors, .warnings (Finding, one line each)

A StreamError from the reader means the stream cannot be followed any further: hand it to
`verifier.stream_error(exc)` (one error finding) and call `finish()`. Rule findings (legality per guest
type and version, phases, STATIC_DATA_END, mandatory records, pfn ranges, vcpus, checkpoints) are all
collected, up to the report's cap.

`verify_fd(fd, fmt)` / `verify_path(path, fmt)` drive a passthrough reader over an fd: page payloads are
read into one reused buffer and never handed to the reader, so memory stays flat whatever the size.
"""

from __future__ import annotations

import os
from typing import Callable

import attrs

from xenstream.v2 import constants as C
from xenstream.v2.errors import StreamError
from xenstream.v2.events import NEED_DATA, EndOfStream, Header, LibxcRecord, LibxlRecord, PagePayload, SkippedRecord
from xenstream.v2.libxl_records import LIBXL_RECORD_NAMES, LibxlHeader, libxl_record_name
from xenstream.v2.reader import V2Reader
from xenstream.v2.records import LIBXC_RECORD_NAMES, DomainHeader, ImageHeader, libxc_record_name
from xenstream.v2.verify_libxc import GUEST_NAMES, LibxcRules
from xenstream.v2.verify_libxl import LibxlRules, check_xl_header
from xenstream.v2.verify_report import DEFAULT_FINDING_CAP, ERROR, Finding, Report
from xenstream.v2.xl_header import XlHeader

FORMATS = ("auto", "libxc", "libxl", "xl")
GUEST_TYPES = {"pv": C.DOMAIN_TYPE_X86_PV, "hvm": C.DOMAIN_TYPE_X86_HVM}
# Longest first, so that "X86_PV_VCPU_BASIC" wins over "END" when both occur in a message.
_RECORD_NAMES = {layer: sorted(names.values(), key=len, reverse=True)
                 for layer, names in (("libxc", LIBXC_RECORD_NAMES), ("libxl", LIBXL_RECORD_NAMES))}


def _named_record(message: str, layer: str | None) -> str | None:
    """The record a reader message is about: it starts with the name or says "<layer> <NAME> record"."""
    for name in _RECORD_NAMES.get(layer, ()):
        if message.startswith(name) or f"{layer} {name} record" in message:
            return name
    return None


_HEADER_LAYERS = {XlHeader: "xl", LibxlHeader: "libxl", ImageHeader: "libxc", DomainHeader: "libxc"}


@attrs.define
class Verifier:
    """fmt: what the stream must start with ("auto": whatever it is). checkpointed: None lets a CHECKPOINT
    record declare it; False makes CHECKPOINT an error; True accepts a stream ending at a checkpoint.
    max_vcpus, guest: the target domain's vcpu count and type ("pv" or "hvm"), when known."""

    fmt: str = "auto"
    checkpointed: bool | None = None
    max_vcpus: int | None = None
    guest: str | None = None  # "pv" or "hvm": the domain the stream is to be restored into, when known
    cap: int = DEFAULT_FINDING_CAP
    report: Report = attrs.field(init=False)
    libxc: LibxcRules = attrs.field(init=False)
    libxl: LibxlRules = attrs.field(init=False)
    layer: str | None = attrs.field(init=False, default=None)  # layer of the last element seen
    next_index: dict = attrs.field(init=False, factory=lambda: {"libxc": 0, "libxl": 0})
    finished: bool = attrs.field(init=False, default=False)
    last_record: tuple = attrs.field(init=False, default=(None, None, None, None))  # offset, layer, index, name
    ended: bool = attrs.field(init=False, default=False)  # EndOfStream seen

    def __attrs_post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}")
        self.report = Report(cap=self.cap)
        if self.guest not in (None, *GUEST_TYPES):
            raise ValueError(f"guest must be one of {tuple(GUEST_TYPES)}")
        self.libxc = LibxcRules(report=self._reporter("libxc"), checkpointed=self.checkpointed, max_vcpus=self.max_vcpus,
                                expected_guest=GUEST_TYPES.get(self.guest))
        self.libxl = LibxlRules(report=self._reporter("libxl"))

    def _reporter(self, layer: str):
        def report(severity, offset, index, record, message):
            self.report.add(Finding(severity, offset, layer, index, record, message))
        return report

    # ---- input ---------------------------------------------------------------------------------

    def feed_event(self, event) -> None:
        self._DISPATCH[type(event)](self, event)

    def stream_error(self, exc: StreamError) -> None:
        """The reader gave up: one finding naming where, then nothing more can be checked."""
        self.report.broken = True
        last_offset, layer, index, record = self.last_record
        if exc.offset != last_offset or layer is None:
            # The reader fails before it emits the record's event: name the record from the message.
            layer = self.layer or (None if self.fmt == "auto" else self.fmt)
            index = self.next_index.get(layer)
            record = _named_record(exc.message, layer) or ("record" if index is not None else "stream")
        self.report.add(Finding(ERROR, exc.offset, layer, index, record, exc.message))

    def finish(self, trailing_bytes: int = 0, offset: int | None = None) -> Report:
        """The verdict. `trailing_bytes`: input seen after the outermost END (`offset`: where it began)."""
        if not self.finished:
            self.finished = True
            if not self.ended and not self.report.broken:
                self.report.add(Finding(ERROR, offset, self.layer, None, "end of input",
                                        "the verifier was not shown the end of the stream"))
            if trailing_bytes and not self.report.broken:
                self.report.add(Finding(ERROR, offset, self.layer, None, "end of input",
                                        f"{trailing_bytes} bytes after the end of the stream"))
        self.report.checkpoints = self.libxc.checkpoints
        self.report.pages = self.libxc.pages
        return self.report

    # ---- events --------------------------------------------------------------------------------

    def _header(self, event: Header) -> None:
        header = event.header
        layer = _HEADER_LAYERS[type(header)]
        if self.layer is None:
            self.report.format = layer
            if self.fmt not in ("auto", layer):
                self.report.add(Finding(ERROR, event.offset, layer, None, "header",
                                        f"a {layer} stream where a {self.fmt} stream was expected"))
        self.layer = layer
        self._HEADERS[type(header)](self, event.offset, header)

    def _xl_header(self, offset: int, header: XlHeader) -> None:
        check_xl_header(offset, header, self._reporter("xl"))

    def _libxl_header(self, offset: int, header: LibxlHeader) -> None:
        self.libxl.header(offset, header)

    def _image_header(self, offset: int, header: ImageHeader) -> None:
        self.report.version = header.version
        self.libxc.image_header(offset, header)

    def _domain_header(self, offset: int, header: DomainHeader) -> None:
        self.report.guest_type = GUEST_NAMES.get(header.guest_type)
        self.libxc.domain_header(offset, header)
        self.libxl.guest = header.guest_type

    def _libxc_record(self, event: LibxcRecord) -> None:
        self._count("libxc", event.index)
        self.last_record = (event.offset, "libxc", event.index, libxc_record_name(event.type))
        self.libxc.record(event.offset, event.index, event.type, event.length, event.body)
        if event.type == C.REC_CHECKPOINT:
            self.libxl.libxc_checkpoint()

    def _skipped(self, event: SkippedRecord) -> None:
        self._count("libxc", event.index)
        self.libxc.record(event.offset, event.index, event.type, event.length, None)

    def _libxl_record(self, event: LibxlRecord) -> None:
        self._count("libxl", event.index)
        self.last_record = (event.offset, "libxl", event.index, libxl_record_name(event.type))
        self.libxl.record(event.offset, event.index, event.type, event.length, event.body)

    def _count(self, layer: str, index: int) -> None:
        self.layer = layer
        self.next_index[layer] = index + 1
        self.report.records += 1

    def _payload(self, event: PagePayload) -> None:
        pass  # page contents carry nothing the rules look at

    def _end_of_stream(self, event: EndOfStream) -> None:
        self.ended = True
        self.report.bytes_read = event.offset
        if not event.complete:  # input ended cleanly at a checkpoint boundary
            if self.libxc.checkpointed is False:
                self.report.add(Finding(ERROR, event.offset, self.layer, None, "end of input",
                                        "input ends after a checkpoint, without END, in a stream that is not checkpointed"))

    _HEADERS = {XlHeader: _xl_header, LibxlHeader: _libxl_header, ImageHeader: _image_header, DomainHeader: _domain_header}
    _DISPATCH = {
        Header: _header,
        LibxcRecord: _libxc_record,
        SkippedRecord: _skipped,
        LibxlRecord: _libxl_record,
        PagePayload: _payload,
        EndOfStream: _end_of_stream,
    }


# ---- driving a reader over an fd ---------------------------------------------------------------

HEAD_READ = 64 << 10  # records other than page payloads are small: read little, feed little
PAYLOAD_READ = 1 << 20


def verify_fd(fd: int, fmt: str = "auto", *, checkpointed: bool | None = None, colo: bool = False,
              max_vcpus: int | None = None, guest: str | None = None, trailing: bool = True,
              cap: int = DEFAULT_FINDING_CAP, observer: Callable[[object], None] | None = None) -> Report:
    """Verify the stream read from fd. trailing: after the outermost END, read on to the end of input
    and report any bytes found (False stops at END, as Xen's verifier does, e.g. on a live socket).
    observer: called with every event before the verifier sees it (e.g. to print a summary)."""
    reader = V2Reader(layer=fmt, payload="passthrough", strict=True, colo=colo)
    verifier = Verifier(fmt=fmt, checkpointed=checkpointed, max_vcpus=max_vcpus, guest=guest, cap=cap)
    scratch = bytearray(PAYLOAD_READ)
    view = memoryview(scratch)
    try:
        while True:
            if reader.payload_remaining:
                reader.take_payload()
                while reader.payload_remaining:
                    got = os.readv(fd, [view[: min(reader.payload_remaining, PAYLOAD_READ)]])
                    if not got:
                        reader.feed(b"")
                        break
                    reader.payload_consumed(got)
            event = reader.next_event()
            if event is NEED_DATA:
                got = os.readv(fd, [view[:HEAD_READ]])
                reader.feed(view[:got] if got else b"")
                continue
            if observer is not None:
                observer(event)
            verifier.feed_event(event)
            if isinstance(event, EndOfStream):
                break
    except StreamError as exc:
        verifier.stream_error(exc)
        return verifier.finish()
    end = reader.offset
    if trailing and event.complete:
        while not reader.at_eof:
            got = os.readv(fd, [view])
            reader.feed(view[:got] if got else b"")
    return verifier.finish(reader.trailing_bytes if trailing else 0, end)


def verify_path(path: str | os.PathLike, fmt: str = "auto", **options) -> Report:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return verify_fd(fd, fmt, **options)
    finally:
        os.close(fd)


def verify_bytes(data: bytes, fmt: str = "auto", *, checkpointed: bool | None = None, colo: bool = False,
                 max_vcpus: int | None = None, guest: str | None = None, cap: int = DEFAULT_FINDING_CAP) -> Report:
    """Verify a stream held in memory (tests, small inputs): the same reader and verifier, views mode."""
    reader = V2Reader(layer=fmt, payload="views", strict=True, colo=colo)
    verifier = Verifier(fmt=fmt, checkpointed=checkpointed, max_vcpus=max_vcpus, guest=guest, cap=cap)
    reader.feed(data)
    reader.feed(b"")
    try:
        while True:
            event = reader.next_event()
            verifier.feed_event(event)
            if isinstance(event, EndOfStream):
                break
    except StreamError as exc:
        verifier.stream_error(exc)
        return verifier.finish()
    return verifier.finish(reader.trailing_bytes, event.offset)
