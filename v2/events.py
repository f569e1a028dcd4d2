"""Events produced by ``xenstream.v2.reader.V2Reader``. Every event carries the absolute byte ``offset``
(counted from the first byte fed to the reader) where its element begins."""

from __future__ import annotations

from typing import Any

import attrs


class _NeedData:
    """Sentinel: feed more input (or b"" at end of input) before asking again."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@attrs.frozen
class Header:
    """One of the four headers: ``XlHeader``, ``LibxlHeader``, ``ImageHeader`` or ``DomainHeader``."""

    offset: int
    header: Any


@attrs.frozen
class LibxcRecord:
    """A libxc record. ``index`` counts libxc records from 0; ``length`` is the body length without padding.

    For PAGE_DATA, ``body`` is a ``PageData`` (pfns and types); its ``body.payload_length`` payload bytes
    follow as ``PagePayload`` events (views mode) or are moved by the driver (passthrough mode).
    """

    offset: int
    index: int
    type: int
    length: int
    body: Any


@attrs.frozen
class LibxlRecord:
    """A libxl record; ``index`` counts libxl records from 0."""

    offset: int
    index: int
    type: int
    length: int
    body: Any


@attrs.frozen(eq=False)
class PagePayload:
    """Whole pages of the payload of PAGE_DATA record ``record_index``: pages ``first_page`` ..
    ``first_page + page_count - 1`` in payload order (the order of ``PageData.data_pfns()``).

    ``data`` is a memoryview into the reader's buffer, valid until the next ``feed``; copy what you keep.
    """

    offset: int
    record_index: int
    first_page: int
    data: memoryview

    @property
    def page_count(self) -> int:
        return len(self.data) >> 12

    def page(self, i: int) -> memoryview:
        return self.data[i << 12 : (i + 1) << 12]


@attrs.frozen
class SkippedRecord:
    """An unknown optional (bit 31) libxc record, skipped without buffering its body."""

    offset: int
    index: int
    type: int
    length: int


@attrs.frozen
class EndOfStream:
    """The stream is over. ``complete``: the outermost END was read. A checkpointed stream that stops at a
    checkpoint boundary ends with ``complete=False``; ``checkpoints`` counts libxc CHECKPOINT records."""

    offset: int
    complete: bool
    checkpoints: int
