"""Events of a legacy v1 stream: one small frozen class per stream element, in stream order.

The parser (`xenstream.legacy.parser.LegacyParser`) turns bytes into these; the writer
(`xenstream.legacy.writer`) turns them back into bytes. The contract between the two:

* Every event with ``WIRE = True`` stands for exactly the bytes it was parsed from, and holds every raw
  field needed to write them again byte for byte (pads, unknown blocks, the toolstack blob with its
  uninitialised gaps, the exact COMPRESSED_DATA payloads). Integers are the values as read; widths
  that are not in the event (ulong = W) come from the `Detected` event of the same stream.
* Events with ``WIRE = False`` are derived facts the parser adds (what it detected, where a
  checkpoint ended, decoded pages of a compressed checkpoint); a writer skips them.
* Every event carries ``offset``: the stream offset (from byte 0 of the input, wrappers included)
  where its element begins. It is keyword-only and excluded from equality, so events built by hand
  compare equal to parsed ones; compare ``offset`` separately where it matters.

Stream order (spec 0.3). ``[...]`` optional, ``*`` repeated:

    [XlHeader | XendHeader | LibvirtHeader | XenopsHeader]   wrappers (spec 1, 1.5)
    Detected                                                 not wire: variant + evidence
    P2mSize
    PV:  ExtendedInfo, P2mFrames
    checkpoint*:
        body: (PageBatch [PageData*] | <chunk event> | CompressedData DecodedPages*)*  EndOfBody
        PV tail:  UnmappedPfns, (VcpuBasic [VcpuExtended] [VcpuXsave])*, SharedInfo
        HVM tail: HvmMagicPfns, HvmContext, DeviceModelRecord DeviceModelData* DeviceModelEnd
                  (DeviceModelRecord is one of DeviceModelRecord0002, RemusDeviceModelState,
                  QemuDeviceModelRecord, XenopsQemuRecord)
        CheckpointEnd                                        not wire
    EndOfStream                                              not wire
    [XlGoMessage] [TrailingData*]                            only if input follows the logical end

Chunk events: EnableVerifyMode (-1), VcpuInfo (-2), HvmParam (-3 -4 -8 -10 -11 -14..-17 -19..-21),
Tmem* (-5), TmemExtra* (-6), TscInfo (-7), LastCheckpoint (-9), CompressedData (-12),
EnableCompression (-13), Toolstack (-18).

Page payloads. A `PageBatch` holds the raw `pfn_type` entries (`array.array`, one int per entry, type
nibble in bits 28-31) and either

* ``payload``: a read-only memoryview of its ``payload_length`` bytes of page data (buffered mode: a
  view of the fed bytes, joined once only when the batch straddles two fed chunks), or
* ``payload is None``: the payload follows in the stream (passthrough mode, see the parser), or is
  carried by later COMPRESSED_DATA chunks when ``compressed`` (then ``payload_length == 0``).
"""

from __future__ import annotations

import array
from typing import ClassVar

import attrs

from xenstream.hv.abi import PAGE_SIZE, pagetype_name
from xenstream.legacy import constants as c

_NO_DATA_TYPE_BYTES = bytes(range(0xD0, 0x100))  # top byte of an entry whose nibble is D, E or F


def _short(value) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, array.array):
        return f"<{len(value)} entries>"
    return repr(value)


def _blob(**kwargs):
    return attrs.field(repr=_short, **kwargs)


@attrs.frozen
class Event:
    """Base of every v1 event."""

    WIRE: ClassVar[bool] = True
    offset: int = attrs.field(default=0, eq=False, kw_only=True)


# --------------------------------------------------------------------------------------------------
# Wrappers and detection
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class XlHeader(Event):
    """xl save-file header (spec 1): magic, byte order, flags, then ``optional_data`` verbatim."""

    mandatory_flags: int
    optional_flags: int
    optional_data: bytes = _blob()

    @property
    def config(self) -> bytes | None:
        """The embedded domain config (JSON with its NUL for xl 4.5, config text before), if any."""
        if len(self.optional_data) < 4:
            return None
        length = int.from_bytes(self.optional_data[:4], "little")
        return bytes(self.optional_data[4 : 4 + length])

    @property
    def config_is_json(self) -> bool:
        return bool(self.mandatory_flags & c.XL_FLAG_JSON)


