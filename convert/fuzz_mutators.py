"""Structure-aware mutation: corrupt one field of a well-framed stream, or move whole elements about.

Random byte flips in a 100 KiB stream land in page data almost every time and never get past the
headers' checks twice in a row. These mutators first map the input with our own parsers (the v1
`LegacyParser`, the v2 `V2Reader`, the compression decoder's framing): every element's offset and the
fields inside it, each tagged with what it means (length, count, type, pfn, vcpu id, chunk id, marker).
A mutation then either

* rewrites one field with a value chosen for its kind (boundaries, off-by-one, sign bits, every known
  record/chunk type, pfns past the end, duplicated pfns, vcpu ids past the limit), or
* deletes, duplicates, swaps or truncates whole elements (records, chunks, checkpoints),

so the result keeps valid framing everywhere else and the fuzzer reaches the code behind the headers.
Seeds come from our writers (`samples/`, `legacy.build`, the v2 save engine), so the framing is right
to start with. A mapping stops where the parser stops: a broken input is mapped up to its first error.

    mutate(data, kind, rng) -> bytes        # kind: "v1", "v2" or "compression"
"""

from __future__ import annotations

import random
import zlib
from collections import OrderedDict

import attrs

from xenstream.legacy import events as lev
from xenstream.legacy.errors import StreamError as LegacyStreamError
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser
from xenstream.v2 import constants as C
from xenstream.v2.errors import StreamError as V2StreamError
from xenstream.v2.events import NEED_DATA as V2_NEED_DATA
from xenstream.v2.events import EndOfStream, Header, LibxcRecord, LibxlRecord, PagePayload, SkippedRecord
from xenstream.v2.libxl_records import LibxlHeader
from xenstream.v2.reader import V2Reader
from xenstream.v2.records import DomainHeader, ImageHeader
from xenstream.v2.xl_header import XlHeader

_ENTRIES_MAPPED = 8  # pfn entries of a batch / PAGE_DATA record mapped as fields (first ones and the last)


@attrs.frozen
class Field:
    offset: int
    size: int  # bytes: 1, 2, 4 or 8 (little endian)
    kind: str  # length, count, type, pfn, pfn_type, vcpu, chunk, marker, word


@attrs.frozen
class Layout:
    fields: tuple[Field, ...]
    elements: tuple[tuple[int, int], ...]  # [start, end) of each whole element, in stream order
    checkpoints: tuple[int, ...]  # offsets where a checkpoint ends (cut points a peer may stop at)


# ------------------------------------------------------------------ values per kind


_BOUNDARIES = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x400, 0x401, 0xFFF, 0x1000, 0x1001, 0x7FFF,
               0xFFFF, 0x10000, 0x7FFFFFF, 0x8000000, 0x8000001, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               0x100000000, 0x000FFFFFFFFFFFFF, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
_V2_TYPES = tuple(range(0x14)) + (0x80000000, 0x80000001, 0x7FFFFFFF)
_LIBXL_TYPES = tuple(range(7))
_V1_CHUNKS = tuple(range(-22, 1)) + (1, 2, 1023, 1024, 1025)
_VCPU_IDS = (0, 1, 2, 3, 31, 32, 63, 64, 127, 128, 4095, 4096, 0xFFFF, 0xFFFFFFFF)


