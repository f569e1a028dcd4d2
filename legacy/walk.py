"""The walk over a v1 stream, element by element, as one generator (`Walker.run`).

The generator yields events and demands (`xenstream.legacy.demand`); the parser meets each demand from
its buffer and sends the bytes back. Writing the walk as straight-line code keeps the format visible:
wrapper, detection, header, then checkpoints of body (a chunk loop dispatched by table) and tail, then
the end rules of spec 5.3.

Fast path: a page batch costs a fixed number of C-level operations over its pfn_type array (bytes
translate, array max / count / set), never a Python loop over its entries or pages; the loops run only
to name the culprit once a check has failed.
"""

from __future__ import annotations

import array
import struct

from xenstream.hv import v1batch
from xenstream.hv.abi import PAGE_SIZE
from xenstream.hv.lazylog import get_logger
from xenstream.legacy import constants as c
from xenstream.legacy.buffer import InputBuffer
from xenstream.legacy.compression import CheckpointDecoder, PageStore
from xenstream.legacy.demand import InputEnded, Peek, Read, ReadOrEnd, ReadSome
from xenstream.legacy.detect import V1_PEEK, WRAPPER_PEEK, detect_guest, detect_width, guest_from_vcpu_block, identify_wrapper
from xenstream.legacy.errors import MalformedStream, UnsupportedStream
from xenstream.legacy.events import (
    CheckpointEnd,
    CompressedData,
    DecodedPages,
    Detected,
    DeviceModelData,
    DeviceModelEnd,
    DeviceModelRecord0002,
    EnableCompression,
    EnableVerifyMode,
    EndOfBody,
    EndOfStream,
    Evidence,
    ExtendedInfo,
    ExtendedInfoBlock,
    HvmContext,
    HvmMagicPfns,
    HvmParam,
    LastCheckpoint,
    LibvirtHeader,
    P2mFrames,
    P2mSize,
    PageBatch,
    QemuDeviceModelRecord,
    RemusDeviceModelState,
    SharedInfo,
    Toolstack,
    TrailingData,
    TscInfo,
    UnmappedPfns,
    VcpuBasic,
    VcpuExtended,
    VcpuInfo,
    VcpuXsave,
    XendHeader,
    XenopsHeader,
    XenopsQemuRecord,
    XlGoMessage,
    XlHeader,
)
from xenstream.legacy.tmem import walk_tmem, walk_tmem_extra
from xenstream.legacy.toolstack import decode_libxl_toolstack

_log = get_logger(__name__)


def _warn(event: str, **fields) -> None:
    _log.warning(event, **fields)


_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_ULONG = {4: struct.Struct("<I"), 8: struct.Struct("<Q")}
_ARRAY_CODE = {4: "I", 8: "Q"}
_XL_FIXED = struct.Struct("<32sIIII")
_XEND_FIXED = struct.Struct(">16si")
_LIBVIRT_FIXED = struct.Struct("<16sII40s")
_TSC = struct.Struct("<IQII")
_HVM_PARAM = struct.Struct("<IQ")
_MAGIC_PFNS = struct.Struct("<QQQ")
_XSAVE_HEADER = struct.Struct("<QQ")

# Tables over the top byte (bits 24-31) of pfn_type entries, for checks without a Python loop.
_UNDEFINED_TYPE_BYTES = bytes(range(0x50, 0x80))  # nibbles 5-7: "bogus page type"
_NO_DATA_TYPE_BYTES = bytes(range(0xD0, 0x100))  # BROKEN, XALLOC, XTAB
_PFN_BITS_OF_TOP_BYTE = bytes(b & 0x0F for b in range(256))

_DM_LENGTH_PREFIXED = {c.DM_SIG_LIBXL: DeviceModelRecord0002, c.DM_SIG_REMUS: RemusDeviceModelState}
_XENOPS_QEMU_PEEK = 1 + 4 + len(c.QEMU_STATE_MAGIC)  # "\n", big-endian length, "QEVM"