@attrs.frozen
class XendHeader(Event):
    """xend's "LinuxGuestRecord" + big-endian i32 length + S-expression config (spec 1.5)."""

    config: bytes = _blob()


@attrs.frozen
class LibvirtHeader(Event):
    """libvirt libxl driver header: magic, u32 version, u32 xml length, 40 unused bytes, the XML."""

    version: int
    xml: bytes = _blob()
    unused: bytes = _blob(default=bytes(40))


@attrs.frozen
class XenopsHeader(Event):
    """XenServer classic xenopsd's "XenSavedDomain\\n" signature in front of the libxc stream."""


@attrs.frozen
class Evidence:
    """Why the parser believes one property of the stream: given as an option, or read from bytes."""

    what: str  # "wrapper", "width", "guest", "guest_width"
    value: str
    source: str  # "option" or "detected"
    reason: str


@attrs.frozen
class Detected(Event):
    """The variant of the stream and the evidence for each property (spec 10). Not wire.

    ``offset`` is where the v1 libxc stream proper begins (after any wrapper).
    ``guest_width`` / ``pt_levels`` are known for PV streams only (from the "vcpu" block size).
    """

    WIRE: ClassVar[bool] = False
    wrapper: str  # "none", "xl", "xend", "libvirt", "xenops"
    width: int  # toolstack word size in bits: 32 or 64
    guest: str  # "pv" or "hvm"
    guest_width: int | None = None  # bytes: 4 or 8
    pt_levels: int | None = None
    evidence: tuple[Evidence, ...] = ()

    @property
    def word_size(self) -> int:
        return self.width // 8


# --------------------------------------------------------------------------------------------------
# Header part of the libxc stream
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class P2mSize(Event):
    """`p2m_size` (ulong): highest PFN + 1 (spec 2.1)."""

    p2m_size: int


@attrs.frozen
class ExtendedInfoBlock:
    """One block of the extended-info area: 4-byte id, u32 size, data (spec 2.2)."""

    block_id: bytes
    data: bytes = _blob()


@attrs.frozen
class ExtendedInfo(Event):
    """PV extended-info: ulong all-ones marker, u32 total, blocks in stream order (spec 2.2).

    ``total`` is as read; a well-formed block list consumes exactly ``total`` bytes.
    """

    total: int
    blocks: tuple[ExtendedInfoBlock, ...]

    def block(self, block_id: bytes) -> ExtendedInfoBlock | None:
        for entry in self.blocks:
            if entry.block_id == block_id:
                return entry
        return None

    @property
    def vcpu_context_size(self) -> int:
        return len(self.block(c.EXT_BLOCK_VCPU).data)

    @property
    def guest_width(self) -> int:
        return c.GUEST_BY_VCPU_CONTEXT_SIZE[self.vcpu_context_size][0]

    @property
    def pt_levels(self) -> int:
        return c.GUEST_BY_VCPU_CONTEXT_SIZE[self.vcpu_context_size][1]

    @property
    def has_extended_context(self) -> bool:
        return self.block(c.EXT_BLOCK_EXTV) is not None

    @property
    def xsave_record_size(self) -> int:
        """Bytes of each VCPU's xsave record in the tail ("xcnt" value), 0 without "xcnt"."""
        xcnt = self.block(c.EXT_BLOCK_XCNT)
        return 0 if xcnt is None else int.from_bytes(xcnt.data[:4], "little")


@attrs.frozen
class P2mFrames(Event):
    """The p2m frame list: ceil(p2m_size / (4096/G)) ulong PFNs (spec 2.3)."""

    frames: tuple[int, ...] = _blob()


# --------------------------------------------------------------------------------------------------
# Body: page batches
# --------------------------------------------------------------------------------------------------