def _candidates(field: Field, old: int, rng: random.Random) -> int:
    kind = field.kind
    if kind == "type":
        return rng.choice(_V2_TYPES + _LIBXL_TYPES + (old ^ 0x80000000, old + 1, old - 1))
    if kind == "chunk":
        return rng.choice(_V1_CHUNKS) & 0xFFFFFFFF
    if kind == "vcpu":
        return rng.choice(_VCPU_IDS + (old + 1,))
    if kind == "pfn_type":  # v1: type nibble in bits 28-31, pfn below
        if rng.random() < 0.6:
            return (old & 0x0FFFFFFF) | rng.randrange(16) << 28
        return (old & 0xF0000000) | rng.choice((0, old + 1, 0x0FFFFFFF, (old & 0x0FFFFFFF) ^ 1 << rng.randrange(28)))
    if kind == "pfn":
        if field.size == 8 and rng.random() < 0.3:  # v2: type nibble in bits 60-63, reserved bits 52-59
            return (old & C.PFN_MASK) | rng.randrange(16) << C.PFN_TYPE_SHIFT | rng.choice((0, 1 << 52))
        return rng.choice((0, old + 1, old - 1, old + 0x100, old * 2, 0xFFFFF, 0xFFFFFFFF, 1 << 40, C.PFN_MASK))
    if kind == "marker":
        return rng.choice((0, 1, old ^ 1, old ^ (1 << (8 * field.size - 1)), (1 << 8 * field.size) - 1, 0x80, 0x7F))
    if kind in ("length", "count"):
        delta = rng.choice((1, 4, 8, 4096))
        return rng.choice((old + delta, old - delta, old * 2, old // 2, rng.choice(_BOUNDARIES)))
    return rng.choice((rng.choice(_BOUNDARIES), old ^ 1 << rng.randrange(8 * field.size), rng.getrandbits(8 * field.size)))


def _rewrite(data: bytes, field: Field, rng: random.Random) -> bytes:
    old = int.from_bytes(data[field.offset:field.offset + field.size], "little")
    value = _candidates(field, old, rng) % (1 << 8 * field.size)
    return data[:field.offset] + value.to_bytes(field.size, "little") + data[field.offset + field.size:]


# ------------------------------------------------------------------ v1 layout


def _words(at: int, count: int, size: int, kind: str) -> list[Field]:
    return [Field(at + i * size, size, kind) for i in range(count)]


def _v1_fields(event, word: int) -> list[Field]:
    at = event.offset
    if isinstance(event, lev.XlHeader):
        return _words(at + 32, 4, 4, "length")
    if isinstance(event, lev.P2mSize):
        return [Field(at, word, "count")]
    if isinstance(event, lev.ExtendedInfo):
        fields = [Field(at, word, "marker"), Field(at + word, 4, "length")]
        position = at + word + 4
        for block in event.blocks:
            fields += [Field(position, 4, "marker"), Field(position + 4, 4, "length")]
            position += 8 + len(block.data)
        return fields
    if isinstance(event, lev.P2mFrames):
        return _words(at, min(len(event.frames), 4), word, "pfn")
    if isinstance(event, lev.PageBatch):
        count = len(event.entries)
        picked = sorted({*range(min(count, _ENTRIES_MAPPED - 1)), count - 1} - {-1})
        return [Field(at, 4, "chunk")] + [Field(at + 4 + i * word, word, "pfn_type") for i in picked]
    if isinstance(event, lev.UnmappedPfns):
        return [Field(at, 4, "count")] + _words(at + 4, 2, word, "pfn")
    if isinstance(event, (lev.VcpuInfo, lev.TscInfo, lev.HvmParam, lev.CompressedData, lev.Toolstack,
                          lev.EnableCompression, lev.LastCheckpoint, lev.EnableVerifyMode, lev.TmemHeader)):
        follow = {lev.VcpuInfo: "vcpu", lev.CompressedData: "length", lev.Toolstack: "length"}.get(type(event), "word")
        return [Field(at, 4, "chunk"), Field(at + 4, 4, follow), Field(at + 8, 4, "word")]
    if isinstance(event, lev.EndOfBody):
        return [Field(at, 4, "chunk")]
    if isinstance(event, (lev.HvmMagicPfns,)):
        return _words(at, 3, 8, "pfn")
    if isinstance(event, lev.HvmContext):
        return [Field(at, 4, "length")]
    if isinstance(event, lev.DeviceModelRecord):
        return [Field(at, 4, "marker"), Field(at + len(event.signature), 4, "length")]
    return _words(at, 4, 4, "word")


def v1_layout(data: bytes) -> Layout:
    parser = LegacyParser()
    parser.feed(data)
    parser.feed(b"")
    fields: list[Field] = []
    starts: list[int] = []
    checkpoints: list[int] = []
    word = 8
    try:
        while (event := parser.next_event()) is not DONE and event is not NEED_DATA:
            if isinstance(event, lev.Detected):
                word = event.word_size
                continue
            if isinstance(event, (lev.DecodedPages, lev.EndOfStream)):
                continue
            if isinstance(event, lev.CheckpointEnd):
                checkpoints.append(event.offset)
                continue
            starts.append(event.offset)
            fields += _v1_fields(event, word)
    except LegacyStreamError as exc:
        if exc.offset is not None:
            starts.append(exc.offset)
    return _layout(data, fields, starts, checkpoints)


def _layout(data: bytes, fields: list[Field], starts: list[int], checkpoints: list[int]) -> Layout:
    fields = [f for f in fields if 0 <= f.offset and f.offset + f.size <= len(data)]
    bounds = sorted({s for s in starts if 0 <= s <= len(data)} | {len(data)})
    elements = tuple((a, b) for a, b in zip(bounds, bounds[1:]) if b > a)
    return Layout(tuple(fields), elements, tuple(sorted(set(checkpoints))))


# ------------------------------------------------------------------ v2 layout


_HEADER_FIELDS = {
    XlHeader: ((32, 4, "marker"), (36, 4, "marker"), (40, 4, "marker"), (44, 4, "length")),
    LibxlHeader: ((0, 8, "marker"), (8, 4, "marker"), (12, 4, "marker")),
    ImageHeader: ((0, 8, "marker"), (8, 4, "marker"), (12, 4, "marker"), (16, 2, "marker"), (18, 2, "word"),
                  (20, 4, "word")),
    DomainHeader: ((0, 4, "type"), (4, 2, "word"), (6, 2, "word"), (8, 2, "word"), (10, 2, "word")),
}
_LIBXC_BODY_FIELDS = {
    C.REC_PAGE_DATA: ((0, 4, "count"), (4, 4, "word")),
    C.REC_X86_PV_INFO: ((0, 1, "word"), (1, 1, "word"), (2, 2, "word")),
    C.REC_X86_PV_P2M_FRAMES: ((0, 4, "pfn"), (4, 4, "pfn"), (8, 8, "pfn")),
    C.REC_X86_PV_VCPU_BASIC: ((0, 4, "vcpu"), (4, 4, "word")),
    C.REC_X86_PV_VCPU_EXTENDED: ((0, 4, "vcpu"), (4, 4, "word")),
    C.REC_X86_PV_VCPU_XSAVE: ((0, 4, "vcpu"), (4, 4, "word")),
    C.REC_X86_PV_VCPU_MSRS: ((0, 4, "vcpu"), (4, 4, "word")),
    C.REC_X86_TSC_INFO: ((0, 4, "word"), (4, 4, "word"), (8, 8, "word"), (16, 4, "word")),
    C.REC_HVM_PARAMS: ((0, 4, "count"), (4, 4, "word"), (8, 8, "word"), (16, 8, "pfn")),
    C.REC_CHECKPOINT_DIRTY_PFN_LIST: ((0, 8, "pfn"),),
}
_LIBXL_BODY_FIELDS = {
    C.LIBXL_REC_EMULATOR_XENSTORE_DATA: ((0, 4, "marker"), (4, 4, "word")),
    C.LIBXL_REC_EMULATOR_CONTEXT: ((0, 4, "marker"), (4, 4, "word")),
    C.LIBXL_REC_CHECKPOINT_STATE: ((0, 4, "marker"),),
}


def _v2_record_fields(event, table) -> list[Field]:
    at = event.offset
    fields = [Field(at, 4, "type"), Field(at + 4, 4, "length")]
    body = at + C.RECORD_HEADER_SIZE
    for rel, size, kind in table.get(event.type, ((0, 4, "word"), (4, 4, "word"))):
        fields.append(Field(body + rel, size, kind))
    if table is _LIBXC_BODY_FIELDS and event.type == C.REC_PAGE_DATA:
        count = len(event.body.pfns) if hasattr(event.body, "pfns") else 0
        picked = sorted({*range(min(count, _ENTRIES_MAPPED - 1)), count - 1} - {-1})
        fields += [Field(body + 8 + 8 * i, 8, "pfn") for i in picked]
    return fields


def v2_layout(data: bytes) -> Layout:
    reader = V2Reader(layer="auto", strict=False, colo=True)
    reader.feed(data)
    reader.feed(b"")
    fields: list[Field] = []
    starts: list[int] = []
    checkpoints: list[int] = []
    try:
        while True:
            event = reader.next_event()
            if event is V2_NEED_DATA or isinstance(event, EndOfStream):
                break
            if isinstance(event, PagePayload):
                continue
            starts.append(event.offset)
            if isinstance(event, Header):
                fields += [Field(event.offset + rel, size, kind)
                           for rel, size, kind in _HEADER_FIELDS.get(type(event.header), ())]
            elif isinstance(event, LibxcRecord):
                fields += _v2_record_fields(event, _LIBXC_BODY_FIELDS)
                if event.type == C.REC_CHECKPOINT:
                    checkpoints.append(event.offset + C.RECORD_HEADER_SIZE)
            elif isinstance(event, LibxlRecord):
                fields += _v2_record_fields(event, _LIBXL_BODY_FIELDS)
                if event.type == C.LIBXL_REC_CHECKPOINT_END:
                    checkpoints.append(event.offset + C.RECORD_HEADER_SIZE)
            elif isinstance(event, SkippedRecord):
                fields += [Field(event.offset, 4, "type"), Field(event.offset + 4, 4, "length")]
    except V2StreamError as exc:
        if exc.offset is not None:
            starts.append(exc.offset)
    return _layout(data, fields, starts, checkpoints)


# ------------------------------------------------------------------ compression layout


def compression_layout(data: bytes) -> Layout:
    """The fuzz_legacy_compression input: header bytes, then the run markers of the compressed pages."""
    if len(data) < 3:
        return Layout((), (), ())
    count = data[0] % 32
    fields = [Field(0, 1, "count")] + [Field(1 + i, 1, "word") for i in range(count)]
    fields.append(Field(1 + count, 2, "word"))
    position = 3 + count
    starts = [position]
    while position < len(data) and len(fields) < 256:
        fields.append(Field(position, 1, "marker"))
        marker = data[position]
        if marker == 0x80:
            position += 1 + 4096
        elif marker == 0:
            position += 1
        else:  # a run: copy runs carry their words
            position += 1 + (0 if marker & 0x80 else (marker & 0x7F) * 4)
        starts.append(position)
    return _layout(data, fields, starts, [])


_LAYOUTS = {"v1": v1_layout, "v2": v2_layout, "compression": compression_layout}


class _LayoutCache:
    """Mapping an input costs a parse; the fuzzer mutates the same corpus entries over and over."""

    def __init__(self, size: int = 512):
        self._size = size
        self._entries: OrderedDict = OrderedDict()

    def get(self, data: bytes, kind: str) -> Layout:
        key = (kind, len(data), zlib.crc32(data))
        layout = self._entries.get(key)
        if layout is None:
            try:
                layout = _LAYOUTS[kind](data)
            except Exception:  # noqa: BLE001 - a mapping bug must not stop mutation; the targets find it
                layout = Layout((), (), ())
            self._entries[key] = layout
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return layout


_cache = _LayoutCache()


# ------------------------------------------------------------------ mutations


def _delete(data: bytes, layout: Layout, rng: random.Random) -> bytes:
    start, end = rng.choice(layout.elements)
    return data[:start] + data[end:]


def _duplicate(data: bytes, layout: Layout, rng: random.Random) -> bytes:
    start, end = rng.choice(layout.elements)
    return data[:end] + data[start:end] + data[end:]


def _swap(data: bytes, layout: Layout, rng: random.Random) -> bytes:
    if len(layout.elements) < 2:
        return _delete(data, layout, rng)
    i = rng.randrange(len(layout.elements) - 1)
    (a, b), (c, d) = layout.elements[i], layout.elements[i + 1]
    return data[:a] + data[c:d] + data[b:c] + data[a:b] + data[d:]


def _move(data: bytes, layout: Layout, rng: random.Random) -> bytes:
    start, end = rng.choice(layout.elements)
    piece, rest = data[start:end], data[:start] + data[end:]
    at = rng.choice([s for s, _ in layout.elements if s <= len(rest)] or [0])
    return rest[:at] + piece + rest[at:]


def _truncate(data: bytes, layout: Layout, rng: random.Random) -> bytes:
    cuts = [s for s, _ in layout.elements] + list(layout.checkpoints)
    at = rng.choice(cuts) + rng.choice((0, 0, 1, -1, 4, 8))
    return data[:max(0, at)]


_STRUCTURAL = (_delete, _duplicate, _swap, _move, _truncate)


def mutate(data: bytes, kind: str, rng: random.Random, max_size: int | None = None) -> bytes:
    """One structure-aware mutation of `data` (a stream of `kind`); the input itself if it has no structure."""
    layout = _cache.get(bytes(data), kind)
    out = bytes(data)
    if layout.fields and (not layout.elements or rng.random() < 0.7):
        for _ in range(1 if rng.random() < 0.8 else 2):
            out = _rewrite(out, rng.choice(layout.fields), rng)
    elif layout.elements:
        out = rng.choice(_STRUCTURAL)(out, layout, rng)
    if max_size is not None:
        out = out[:max_size]
    return out