class Walker:
    def __init__(
        self,
        buffer: InputBuffer,
        width: int | None,
        guest: str | None,
        xl: bool | None,
        passthrough: bool,
        keep_all_pages: bool,
        device_model_optional: bool = False,
    ):
        self._buf = buffer
        self._width_option = width
        self._guest_option = guest
        self._xl_option = xl
        self._passthrough = passthrough
        self._keep_all_pages = keep_all_pages
        self._device_model_optional = device_model_optional
        self.detected: Detected | None = None
        self.checkpoints = 0  # complete checkpoints so far
        self.checkpoint_start: int | None = None  # offset of the current checkpoint from the 2nd on
        self._word = 0
        self._ulong: struct.Struct | None = None
        self._array_code = ""
        self._p2m_size = 0
        self._ext: ExtendedInfo | None = None
        self._store = PageStore()
        self._decoder: CheckpointDecoder | None = None
        self._compression_announced = False
        self._compressed = False
        self._verify = False
        self._last = False
        self._vcpu_info: VcpuInfo | None = None
        self._tmem_oid_words = 3
        self._chunk_handlers = {
            c.CHUNK_ENABLE_VERIFY_MODE: self._enable_verify_mode,
            c.CHUNK_VCPU_INFO: self._vcpu_info_chunk,
            c.CHUNK_TMEM: self._tmem,
            c.CHUNK_TMEM_EXTRA: self._tmem_extra,
            c.CHUNK_TSC_INFO: self._tsc_info,
            c.CHUNK_LAST_CHECKPOINT: self._last_checkpoint,
            c.CHUNK_COMPRESSED_DATA: self._compressed_data,
            c.CHUNK_ENABLE_COMPRESSION: self._enable_compression,
            c.CHUNK_TOOLSTACK: self._toolstack,
        }
        self._chunk_handlers.update({chunk_id: self._hvm_param for chunk_id in c.HVM_PARAM_CHUNKS})
        self._wrapper_readers = {
            "none": self._no_wrapper,
            "xl": self._xl_header,
            "xend": self._xend_header,
            "libvirt": self._libvirt_header,
            "xenops": self._xenops_header,
        }

    # ---------------------------------------------------------------------------------------------
    # The whole stream
    # ---------------------------------------------------------------------------------------------

    def run(self):
        head = yield Peek(WRAPPER_PEEK)
        wrapper, wrapper_evidence = identify_wrapper(head, self._xl_option)
        yield from self._wrapper_readers[wrapper]()
        yield from self._detect(wrapper, wrapper_evidence)
        yield from self._header()
        index = 1
        while True:
            start = self._buf.offset
            first = None
            if index > 1:
                self.checkpoint_start = start
                first = yield ReadOrEnd(4, "a chunk id")
                if first is None:
                    yield EndOfStream(index - 1, "end-of-input", offset=start)
                    return
            to_end_of_input = yield from self._checkpoint(start, first)
            self.checkpoints = index
            yield CheckpointEnd(index, self._last, offset=self._buf.offset)
            if to_end_of_input or self._last:
                reason = to_end_of_input or "last-checkpoint"
                yield EndOfStream(index, reason, offset=self._buf.offset)
                break
            if index == 1 and self._compression_announced:
                self._compressed = True  # the restorer switches after the first checkpoint's tail only
            index += 1
        self.checkpoint_start = None
        yield from self._after_end()

    def _after_end(self):
        """What follows the logical end (spec 1.4, 5.3): reported, not interpreted."""
        while True:
            at = self._buf.offset
            head = yield Peek(len(c.XL_GO_MESSAGE))
            if not head:
                return
            if head == c.XL_GO_MESSAGE:
                yield Read(len(head), "the xl go message")
                yield XlGoMessage(offset=at)
                continue
            piece = yield ReadSome(c.DEVICE_MODEL_PIECE)
            yield TrailingData(piece, offset=at)

    # ---------------------------------------------------------------------------------------------
    # Wrappers (spec 1, 1.5)
    # ---------------------------------------------------------------------------------------------

    def _no_wrapper(self):
        return
        yield

    def _xl_header(self):
        raw = yield Read(_XL_FIXED.size, "the xl header")
        _magic, byteorder, mandatory, optional, data_len = _XL_FIXED.unpack(raw)
        if byteorder != c.XL_BYTEORDER:
            raise MalformedStream(f"xl header byte-order word {byteorder:#010x} (only 0x01020304 is valid)", 32)
        if mandatory & c.XL_FLAG_STREAMV2:
            raise UnsupportedStream("the xl header flags a v2 payload (mandatory flag STREAMV2)", 36)
        if mandatory & ~c.XL_KNOWN_MANDATORY_FLAGS:
            raise UnsupportedStream(f"the xl header has unknown mandatory flags {mandatory:#x}", 36)
        if data_len > c.MAX_WRAPPER_DATA:
            raise MalformedStream(f"xl optional data of {data_len} bytes is beyond sane bounds", 44)
        data = bytes((yield Read(data_len, "the xl optional data")))
        if data_len:
            if data_len < 4:
                raise MalformedStream(f"xl optional data of {data_len} bytes cannot hold its config length", 48)
            config_len = _U32.unpack_from(data)[0]
            if 4 + config_len > data_len:
                raise MalformedStream(
                    f"xl config length {config_len} overruns the {data_len} bytes of optional data", 48
                )
        yield XlHeader(mandatory, optional, data, offset=0)

    def _xend_header(self):
        _magic, length = _XEND_FIXED.unpack((yield Read(_XEND_FIXED.size, "the xend header")))
        if not 0 <= length <= c.MAX_WRAPPER_DATA:
            raise MalformedStream(f"xend config length {length} is beyond sane bounds", 16)
        config = bytes((yield Read(length, "the xend config")))
        yield XendHeader(config, offset=0)

    def _libvirt_header(self):
        raw = yield Read(_LIBVIRT_FIXED.size, "the libvirt header")
        _magic, version, xml_len, unused = _LIBVIRT_FIXED.unpack(raw)
        if version == c.LIBVIRT_VERSION_V2:
            raise UnsupportedStream("the libvirt header announces a v2 libxl stream (version 2)", 16)
        if version != c.LIBVIRT_VERSION_V1:
            raise UnsupportedStream(f"libvirt save image version {version} (known: 1)", 16)
        if xml_len > c.MAX_WRAPPER_DATA:
            raise MalformedStream(f"libvirt domain XML of {xml_len} bytes is beyond sane bounds", 20)
        xml = bytes((yield Read(xml_len, "the libvirt domain XML")))
        yield LibvirtHeader(version, xml, unused, offset=0)

    def _xenops_header(self):
        yield Read(len(c.XENOPS_MAGIC), "the xenopsd signature")
        yield XenopsHeader(offset=0)

    # ---------------------------------------------------------------------------------------------
    # Detection and the header part (spec 10, 2.1-2.3)
    # ---------------------------------------------------------------------------------------------

    def _detect(self, wrapper: str, wrapper_evidence: Evidence):
        at = self._buf.offset
        head = yield Peek(V1_PEEK)
        width, width_evidence = detect_width(head, at, self._width_option)
        self._word = width // 8
        self._ulong = _ULONG[self._word]
        self._array_code = _ARRAY_CODE[self._word]
        guest, guest_evidence = detect_guest(head, at, self._word, self._guest_option)
        evidence = [wrapper_evidence, width_evidence, guest_evidence]
        guest_width = pt_levels = None
        if guest == "pv":
            found = guest_from_vcpu_block(head, self._word)
            if found:
                guest_width, pt_levels = found
                size = _U32.unpack_from(head, 2 * self._word + 8)[0]
                evidence.append(
                    Evidence("guest_width", str(guest_width * 8), "detected", f'"vcpu" block of {size:#x} bytes')
                )
        self.detected = Detected(wrapper, width, guest, guest_width, pt_levels, tuple(evidence), offset=at)
        yield self.detected

    def _header(self):
        at = self._buf.offset
        (p2m_size,) = self._ulong.unpack((yield Read(self._word, "p2m_size")))
        if p2m_size > c.MAX_P2M_SIZE:
            raise MalformedStream(f"p2m_size {p2m_size:#x} exceeds {c.MAX_P2M_SIZE:#x}", at)
        if not p2m_size and self.detected.guest == "pv":
            # no pfn at all: no p2m frame, no start-info page (a given --width skips detection's vetting)
            raise MalformedStream("p2m_size 0: a PV guest has at least one pfn", at)
        self._p2m_size = p2m_size
        yield P2mSize(p2m_size, offset=at)
        if self.detected.guest != "pv":
            return
        self._ext = yield from self._extended_info()
        at = self._buf.offset
        per_frame = PAGE_SIZE // self._ext.guest_width
        count = -(-p2m_size // per_frame)
        raw = yield Read(count * self._word, f"the p2m frame list ({count} entries)")
        frames = self._ulongs(raw)
        if frames and max(frames) >= p2m_size:
            index = next(i for i, pfn in enumerate(frames) if pfn >= p2m_size)
            raise MalformedStream(
                f"p2m frame list entry {index} is pfn {frames[index]:#x}, beyond p2m_size {p2m_size:#x}",
                at + index * self._word,
            )
        yield P2mFrames(tuple(frames), offset=at)

    def _extended_info(self):
        at = self._buf.offset
        marker = yield Read(self._word, "the extended-info marker")
        if marker != b"\xff" * self._word:
            raise UnsupportedStream(
                "PV stream without the extended-info block (written by tools older than Xen 4.0)", at
            )
        (total,) = _U32.unpack((yield Read(4, "the extended-info length")))
        if total > c.MAX_EXTENDED_INFO_TOTAL:
            raise MalformedStream(f"extended-info length {total} is beyond sane bounds", at + self._word)
        blocks = []
        remaining = total
        while remaining:
            block_at = self._buf.offset
            if remaining < 8:
                raise MalformedStream(
                    f"{remaining} bytes left of the extended-info block: too few for a block header", block_at
                )
            block_id, size = struct.unpack("<4sI", (yield Read(8, "an extended-info block header")))
            if size + 8 > remaining:
                raise MalformedStream(
                    f"extended-info block {block_id!r} of {size} bytes overruns the declared length "
                    f"({remaining - 8} bytes left)",
                    block_at,
                )
            data = bytes((yield Read(size, f"extended-info block {block_id!r}")))
            self._check_extended_block(block_id, data, block_at)
            blocks.append(ExtendedInfoBlock(block_id, data))
            remaining -= 8 + size
        ext = ExtendedInfo(total, tuple(blocks), offset=at)
        if ext.block(c.EXT_BLOCK_VCPU) is None:
            raise MalformedStream('the extended-info block has no "vcpu" block', at)
        yield ext
        return ext

    @staticmethod
    def _check_extended_block(block_id: bytes, data: bytes, at: int) -> None:
        if block_id == c.EXT_BLOCK_VCPU and len(data) not in c.GUEST_BY_VCPU_CONTEXT_SIZE:
            raise MalformedStream(f'"vcpu" block of {len(data):#x} bytes (0xaf0 or 0x1430 expected)', at)
        if block_id == c.EXT_BLOCK_XCNT:
            if len(data) != 4:
                raise MalformedStream(f'"xcnt" block of {len(data)} bytes (4 expected)', at)
            (record,) = _U32.unpack(data)
            if record and not c.XSAVE_HEADER_SIZE <= record <= c.MAX_XSAVE_RECORD:
                raise MalformedStream(f'"xcnt" xsave record size {record} is out of bounds', at + 8)

    # ---------------------------------------------------------------------------------------------
    # One checkpoint: body (spec 2.4) and tail (spec 3, 4.3, 4.4)
    # ---------------------------------------------------------------------------------------------

    def _checkpoint(self, start: int, first: memoryview | None):
        """Returns the EndOfStream reason when the checkpoint ran to the end of input (QemuDeviceModelRecord,
        or no device-model record at all where that is allowed), else False.

        The VCPU map is the last VCPU_INFO's, kept across checkpoints as the 4.5 restorer keeps it
        (its pagebuf is never reset); before any VCPU_INFO only VCPU 0 has a record.
        """
        self._decoder = CheckpointDecoder(self._store) if self._compressed else None
        raw, at = first, start
        while True:
            if raw is None:
                at = self._buf.offset
                raw = yield Read(4, "a chunk id")
            (chunk_id,) = _I32.unpack(raw)
            raw = None
            if chunk_id > 0:
                yield from self._batch(chunk_id, at)
            elif chunk_id == 0:
                if self._decoder is not None:
                    self._decoder.finish(at)
                yield EndOfBody(offset=at)
                break
            else:
                handler = self._chunk_handlers.get(chunk_id)
                if handler is None:
                    raise MalformedStream(f"unknown chunk id {chunk_id}", at)
                yield from handler(chunk_id, at)
        if self.detected.guest == "pv":
            yield from self._pv_tail()
            return False
        yield from self._hvm_tail()
        return (yield from self._device_model_record())

    def _batch(self, count: int, at: int):
        if count > c.MAX_BATCH_SIZE:
            raise MalformedStream(f"page batch of {count} entries exceeds the maximum of {c.MAX_BATCH_SIZE}", at)
        raw = yield Read(count * self._word, f"the pfn_type array of a {count}-entry batch")
        entries = self._ulongs(raw)
        data_pages = self._check_entries(entries, raw, at + 4)
        if self._decoder is not None:
            self._decoder.announce(entries)
            yield PageBatch(entries, None, True, data_pages, offset=at)
            return
        length = data_pages * PAGE_SIZE
        if self._passthrough:
            yield PageBatch(entries, None, False, data_pages, offset=at)  # the parser counts its payload out
            return
        payload = (yield Read(length, f"the page data of a {count}-entry batch")) if length else memoryview(b"")
        if self._keep_all_pages and not self._verify:
            self._store.put_batch(entries, payload)
        yield PageBatch(entries, payload, False, data_pages, offset=at)

    def _ulongs(self, raw: memoryview) -> array.array:
        values = array.array(self._array_code)
        values.frombytes(raw)  # array(code, memoryview) would take the bytes one by one
        return values

    def _check_entries(self, entries: array.array, raw: memoryview, at: int) -> int:
        """Validate a pfn_type array without a per-entry loop; return the count of data pages."""
        word = self._word
        counted = v1batch.check_legacy_batch(raw, word, self._p2m_size)  # compiled; None: decide here
        if counted is not None:
            return counted
        top = bytes(raw[3::word])
        if len(top.translate(None, _UNDEFINED_TYPE_BYTES)) != len(top):
            index = next(i for i, byte in enumerate(top) if 0x50 <= byte < 0x80)
            raise MalformedStream(f"pfn_type entry {index} has the undefined page type {top[index] >> 4:#x}", at + index * word)
        if word == 8 and max(entries) > 0xFFFFFFFF:
            index = next(i for i, entry in enumerate(entries) if entry > 0xFFFFFFFF)
            raise MalformedStream(f"pfn_type entry {index} has non-zero upper 32 bits", at + index * word)
        masked = bytearray(raw)
        masked[3::word] = top.translate(_PFN_BITS_OF_TOP_BYTE)
        pfns = array.array(self._array_code, masked)
        if max(pfns) >= self._p2m_size:
            self._name_out_of_range(entries, at)
        xtab = entries.count(c.XTAB_ENTRY)
        distinct = len(set(pfns))
        if xtab and pfns.count(0) == xtab:
            distinct -= 1  # the zeros are the XTAB entries' empty PFN fields, not a real pfn 0
        if distinct != len(entries) - xtab:
            self._name_duplicate(entries, at)
        return len(top.translate(None, _NO_DATA_TYPE_BYTES))

    def _name_out_of_range(self, entries: array.array, at: int) -> None:
        for index, entry in enumerate(entries):
            pfn = entry & c.PFN_MASK
            if entry >> c.TYPE_SHIFT != 0xF and pfn >= self._p2m_size:
                raise MalformedStream(
                    f"pfn {pfn:#x} (entry {index}) is beyond p2m_size {self._p2m_size:#x}", at + index * self._word
                )

    def _name_duplicate(self, entries: array.array, at: int) -> None:
        seen = set()
        for index, entry in enumerate(entries):
            if entry == c.XTAB_ENTRY:
                continue
            pfn = entry & c.PFN_MASK
            if pfn in seen:
                raise MalformedStream(f"pfn {pfn:#x} appears twice in one batch (entry {index})", at + index * self._word)
            seen.add(pfn)

    # --- negative chunks, dispatched by id ------------------------------------------------------

    def _enable_verify_mode(self, chunk_id: int, at: int):
        self._verify = True
        yield EnableVerifyMode(offset=at)

    def _vcpu_info_chunk(self, chunk_id: int, at: int):
        (max_vcpu_id,) = _I32.unpack((yield Read(4, "the VCPU_INFO max_vcpu_id")))
        if not 0 <= max_vcpu_id <= c.MAX_VCPU_ID:
            raise MalformedStream(f"VCPU_INFO max_vcpu_id {max_vcpu_id} is outside 0..{c.MAX_VCPU_ID}", at + 4)
        words = max_vcpu_id // 64 + 1
        vcpumap = struct.unpack(f"<{words}Q", (yield Read(8 * words, "the VCPU_INFO bitmap")))
        self._vcpu_info = VcpuInfo(max_vcpu_id, vcpumap, offset=at)
        yield self._vcpu_info

    def _hvm_param(self, chunk_id: int, at: int):
        pad, value = _HVM_PARAM.unpack((yield Read(_HVM_PARAM.size, f"the {c.CHUNK_NAMES[chunk_id]} chunk")))
        yield HvmParam(chunk_id, value, pad, offset=at)

    def _tmem(self, chunk_id: int, at: int):
        self._tmem_oid_words = yield from walk_tmem(self._buf, at)

    def _tmem_extra(self, chunk_id: int, at: int):
        yield from walk_tmem_extra(self._buf, at, self._tmem_oid_words)

    def _tsc_info(self, chunk_id: int, at: int):
        yield TscInfo(*_TSC.unpack((yield Read(_TSC.size, "the TSC_INFO chunk"))), offset=at)

    def _last_checkpoint(self, chunk_id: int, at: int):
        self._last = True
        yield LastCheckpoint(offset=at)

    def _enable_compression(self, chunk_id: int, at: int):
        self._compression_announced = True
        yield EnableCompression(offset=at)

    def _compressed_data(self, chunk_id: int, at: int):
        (length,) = self._ulong.unpack((yield Read(self._word, "the COMPRESSED_DATA length")))
        if length > c.MAX_COMPRESSED_CHUNK:
            raise MalformedStream(
                f"COMPRESSED_DATA length {length} is beyond the saver's {c.MAX_COMPRESSED_CHUNK}-byte buffer", at + 4
            )
        if self._decoder is None:
            raise MalformedStream(
                "COMPRESSED_DATA in a checkpoint that is not compressed (no ENABLE_COMPRESSION in checkpoint 1)", at
            )
        data = (yield Read(length, "the COMPRESSED_DATA payload")) if length else memoryview(b"")
        yield CompressedData(data, offset=at)
        entries, pages = self._decoder.decode(data, at + 4 + self._word)
        if entries:
            yield DecodedPages(entries, pages, offset=at)

    def _toolstack(self, chunk_id: int, at: int):
        (length,) = _U32.unpack((yield Read(4, "the TOOLSTACK length")))
        if not 0 < length <= c.MAX_TOOLSTACK:
            raise MalformedStream(f"TOOLSTACK length {length} is out of bounds (1..{c.MAX_TOOLSTACK})", at + 4)
        data = bytes((yield Read(length, "the TOOLSTACK data")))
        libxl = decode_libxl_toolstack(data, self._word * 8, at + 8)
        if libxl is not None and libxl.width != self._word * 8:
            _warn("toolstack blob is in the other width's layout", offset=at, layout=libxl.width)
        yield Toolstack(data, libxl, offset=at)

    # --- tails -----------------------------------------------------------------------------------

    def _pv_tail(self):
        at = self._buf.offset
        (count,) = _U32.unpack((yield Read(4, "the unmapped pfn count")))
        if count > self._p2m_size:
            raise MalformedStream(f"unmapped pfn count {count} exceeds p2m_size {self._p2m_size:#x}", at)
        raw = yield Read(count * self._word, f"the unmapped pfn list ({count} entries)")
        yield UnmappedPfns(tuple(self._ulongs(raw)), offset=at)
        ext = self._ext
        context_size = ext.vcpu_context_size
        xsave_size = ext.xsave_record_size
        for vcpu in self._vcpu_info.online if self._vcpu_info else (0,):
            at = self._buf.offset
            data = bytes((yield Read(context_size, f"VCPU {vcpu}'s basic context")))
            yield VcpuBasic(vcpu, data, offset=at)
            if ext.has_extended_context:
                at = self._buf.offset
                data = bytes((yield Read(c.EXTENDED_CONTEXT_SIZE, f"VCPU {vcpu}'s extended context")))
                yield VcpuExtended(vcpu, data, offset=at)
            if xsave_size:
                at = self._buf.offset
                raw = yield Read(xsave_size, f"VCPU {vcpu}'s xsave record")
                mask, size = _XSAVE_HEADER.unpack_from(raw)
                if size != xsave_size - c.XSAVE_HEADER_SIZE:
                    # tolerated (spec 9.1.8): the record is "xcnt" bytes whatever it says, as the restorer reads it
                    _warn("xsave record size differs from xcnt", vcpu=vcpu, size=size, xcnt=xsave_size, offset=at)
                yield VcpuXsave(vcpu, mask, size, bytes(raw[c.XSAVE_HEADER_SIZE :]), offset=at)
        at = self._buf.offset
        data = bytes((yield Read(c.SHARED_INFO_SIZE, "the shared info page")))
        yield SharedInfo(data, offset=at)

    def _hvm_tail(self):
        at = self._buf.offset
        magic = _MAGIC_PFNS.unpack((yield Read(_MAGIC_PFNS.size, "the HVM magic pfns")))
        yield HvmMagicPfns(*magic, offset=at)
        at = self._buf.offset
        (length,) = _U32.unpack((yield Read(4, "the HVM context length")))
        if length > c.MAX_HVM_CONTEXT:
            raise MalformedStream(f"HVM context of {length} bytes is beyond sane bounds", at)
        if not length:  # Xen's hvm_load refuses a context without even its header record
            raise MalformedStream("HVM context is empty", at)
        data = bytes((yield Read(length, "the HVM context")))
        yield HvmContext(data, offset=at)

    def _device_model_record(self):
        """The record after the HVM tail (spec 4.4); returns the EndOfStream reason when it ran to the end
        of input, else False."""
        at = self._buf.offset
        if self._device_model_optional and not (yield Peek(c.DM_SIGNATURE_LEN)):
            return "no-device-model"  # a bare libxc stream: libxl / xend append the record, libxc does not
        signature = bytes((yield Read(c.DM_SIGNATURE_LEN, "the device-model signature")))
        record_class = _DM_LENGTH_PREFIXED.get(signature)
        if record_class is not None:
            (length,) = _U32.unpack((yield Read(4, "the device-model record length")))
            yield record_class(length, offset=at)
            yield from self._device_model_state(length)
            return False
        if signature != c.DM_SIG_QEMU:
            raise MalformedStream(f"unknown device-model signature {signature!r}", at)
        head = yield Peek(_XENOPS_QEMU_PEEK)
        if head[:1] == b"\n" and head[5:] == c.QEMU_STATE_MAGIC:
            yield Read(1, "the xenopsd signature newline")
            (length,) = struct.unpack(">I", (yield Read(4, "the xenopsd qemu record length")))
            yield XenopsQemuRecord(length, offset=at)
            yield from self._device_model_state(length)
            return False
        wanted = _XENOPS_QEMU_PEEK if head[:1] == b"\n" else len(c.QEMU_STATE_MAGIC)
        if len(head) < wanted:  # a peek comes back short only at the end of input
            raise InputEnded("the qemu record header", wanted, len(head), at + c.DM_SIGNATURE_LEN)
        if head[: len(c.QEMU_STATE_MAGIC)] != c.QEMU_STATE_MAGIC:
            raise MalformedStream(
                f"qemu state after QemuDeviceModelRecord starts with {head[:4]!r}, not QEVM", at + c.DM_SIGNATURE_LEN
            )
        yield QemuDeviceModelRecord(offset=at)
        total = 0
        while True:
            piece_at = self._buf.offset
            piece = yield ReadSome(c.DEVICE_MODEL_PIECE)
            if not piece:
                break
            total += len(piece)
            yield DeviceModelData(piece, offset=piece_at)
        yield DeviceModelEnd(total, offset=self._buf.offset)
        return "device-model-to-eof"

    def _device_model_state(self, length: int):
        remaining = length
        while remaining:
            at = self._buf.offset
            piece = yield Read(min(remaining, c.DEVICE_MODEL_PIECE), "the device-model state")
            remaining -= len(piece)
            yield DeviceModelData(piece, offset=at)
        yield DeviceModelEnd(length, offset=self._buf.offset)
