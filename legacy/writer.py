"""The legacy v1 writer: events back into the bytes a Xen 4.5 toolstack writes (spec sections 1-8).

`LegacyWriter(sink, width=...)` encodes each wire event of `xenstream.legacy.events` exactly as the
parser read it, so parse -> write is the identity on a valid stream; events that are not wire
(``WIRE = False``: detection, decoded pages, checkpoint boundaries) write nothing. Offsets in events are
ignored. The sink is anything with ``write(bytes-like)``; page payloads are handed to it as the
memoryviews the events hold, never copied.
"""

import struct
from typing import Callable

from xenstream.legacy import constants as c
from xenstream.legacy import events as ev

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_PARAM = struct.Struct("<iIQ")
_TSC = struct.Struct("<iIQII")
_XL_FIXED = struct.Struct("<32sIIII")
_LIBVIRT_FIXED = struct.Struct("<16sII")
_XEND_FIXED = struct.Struct(">16si")
_XENOPS_DM = struct.Struct(">22sI")
_TMEM_HEADER = struct.Struct("<iIIIIIII")
_TMEM_POOL = struct.Struct("<III16s")
_XSAVE_HEADER = struct.Struct("<QQ")
_HVM_MAGIC = struct.Struct("<QQQ")
_ALL_ONES = 0xFFFFFFFF
_OID_ALL_ONES = (1 << 64) - 1
_ULONG_FORMAT = {32: "I", 64: "Q"}