def count_data_pages(entries: array.array) -> int:
    """Entries whose type carries a 4096-byte page (not XTAB, XALLOC, BROKEN), without a Python loop."""
    raw = entries.tobytes()
    top = raw[3 :: entries.itemsize]  # little endian: bits 24-31 of every entry
    return len(top.translate(None, _NO_DATA_TYPE_BYTES))


class _EntryAccess:
    """PFN / type views over raw `pfn_type` entries (computed per entry: for consumers, not the parser)."""

    entries: array.array

    @property
    def pfns(self) -> list[int]:
        return [entry & c.PFN_MASK for entry in self.entries]

    @property
    def types(self) -> list[int]:
        return [(entry >> c.TYPE_SHIFT) & 0xF for entry in self.entries]

    def type_names(self) -> list[str]:
        return [pagetype_name(t) for t in self.types]


@attrs.frozen
class PageBatch(_EntryAccess, Event):
    """A page batch: i32 count, count ulong `pfn_type` entries, then the data pages (spec 2.4.1).

    ``entries`` are the raw values (PFN in bits 0-27, type nibble in bits 28-31; W = 8 entries have a
    zero upper half). ``data_pages`` counts the entries that carry data. ``compressed`` marks a Format B
    batch (spec 6): its pages travel in COMPRESSED_DATA and come out as `DecodedPages`.
    """

    entries: array.array = _blob()
    payload: memoryview | None = _blob(default=None)
    compressed: bool = False
    data_pages: int = attrs.field(
        default=attrs.Factory(lambda self: count_data_pages(self.entries), takes_self=True)
    )

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def payload_length(self) -> int:
        """Page-data bytes that follow the entry array in the stream (0 for Format B)."""
        return 0 if self.compressed else self.data_pages * PAGE_SIZE


@attrs.frozen
class PageData(Event):
    """Passthrough mode only: a piece of the preceding `PageBatch`'s payload, as fed (memoryview)."""

    data: memoryview = _blob()


@attrs.frozen
class DecodedPages(_EntryAccess, Event):
    """Pages of a compressed checkpoint, decoded (spec 6). Not wire: the bytes are `CompressedData`.

    ``entries`` are the data-bearing `pfn_type` entries the pages belong to, in stream order;
    ``payload`` holds len(entries) x 4096 bytes of their decoded contents. ``offset`` is that of the
    COMPRESSED_DATA chunk that completed them.
    """

    WIRE: ClassVar[bool] = False
    entries: array.array = _blob()
    payload: bytes = _blob()


# --------------------------------------------------------------------------------------------------
# Body: negative chunks
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class EnableVerifyMode(Event):
    """-1: every page after this is a verification copy, not new state."""


