"""Decoding Remus checkpoint compression (spec 6): FULL, EMPTY and delta pages against the previous content.

The scheme is word replacement, not XOR: a copy run carries the new 32-bit words literally, a skip run
keeps the previous words. "Previous" is the receiver's current content of that PFN, so the decoder keeps
the last bytes received for every PFN it may be asked about (`PageStore`): one 4096-byte entry per PFN
below p2m_size, hence bounded by the guest's size.

`CheckpointDecoder` is fed the data-bearing `pfn_type` entries of a Format B checkpoint's batches
(`announce`) and the concatenated COMPRESSED_DATA payloads (`decode`), in stream order; it returns the
pages completed so far. A page's encoding may straddle two chunks.
"""

from __future__ import annotations

import array
from collections import deque

from xenstream.hv.abi import PAGE_SIZE
from xenstream.legacy import constants as c
from xenstream.legacy.errors import MalformedStream

MARKER_EMPTY = 0x00
MARKER_FULL = 0x80
SKIP_FLAG = 0x80
RUN_LENGTH_MASK = 0x7F
WORD = 4


class PageStore:
    """The last content received for each PFN (bytes of 4096), as the receiver's memory holds it."""

    def __init__(self) -> None:
        self._pages: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._pages)

    def get(self, pfn: int) -> bytes | None:
        return self._pages.get(pfn)

    def put(self, pfn: int, page: bytes) -> None:
        self._pages[pfn] = page

    def put_batch(self, entries: array.array, payload: memoryview) -> None:
        """Remember the data pages of an uncompressed batch (entry order = payload order)."""
        index = 0
        for entry in entries:
            if (entry >> c.TYPE_SHIFT) < 0xD:
                self._pages[entry & c.PFN_MASK] = bytes(payload[index * PAGE_SIZE : (index + 1) * PAGE_SIZE])
                index += 1


class _NeedMore(Exception):
    """The encoding of the next page is not complete in the input yet."""


def decode_page(data: bytes | bytearray, pos: int, previous: bytes | None, pfn: int, offset: int) -> tuple[bytes, int]:
    """Decode one page starting at data[pos]; return (page, position after it).

    Raises _NeedMore when data ends inside the encoding, MalformedStream for an invalid one
    (`offset` is the stream offset of data[0], for the message).
    """
    if pos >= len(data):
        raise _NeedMore
    marker = data[pos]
    if marker == MARKER_FULL:
        end = pos + 1 + PAGE_SIZE
        if end > len(data):
            raise _NeedMore
        return bytes(data[pos + 1 : end]), end
    if previous is None:
        raise MalformedStream(
            f"compressed page for pfn {pfn:#x} is relative to a previous content that was never sent "
            "since compression was enabled",
            offset + pos,
        )
    if marker == MARKER_EMPTY:
        return previous, pos + 1
    page = bytearray(previous)
    filled = 0
    while filled < PAGE_SIZE:
        if pos >= len(data):
            raise _NeedMore
        marker = data[pos]
        length = (marker & RUN_LENGTH_MASK) * WORD
        if not length:
            raise MalformedStream(f"zero-length run in the compressed page for pfn {pfn:#x}", offset + pos)
        if filled + length > PAGE_SIZE:
            raise MalformedStream(f"compressed page for pfn {pfn:#x} overruns 4096 bytes", offset + pos)
        pos += 1
        if not marker & SKIP_FLAG:
            if pos + length > len(data):
                raise _NeedMore
            page[filled : filled + length] = data[pos : pos + length]
            pos += length
        filled += length
    return bytes(page), pos


def scan_encoding(data, start: int, progress: tuple[int, int]) -> tuple[bool, tuple[int, int]]:
    """Whether the whole encoding of the page at data[start] is there, scanning its runs on from
    `progress` (bytes into the encoding, page bytes covered), what an earlier scan of the same page
    reached; returns the new progress. A run that cannot be valid ends the scan: decode_page reports it.

    Resuming keeps a page that arrives in many small COMPRESSED_DATA chunks linear: decoding it from
    its start again after every chunk was quadratic (a hostile sender's 1-byte chunks cost ~0.3 s of
    CPU per page).
    """
    available = len(data) - start
    if available < 1:
        return False, progress
    marker = data[start]
    if marker == MARKER_FULL:
        return available >= 1 + PAGE_SIZE, progress
    if marker == MARKER_EMPTY:
        return True, progress
    consumed, filled = progress
    while filled < PAGE_SIZE:
        if consumed >= available:
            return False, (consumed, filled)
        run = data[start + consumed]
        length = (run & RUN_LENGTH_MASK) * WORD
        if not length or filled + length > PAGE_SIZE:
            return True, (consumed, filled)
        step = 1 + (0 if run & SKIP_FLAG else length)
        if consumed + step > available:
            return False, (consumed, filled)
        consumed += step
        filled += length
    return True, (consumed, filled)


class CheckpointDecoder:
    def __init__(self, store: PageStore) -> None:
        self._store = store
        self._pending: deque[int] = deque()  # data-bearing pfn_type entries not decoded yet
        self._input = bytearray()  # compressed bytes not yet decoded (a page straddling chunks)
        self._input_offset = 0
        self._scan = (0, 0)  # scan_encoding's progress through the page at the start of _input

    @property
    def pending(self) -> int:
        return len(self._pending)

    def announce(self, entries: array.array) -> None:
        self._pending.extend(entry for entry in entries if (entry >> c.TYPE_SHIFT) < 0xD)

    def decode(self, chunk: memoryview, offset: int) -> tuple[array.array, bytes]:
        """Decode what `chunk` (at stream `offset`) completes: (their entries, their pages joined)."""
        if self._input:
            self._input += chunk
            data: bytes | bytearray | memoryview = self._input
        else:
            data, self._input_offset = chunk, offset
        done_entries = array.array("Q")
        pages = []
        pos = 0
        while pos < len(data):
            if not self._pending:
                raise MalformedStream(
                    "compressed data holds more pages than the batches of this checkpoint announced",
                    self._input_offset + pos,
                )
            entry = self._pending[0]
            pfn = entry & c.PFN_MASK
            complete, self._scan = scan_encoding(data, pos, self._scan if pos == 0 else (0, 0))
            if not complete:
                break
            page, pos = decode_page(data, pos, self._store.get(pfn), pfn, self._input_offset)
            self._scan = (0, 0)
            self._pending.popleft()
            self._store.put(pfn, page)
            done_entries.append(entry)
            pages.append(page)
        if data is self._input:
            del self._input[:pos]  # nothing to do while a page is still incomplete: no copy per chunk
        else:
            self._input = bytearray(data[pos:])
        self._input_offset += pos
        return done_entries, b"".join(pages)

    def finish(self, offset: int) -> None:
        """End of the checkpoint's body: every announced page must have been decoded."""
        if self._pending or self._input:
            raise MalformedStream(
                f"checkpoint body ends with {len(self._pending)} announced pages not decoded and "
                f"{len(self._input)} compressed bytes left over",
                offset,
            )