class LegacyWriter:
    """Writes v1 stream elements to `sink` from events, in the order given.

    ``width`` is the toolstack word size in bits (32 or 64), the size of every ``ulong`` field. It may be
    left None when the first event written is `Detected`, which then supplies it.
    """

    def __init__(self, sink, width: int | None = None):
        if width not in (None, 32, 64):
            raise ValueError(f"toolstack width must be 32 or 64, not {width!r}")
        self._write = sink.write
        self._width = width
        self._tmem_oid_words = 3
        self._handlers: dict[type, Callable] = {
            ev.XlHeader: self._xl_header,
            ev.XendHeader: self._xend_header,
            ev.LibvirtHeader: self._libvirt_header,
            ev.XenopsHeader: self._xenops_header,
            ev.P2mSize: self._p2m_size,
            ev.ExtendedInfo: self._extended_info,
            ev.P2mFrames: self._p2m_frames,
            ev.PageBatch: self._page_batch,
            ev.PageData: self._raw_data,
            ev.EnableVerifyMode: self._bare_chunk(c.CHUNK_ENABLE_VERIFY_MODE),
            ev.VcpuInfo: self._vcpu_info,
            ev.HvmParam: self._hvm_param,
            ev.TscInfo: self._tsc_info,
            ev.LastCheckpoint: self._bare_chunk(c.CHUNK_LAST_CHECKPOINT),
            ev.EnableCompression: self._bare_chunk(c.CHUNK_ENABLE_COMPRESSION),
            ev.CompressedData: self._compressed_data,
            ev.Toolstack: self._toolstack,
            ev.TmemHeader: self._tmem_header,
            ev.TmemPool: self._tmem_pool,
            ev.TmemPage: self._tmem_page,
            ev.TmemPoolPagesEnd: self._tmem_pool_pages_end,
            ev.TmemEnd: self._all_ones_u32,
            ev.TmemExtraStart: self._bare_chunk(c.CHUNK_TMEM_EXTRA),
            ev.TmemInvalidation: self._tmem_invalidation,
            ev.TmemExtraEnd: self._all_ones_u32,
            ev.EndOfBody: self._bare_chunk(0),
            ev.UnmappedPfns: self._unmapped_pfns,
            ev.VcpuBasic: self._raw_data,
            ev.VcpuExtended: self._raw_data,
            ev.VcpuXsave: self._vcpu_xsave,
            ev.SharedInfo: self._raw_data,
            ev.HvmMagicPfns: self._hvm_magic_pfns,
            ev.HvmContext: self._length_prefixed,
            ev.DeviceModelRecord0002: self._dm_record_with_length,
            ev.RemusDeviceModelState: self._dm_record_with_length,
            ev.QemuDeviceModelRecord: self._dm_record_to_eof,
            ev.XenopsQemuRecord: self._xenops_dm_record,
            ev.DeviceModelData: self._raw_data,
            ev.XlGoMessage: self._go_message,
            ev.TrailingData: self._raw_data,
        }

    @property
    def width(self) -> int | None:
        return self._width

    def write(self, event: ev.Event) -> None:
        if isinstance(event, ev.Detected):
            self._detected(event)
        if not event.WIRE:
            return
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"no v1 encoding for {type(event).__name__}")
        handler(event)

    def write_all(self, events) -> None:
        for event in events:
            self.write(event)

    # ---- helpers -----------------------------------------------------------------------------------

    def _ulong_format(self) -> str:
        if self._width is None:
            raise ValueError("toolstack width unknown: pass width= or write the Detected event first")
        return _ULONG_FORMAT[self._width]

    def _ulongs(self, values) -> bytes:
        return struct.pack(f"<{len(values)}{self._ulong_format()}", *values)

    def _ulong(self, value: int) -> bytes:
        return struct.pack(f"<{self._ulong_format()}", value)

    def _oid(self, words) -> bytes:
        return struct.pack(f"<{len(words)}Q", *words)

    def _bare_chunk(self, chunk_id: int) -> Callable:
        """A handler writing just the i32 id: chunks without payload, and the body terminator 0."""
        encoded = _I32.pack(chunk_id)

        def write_chunk_id(event) -> None:
            self._write(encoded)

        return write_chunk_id

    # ---- wrappers ----------------------------------------------------------------------------------

    def _detected(self, event: ev.Detected) -> None:
        if self._width is None:
            self._width = event.width
        elif self._width != event.width:
            raise ValueError(f"writer is for a {self._width}-bit toolstack, the stream is {event.width}-bit")

    def _xl_header(self, event: ev.XlHeader) -> None:
        self._write(_XL_FIXED.pack(c.XL_MAGIC, c.XL_BYTEORDER, event.mandatory_flags, event.optional_flags,
                                   len(event.optional_data)))
        self._write(event.optional_data)

    def _xend_header(self, event: ev.XendHeader) -> None:
        self._write(_XEND_FIXED.pack(c.XEND_MAGIC, len(event.config)) + event.config)

    def _libvirt_header(self, event: ev.LibvirtHeader) -> None:
        self._write(_LIBVIRT_FIXED.pack(c.LIBVIRT_MAGIC, event.version, len(event.xml)) + bytes(event.unused))
        self._write(event.xml)

    def _xenops_header(self, event: ev.XenopsHeader) -> None:
        self._write(c.XENOPS_MAGIC)

    def _go_message(self, event: ev.XlGoMessage) -> None:
        self._write(c.XL_GO_MESSAGE)

    # ---- header part -------------------------------------------------------------------------------

    def _p2m_size(self, event: ev.P2mSize) -> None:
        self._write(self._ulong(event.p2m_size))

    def _extended_info(self, event: ev.ExtendedInfo) -> None:
        out = bytearray(self._ulong((1 << self._width) - 1))
        out += _U32.pack(event.total)
        for block in event.blocks:
            out += block.block_id + _U32.pack(len(block.data)) + block.data
        self._write(out)

    def _p2m_frames(self, event: ev.P2mFrames) -> None:
        self._write(self._ulongs(event.frames))

    # ---- body --------------------------------------------------------------------------------------

    def _page_batch(self, event: ev.PageBatch) -> None:
        entries = event.entries
        ulong = self._ulong_format()
        if entries.typecode in ("I", "L", "Q") and entries.itemsize == self._width // 8:
            encoded = entries.tobytes()
        else:
            encoded = struct.pack(f"<{len(entries)}{ulong}", *entries)
        self._write(_I32.pack(len(entries)) + encoded)
        if event.payload is not None:
            if len(event.payload) != event.payload_length:
                raise ValueError(f"page batch payload holds {len(event.payload)} bytes, "
                                 f"its entries announce {event.payload_length}")
            self._write(event.payload)

    def _raw_data(self, event) -> None:
        self._write(event.data)

    def _vcpu_info(self, event: ev.VcpuInfo) -> None:
        self._write(struct.pack(f"<ii{len(event.vcpumap)}Q", c.CHUNK_VCPU_INFO, event.max_vcpu_id,
                                *event.vcpumap))

    def _hvm_param(self, event: ev.HvmParam) -> None:
        self._write(_PARAM.pack(event.chunk_id, event.pad, event.value))

    def _tsc_info(self, event: ev.TscInfo) -> None:
        self._write(_TSC.pack(c.CHUNK_TSC_INFO, event.tsc_mode, event.elapsed_nsec, event.gtsc_khz,
                              event.incarnation))

    def _compressed_data(self, event: ev.CompressedData) -> None:
        self._write(_I32.pack(c.CHUNK_COMPRESSED_DATA) + self._ulong(len(event.data)))
        self._write(event.data)

    def _toolstack(self, event: ev.Toolstack) -> None:
        self._write(struct.pack("<iI", c.CHUNK_TOOLSTACK, len(event.data)) + event.data)

    def _tmem_header(self, event: ev.TmemHeader) -> None:
        self._tmem_oid_words = event.oid_words
        self._write(_TMEM_HEADER.pack(c.CHUNK_TMEM, event.version, event.max_pools, _ALL_ONES,
                                      event.client_flags, event.weight, event.cap, _ALL_ONES))

    def _tmem_pool(self, event: ev.TmemPool) -> None:
        self._write(_TMEM_POOL.pack(event.pool_id, event.pool_flags, event.n_pages, event.uuid))

    def _tmem_page(self, event: ev.TmemPage) -> None:
        self._write(self._oid(event.oid) + _U32.pack(event.index))
        self._write(event.data)

    def _tmem_pool_pages_end(self, event: ev.TmemPoolPagesEnd) -> None:
        self._write(self._oid((_OID_ALL_ONES,) * self._tmem_oid_words))

    def _tmem_invalidation(self, event: ev.TmemInvalidation) -> None:
        self._write(_U32.pack(event.pool_id) + self._oid(event.oid) + _U32.pack(event.index))

    def _all_ones_u32(self, event) -> None:
        self._write(_U32.pack(_ALL_ONES))

    # ---- tails -------------------------------------------------------------------------------------

    def _unmapped_pfns(self, event: ev.UnmappedPfns) -> None:
        self._write(_U32.pack(len(event.pfns)) + self._ulongs(event.pfns))

    def _vcpu_xsave(self, event: ev.VcpuXsave) -> None:
        self._write(_XSAVE_HEADER.pack(event.xfeature_mask, event.size) + event.data)

    def _hvm_magic_pfns(self, event: ev.HvmMagicPfns) -> None:
        self._write(_HVM_MAGIC.pack(event.ioreq_pfn, event.bufioreq_pfn, event.store_pfn))

    def _length_prefixed(self, event) -> None:
        self._write(_U32.pack(len(event.data)) + event.data)

    def _dm_record_with_length(self, event: ev.DeviceModelRecord) -> None:
        self._write(event.signature + _U32.pack(event.length))

    def _dm_record_to_eof(self, event: ev.QemuDeviceModelRecord) -> None:
        self._write(event.signature)

    def _xenops_dm_record(self, event: ev.XenopsQemuRecord) -> None:
        self._write(_XENOPS_DM.pack(event.signature, event.length))