@attrs.frozen
class VcpuInfo(Event):
    """-2: i32 max_vcpu_id, then max_vcpu_id/64 + 1 u64 bitmap words of the VCPUs in the tail."""

    max_vcpu_id: int
    vcpumap: tuple[int, ...]

    @property
    def online(self) -> tuple[int, ...]:
        return tuple(
            vcpu
            for vcpu in range(self.max_vcpu_id + 1)
            if self.vcpumap[vcpu // 64] >> (vcpu % 64) & 1
        )


@attrs.frozen
class HvmParam(Event):
    """One of the 16-byte `i32 id, u32 pad, u64 value` chunks; ``pad`` kept as read."""

    chunk_id: int
    value: int
    pad: int = 0

    @property
    def name(self) -> str:
        return c.CHUNK_NAMES[self.chunk_id]

    @property
    def param_index(self) -> int:
        """The HVM parameter it sets (public/hvm/params.h)."""
        return c.HVM_PARAM_CHUNKS[self.chunk_id]


@attrs.frozen
class TscInfo(Event):
    """-7: u32 tsc_mode, u64 elapsed_nsec, u32 gtsc_khz, u32 incarnation (packed, 20 bytes)."""

    tsc_mode: int
    elapsed_nsec: int
    gtsc_khz: int
    incarnation: int


@attrs.frozen
class LastCheckpoint(Event):
    """-9: nothing follows this checkpoint's tail."""


@attrs.frozen
class EnableCompression(Event):
    """-13: checkpoints after this one use Format B (spec 6)."""


@attrs.frozen
class CompressedData(Event):
    """-12: ulong length (toolstack width), then that many bytes of the checkpoint's compressed pages."""

    data: bytes | memoryview = _blob()


@attrs.frozen
class PhysmapEntry:
    """One libxl qemu physmap entry of the TOOLSTACK blob (spec 8).

    ``name`` includes its NUL (None when namelen is 0); ``gap`` is the 4 unspecified bytes a 64-bit
    toolstack leaves after the name (empty for 32-bit).
    """

    phys_offset: int
    start_addr: int
    size: int
    name: bytes | None
    gap: bytes = b""


@attrs.frozen
class LibxlToolstack:
    """The libxl TOOLSTACK blob decoded: version 1, count, entries; ``width`` = layout used (32/64).

    ``trailing``: bytes after the last entry (none in what libxl writes; its restorer ignores them).
    """

    version: int
    entries: tuple[PhysmapEntry, ...]
    width: int
    trailing: bytes = b""


@attrs.frozen
class Toolstack(Event):
    """-18: u32 length, then the toolstack's opaque blob ``data`` (kept verbatim), decoded as libxl's."""

    data: bytes = _blob()
    libxl: LibxlToolstack | None = None


@attrs.frozen
class TmemHeader(Event):
    """-5 start: u32 version, u32 max_pools, -1, u32 client_flags, u32 weight, u32 cap, -1 (spec 7.1)."""

    version: int
    max_pools: int
    client_flags: int
    weight: int
    cap: int

    @property
    def oid_words(self) -> int:
        return 1 if self.version == 0 else 3


@attrs.frozen
class TmemPool(Event):
    """A pool record: u32 pool_id, u32 pool_flags, u32 n_pages, 16-byte uuid; its pages follow."""

    pool_id: int
    pool_flags: int
    n_pages: int
    uuid: bytes

    @property
    def page_size(self) -> int:
        return PAGE_SIZE << ((self.pool_flags >> 4) & 0xF)


@attrs.frozen
class TmemPage(Event):
    """A page entry of the current pool: object id words, u32 index, page_size bytes."""

    pool_id: int
    oid: tuple[int, ...]
    index: int
    data: memoryview | bytes = _blob()


@attrs.frozen
class TmemPoolPagesEnd(Event):
    """An all-ones object id that ended the current pool's page list before n_pages entries."""

    pool_id: int


@attrs.frozen
class TmemEnd(Event):
    """The u32 0xFFFFFFFF that ends the pool list (and the TMEM chunk)."""


@attrs.frozen
class TmemExtraStart(Event):
    """-6: the start of the list of tmem pages invalidated during the live phase (spec 7.2)."""


@attrs.frozen
class TmemInvalidation(Event):
    """One TMEM_EXTRA entry: u32 pool_id, object id words, u32 index."""

    pool_id: int
    oid: tuple[int, ...]
    index: int


@attrs.frozen
class TmemExtraEnd(Event):
    """The u32 0xFFFFFFFF that ends TMEM_EXTRA."""


@attrs.frozen
class EndOfBody(Event):
    """The i32 0 that ends a checkpoint's body."""


# --------------------------------------------------------------------------------------------------
# Tails
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class UnmappedPfns(Event):
    """PV tail: u32 count, count ulong PFNs not populated at suspend time (spec 3.1)."""

    pfns: tuple[int, ...] = _blob()


@attrs.frozen
class VcpuBasic(Event):
    """PV tail: a VCPU's canonicalised vcpu_guest_context (0xAF0 or 0x1430 bytes)."""

    vcpu_id: int
    data: bytes = _blob()


@attrs.frozen
class VcpuExtended(Event):
    """PV tail: a VCPU's 128-byte extended context (present with "extv")."""

    vcpu_id: int
    data: bytes = _blob()


@attrs.frozen
class VcpuXsave(Event):
    """PV tail: u64 xfeature_mask, u64 size, then ``data`` (xcr0, xcr0_accum, XSAVE area).

    The record is "xcnt" bytes long; ``size`` is the field as read (equal to len(data) when well formed).
    """

    vcpu_id: int
    xfeature_mask: int
    size: int
    data: bytes = _blob()


@attrs.frozen
class SharedInfo(Event):
    """PV tail: the 4096-byte shared-info page."""

    data: bytes = _blob()


@attrs.frozen
class HvmMagicPfns(Event):
    """HVM tail: u64 ioreq_pfn, u64 bufioreq_pfn, u64 store_pfn (spec 4.3)."""

    ioreq_pfn: int
    bufioreq_pfn: int
    store_pfn: int


@attrs.frozen
class HvmContext(Event):
    """HVM tail: u32 length, then the hypervisor's HVM context blob."""

    data: bytes = _blob()


@attrs.frozen
class DeviceModelRecord(Event):
    """The device-model record after the HVM tail (spec 4.4); its state follows as DeviceModelData.

    ``length`` is the declared length (None for QemuDeviceModelRecord, which runs to end of input).
    """

    signature: ClassVar[bytes]
    length: int | None


@attrs.frozen
class DeviceModelRecord0002(DeviceModelRecord):
    """libxl 4.1-4.5: "DeviceModelRecord0002", u32 length, the qemu state."""

    signature: ClassVar[bytes] = c.DM_SIG_LIBXL


@attrs.frozen
class RemusDeviceModelState(DeviceModelRecord):
    """xend-era Remus: "RemusDeviceModelState", u32 length, the qemu state."""

    signature: ClassVar[bytes] = c.DM_SIG_REMUS


@attrs.frozen
class QemuDeviceModelRecord(DeviceModelRecord):
    """xend and libxl 4.0: "QemuDeviceModelRecord", then qemu state ("QEVM"...) to end of input."""

    signature: ClassVar[bytes] = c.DM_SIG_QEMU
    length: None = None


@attrs.frozen
class XenopsQemuRecord(DeviceModelRecord):
    """XenServer classic xenopsd: "QemuDeviceModelRecord\\n", big-endian u32 length, the qemu state."""

    signature: ClassVar[bytes] = c.DM_SIG_QEMU + b"\n"


@attrs.frozen
class DeviceModelData(Event):
    """A piece (at most 1 MiB, boundaries independent of how input was fed) of the qemu state."""

    data: memoryview | bytes = _blob()


@attrs.frozen
class DeviceModelEnd(Event):
    """The device-model record is complete. Not wire."""

    WIRE: ClassVar[bool] = False
    length: int


# --------------------------------------------------------------------------------------------------
# Checkpoints and the end
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class CheckpointEnd(Event):
    """A checkpoint (body + tail [+ device-model record]) is complete. Not wire.

    ``index`` counts from 1; ``last`` when LAST_CHECKPOINT was in it (nothing else follows).
    Events of checkpoint 2 onward are provisional until their CheckpointEnd (spec 5.2).
    """

    WIRE: ClassVar[bool] = False
    index: int
    last: bool


@attrs.frozen
class XlGoMessage(Event):
    """The 44-byte "domain is yours, you are cleared to unpause" + NUL after an xl migration stream."""


@attrs.frozen
class TrailingData(Event):
    """Bytes after the logical end of the stream (spec 1.4, 5.3), reported, not interpreted."""

    data: memoryview | bytes = _blob()


@attrs.frozen
class EndOfStream(Event):
    """The stream ended (spec 5.3). Not wire.

    ``checkpoints``: complete checkpoints. ``reason``: "last-checkpoint" (LAST_CHECKPOINT seen),
    "end-of-input" (clean end at a checkpoint boundary), "device-model-to-eof" or "no-device-model" (a
    bare libxc HVM stream, parser option device_model_optional). When the input ended
    inside checkpoint 2 or later, ``last_checkpoint_complete`` is False and ``discarded_offset`` is where
    the discarded partial checkpoint began (the restorer commits the previous one).
    """

    WIRE: ClassVar[bool] = False
    checkpoints: int
    reason: str
    last_checkpoint_complete: bool = True
    discarded_offset: int | None = None
