"""Writer for v2/v3 streams: a pure encoder plus ``V2Writer``, which writes onto an fd or binary file object.

Pure encoding (bytes out, no I/O)::

    encode_record(record_type, body) -> bytes          # 8-byte header + body + zero padding to 8
    encode(record) -> bytes                            # any record object with TYPE and pack()
    encode_page_data_header(pfns, types) -> bytes      # PAGE_DATA record header + count + pfn words
    page_data_payload_length(types) -> int             # 4096 * number of entries carrying data

A PAGE_DATA record is ``encode_page_data_header(...)`` followed by exactly
``page_data_payload_length(types)`` payload bytes and no padding: 8 + 8*count + 4096*N is always a
multiple of 8.

``V2Writer(sink)``: sink is an int fd (payloads go out with ``os.writev``, no concatenation) or a binary
file object (``write`` per buffer). Nothing is written implicitly; in particular END is only written when
the caller asks (a failed run must never look complete)::

    w = V2Writer(fd)
    w.xl_header(XlHeader.with_config(b"{}\\0"))           # optional
    w.libxl_header(LibxlHeader())                       # optional
    w.libxl_record(LibxcContext())
    w.image_header(ImageHeader(version=3))
    w.domain_header(DomainHeader(guest_type=1, xen_major=4, xen_minor=17))
    w.record(X86PvInfo(8, 4)); w.record(StaticDataEnd()); ...
    w.page_data(pfns, types, payloads)                  # payloads: buffers of whole pages, in order
    n = w.page_data_header(pfns, types)                 # split form: writes the head, returns the
    ...the caller writes n payload bytes itself...      # payload size; the caller then reports it:
    w.payload_written(n)
    w.record(End()); w.libxl_record(LibxlEnd())         # only when the caller decides

``w.write(*buffers)`` writes raw bytes-like objects (counted). ``w.position`` is the number of bytes
written so far; ``w.stream_position(layer)`` the bytes written since
the start of the current libxc/libxl/xl layer stream (0 mod 8 at every record boundary of that layer).
"""

from __future__ import annotations

import os
import struct

from xenstream.hv.abi import PAGE_SIZE
from xenstream.v2 import constants as C
from xenstream.v2.libxl_records import LibxlHeader
from xenstream.v2.records import DomainHeader, ImageHeader, PageData, data_page_count, join_pfn_words
from xenstream.v2.xl_header import XlHeader

_RECORD_HEADER = struct.Struct("<II")
_PAGE_DATA_HEAD = struct.Struct("<IIII")  # record type, length, count, reserved
_ZEROS = bytes(8)


def encode_record(record_type: int, body: bytes) -> bytes:
    length = len(body)
    if length > C.RECORD_LENGTH_MAX:
        raise ValueError(f"record body of {length} bytes exceeds the {C.RECORD_LENGTH_MAX} byte limit")
    return _RECORD_HEADER.pack(record_type, length) + body + _ZEROS[: -length & 7]


def encode(record) -> bytes:
    """Framed bytes of a record object (libxc or libxl) with ``TYPE`` and ``pack()``."""
    return encode_record(record.TYPE, record.pack())


def page_data_payload_length(types) -> int:
    return data_page_count(list(types)) * PAGE_SIZE


def encode_page_data_header(pfns, types) -> bytes:
    pfns = list(pfns)
    types = list(types)
    count = len(pfns)
    if count == 0 or count != len(types):
        raise ValueError(f"PAGE_DATA needs >= 1 entry and as many types as pfns ({count} pfns, {len(types)} types)")
    if any(p & ~C.PFN_MASK for p in pfns):
        raise ValueError("pfn does not fit in 52 bits")
    if C.INVALID_PAGE_TYPES.intersection(types) or any(not 0 <= t <= 0xF for t in types):
        raise ValueError("invalid page type in PAGE_DATA")
    length = 8 + 8 * count + data_page_count(types) * PAGE_SIZE
    if length > C.RECORD_LENGTH_MAX:
        raise ValueError(f"PAGE_DATA of {length} bytes exceeds the {C.RECORD_LENGTH_MAX} byte limit")
    return _PAGE_DATA_HEAD.pack(C.REC_PAGE_DATA, length, count, 0) + struct.pack(f"<{count}Q", *join_pfn_words(pfns, types))


class V2Writer:
    def __init__(self, sink):
        if isinstance(sink, int):
            self._fd = sink
            self._file = None
        else:
            self._fd = None
            self._file = sink
        self.position = 0
        self._layer_start: dict[str, int] = {}

    # ------------------------------------------------------------ raw output

    def write(self, *buffers) -> None:
        """Write buffers in order (bytes-like objects), counting them."""
        if self._fd is None:
            for buffer in buffers:
                self._file.write(buffer)
                self.position += memoryview(buffer).nbytes
            return
        pending = [view for view in (memoryview(b).cast("B") for b in buffers) if view.nbytes]
        first = 0
        while first < len(pending):
            written = os.writev(self._fd, pending[first : first + C.IOV_MAX])
            self.position += written
            while written:
                size = pending[first].nbytes
                if written >= size:
                    written -= size
                    first += 1
                else:
                    pending[first] = pending[first][written:]
                    written = 0

    def payload_written(self, n: int) -> None:
        """Account for ``n`` bytes the caller wrote to the sink itself (split PAGE_DATA form)."""
        self.position += n

    def flush(self) -> None:
        if self._file is not None and hasattr(self._file, "flush"):
            self._file.flush()

    def stream_position(self, layer: str) -> int:
        return self.position - self._layer_start[layer]

    # ------------------------------------------------------------ headers

    def xl_header(self, header: XlHeader) -> None:
        self._layer_start["xl"] = self.position
        self.write(header.pack())

    def libxl_header(self, header: LibxlHeader = LibxlHeader()) -> None:
        self._layer_start["libxl"] = self.position
        self.write(header.pack())

    def image_header(self, header: ImageHeader = ImageHeader()) -> None:
        self._layer_start["libxc"] = self.position
        self.write(header.pack())

    def domain_header(self, header: DomainHeader) -> None:
        self.write(header.pack())

    # ------------------------------------------------------------ records

    def record(self, record) -> None:
        """A libxc record object (any class of xenstream.v2.records except PageData and Toolstack)."""
        if isinstance(record, PageData):
            raise TypeError("PAGE_DATA goes through page_data() or page_data_header(), with its payload")
        self.write(encode(record))

    def libxl_record(self, record) -> None:
        self.write(encode(record))

    def page_data(self, pfns, types, payloads) -> None:
        """One PAGE_DATA record: header and pfn words, then the caller's payload buffers, uncopied.

        ``payloads`` is a sequence of bytes-like objects whose total size is 4096 * (entries carrying data).
        """
        head = encode_page_data_header(pfns, types)
        expected = page_data_payload_length(types)
        total = sum(memoryview(p).nbytes for p in payloads)
        if total != expected:
            raise ValueError(f"PAGE_DATA payload is {total} bytes, expected {expected}")
        self.write(head, *payloads)

    def page_data_header(self, pfns, types) -> int:
        """Write the head of a PAGE_DATA record; return the payload bytes the caller must write next
        (then report them with ``payload_written``)."""
        self.write(encode_page_data_header(pfns, types))
        return page_data_payload_length(types)

