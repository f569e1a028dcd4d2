"""libxc layer of the v2/v3 stream: image header, domain header and one attrs class per record body.

Every class has ``pack() -> bytes`` (the body only, no record header, no padding) and a classmethod
``unpack(view, strict=True)`` taking exactly the body bytes (a memoryview or bytes of ``length`` bytes).
``unpack`` raises ``BodyError`` (a one-line reason; the reader adds the offset) when the body cannot be
decoded. With ``strict`` it also rejects non-zero reserved fields and non-zero lengths of empty records
(the reference verifier's rules); without it, it ignores them as Xen's restorer does.

Record classes carry their type number as the class attribute ``TYPE``; ``LIBXC_RECORDS`` maps type
number -> class and ``LIBXC_RECORD_NAMES`` type number -> spec name.

PAGE_DATA is special: ``PageData`` holds the pfn/type words only. Its 4096-byte payloads are never part of
the object; ``PageData.pack()`` / ``unpack()`` handle the head (count, reserved, pfn words) and
``payload_length`` says how many payload bytes follow it in the stream (the record's ``length`` is
``head_length + payload_length``).
"""

from __future__ import annotations

import struct
import sys
from array import array
from typing import ClassVar

import attrs

from xenstream.hv.abi import PAGE_SHIFT, PAGE_SIZE, pagetype_has_data
from xenstream.v2 import constants as C


class BodyError(ValueError):
    """A record body or header that cannot be decoded; the message is one line without offset."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BodyError(message)


def _require_length(view, expected: int, name: str) -> None:
    _require(len(view) == expected, f"{name} length {len(view)}, expected {expected}")


def _require_empty(view, strict: bool, name: str) -> None:
    if strict:
        _require(len(view) == 0, f"{name} length {len(view)}, expected 0")


# ---------------------------------------------------------------- headers

_IMAGE_HEADER = struct.Struct(">QIIHHI")
_DOMAIN_HEADER = struct.Struct("<IHHII")


@attrs.frozen
class ImageHeader:
    """The 24-byte big-endian libxc image header."""

    version: int = 3
    options: int = 0

    SIZE: ClassVar[int] = C.IMAGE_HEADER_SIZE

    def pack(self) -> bytes:
        return _IMAGE_HEADER.pack(C.IMAGE_MARKER, C.IMAGE_ID, self.version, self.options, 0, 0)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> ImageHeader:
        _require_length(view, cls.SIZE, "image header")
        marker, ident, version, options, reserved16, reserved32 = _IMAGE_HEADER.unpack(view)
        _require(marker == C.IMAGE_MARKER, f"image header marker {marker:#x}, expected {C.IMAGE_MARKER:#x}")
        _require(ident == C.IMAGE_ID, f"image header id {ident:#x}, expected {C.IMAGE_ID:#x} ('XENF')")
        _require(version in C.IMAGE_VERSIONS, f"image header version {version}, expected 2 or 3")
        if strict:
            _require(options & ~C.IMAGE_OPTION_BIG_ENDIAN == 0, f"image header reserved option bits set: {options:#x}")
            _require(reserved16 == 0 and reserved32 == 0, "image header reserved fields not zero")
        return cls(version=version, options=options)

    @property
    def big_endian(self) -> bool:
        return bool(self.options & C.IMAGE_OPTION_BIG_ENDIAN)


@attrs.frozen
class DomainHeader:
    """The 16-byte libxc domain header (stream endianness; only little-endian is supported)."""

    guest_type: int
    xen_major: int = 4
    xen_minor: int = 17
    page_shift: int = PAGE_SHIFT

    SIZE: ClassVar[int] = C.DOMAIN_HEADER_SIZE

    def pack(self) -> bytes:
        return _DOMAIN_HEADER.pack(self.guest_type, self.page_shift, 0, self.xen_major, self.xen_minor)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> DomainHeader:
        _require_length(view, cls.SIZE, "domain header")
        guest_type, page_shift, reserved, major, minor = _DOMAIN_HEADER.unpack(view)
        _require(guest_type in C.DOMAIN_TYPE_NAMES, f"domain header guest type {guest_type:#x} is not 1 (PV) or 2 (HVM)")
        _require(page_shift == PAGE_SHIFT, f"domain header page_shift {page_shift}, expected {PAGE_SHIFT}")
        if strict:
            _require(reserved == 0, "domain header reserved field not zero")
        return cls(guest_type=guest_type, xen_major=major, xen_minor=minor, page_shift=page_shift)

    @property
    def converted_from_legacy(self) -> bool:
        return self.xen_major == 0


# ---------------------------------------------------------------- empty records


@attrs.frozen
class EmptyRecord:
    """A record with no body (length 0); shared by both layers."""

    NAME: ClassVar[str] = ""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, view, strict: bool = True):
        _require_empty(view, strict, cls.NAME)
        return cls()


@attrs.frozen
class End(EmptyRecord):
    TYPE: ClassVar[int] = C.REC_END
    NAME: ClassVar[str] = "END"


@attrs.frozen
class Verify(EmptyRecord):
    TYPE: ClassVar[int] = C.REC_VERIFY
    NAME: ClassVar[str] = "VERIFY"


@attrs.frozen
class Checkpoint(EmptyRecord):
    TYPE: ClassVar[int] = C.REC_CHECKPOINT
    NAME: ClassVar[str] = "CHECKPOINT"


@attrs.frozen
class StaticDataEnd(EmptyRecord):
    TYPE: ClassVar[int] = C.REC_STATIC_DATA_END
    NAME: ClassVar[str] = "STATIC_DATA_END"


# ---------------------------------------------------------------- PAGE_DATA

_COUNT_RESERVED = struct.Struct("<II")


_FLAG = b"\x01"
_HIGH_NIBBLE = bytes(b >> 4 for b in range(256))
_LOW_NIBBLE = bytes(b & 0xF for b in range(256))
_HIGH_NIBBLE_FLAG = bytes(int(b >> 4 != 0) for b in range(256))
_LOW_NIBBLE_FLAG = bytes(int(b & 0xF != 0) for b in range(256))
_INVALID_TYPE_FLAG = bytes(int(b in C.INVALID_PAGE_TYPES) for b in range(256))
_DATALESS_FLAG = bytes(int(b < 16 and not pagetype_has_data(b)) for b in range(256))


def join_pfn_words(pfns, types) -> list[int]:
    shift = C.PFN_TYPE_SHIFT
    return [(t << shift) | p for p, t in zip(pfns, types)]


def data_page_count(types) -> int:
    """How many entries carry a 4096-byte payload (types must already be valid)."""
    if isinstance(types, bytes):  # PageData's own form: one C-level pass
        return len(types) - types.translate(_DATALESS_FLAG).count(_FLAG)
    present = set(types)
    return len(types) - sum(types.count(t) for t in present if not pagetype_has_data(t))


def _pfn_array(pfns) -> array:
    return pfns if isinstance(pfns, array) and pfns.typecode == "Q" else array("Q", pfns)


@attrs.frozen(hash=False)
class PageData:
    """PAGE_DATA head: parallel sequences of pfns (`array('Q')`) and page types (`bytes`, the nibble of
    bits 60-63).

    Compact containers, not tuples of ints: a legal 128 MiB head holds 16M entries, which as Python
    ints would cost ~2 GiB; as an array and bytes it costs 9 bytes an entry.
    """

    pfns: array = attrs.field(converter=_pfn_array)
    types: bytes = attrs.field(converter=bytes)

    TYPE: ClassVar[int] = C.REC_PAGE_DATA
    NAME: ClassVar[str] = "PAGE_DATA"

    @property
    def count(self) -> int:
        return len(self.pfns)

    @property
    def page_count(self) -> int:
        return data_page_count(self.types)

    @property
    def payload_length(self) -> int:
        return self.page_count * PAGE_SIZE

    @property
    def head_length(self) -> int:
        return 8 + 8 * len(self.pfns)

    @property
    def length(self) -> int:
        """The record's body length: head plus payload."""
        return self.head_length + self.payload_length

    def data_pfns(self) -> list[int]:
        """The pfns whose payload follows, in payload order."""
        return [p for p, t in zip(self.pfns, self.types) if pagetype_has_data(t)]

    def pack(self) -> bytes:
        count = len(self.pfns)
        words = array("Q", join_pfn_words(self.pfns, self.types))
        if sys.byteorder != "little":
            words.byteswap()
        return _COUNT_RESERVED.pack(count, 0) + words.tobytes()

    @classmethod
    def unpack_count(cls, view, strict: bool = True) -> int:
        """The pfn count from the first 8 body bytes."""
        count, reserved = _COUNT_RESERVED.unpack_from(view)
        _require(count >= 1, "PAGE_DATA count is 0")
        if strict:
            _require(reserved == 0, "PAGE_DATA reserved field not zero")
        return count

    @classmethod
    def unpack_words(cls, view, count: int, strict: bool = True) -> PageData:
        """Decode ``count`` pfn words from ``view`` (exactly 8*count bytes, little-endian).

        Works on the words' top two bytes as strided byte strings (C-level translate/count), so a
        1024-entry record costs no per-entry Python work: byte 7 holds the type (high nibble) and
        reserved bits 56-59 (low nibble), byte 6 reserved bits 52-55 (high nibble) and pfn bits 48-51.
        """
        raw = bytes(view)
        byte6 = raw[6::8]
        byte7 = raw[7::8]
        type_bytes = byte7.translate(_HIGH_NIBBLE)
        if _FLAG in type_bytes.translate(_INVALID_TYPE_FLAG):
            bad = next(i for i, t in enumerate(type_bytes) if t in C.INVALID_PAGE_TYPES)
            pfn = struct.unpack_from("<Q", raw, 8 * bad)[0] & C.PFN_MASK
            raise BodyError(f"PAGE_DATA entry {bad} (pfn {pfn:#x}) has invalid page type {type_bytes[bad]:#x}")
        if strict and (_FLAG in byte6.translate(_HIGH_NIBBLE_FLAG) or _FLAG in byte7.translate(_LOW_NIBBLE_FLAG)):
            words = struct.unpack(f"<{count}Q", raw)
            bad = next(i for i, w in enumerate(words) if w & C.PFN_RESERVED_MASK)
            raise BodyError(f"PAGE_DATA entry {bad} has reserved bits 52-59 set: {words[bad]:#018x}")
        masked = bytearray(raw)
        masked[6::8] = byte6.translate(_LOW_NIBBLE)
        masked[7::8] = bytes(count)
        pfns = array("Q", masked)
        if sys.byteorder != "little":
            pfns.byteswap()
        return cls(pfns=pfns, types=type_bytes)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> PageData:
        """Decode a PAGE_DATA head as ``pack`` makes it: count, reserved, exactly ``count`` pfn words."""
        _require(len(view) >= 8, f"PAGE_DATA head length {len(view)} too short for its count")
        count = cls.unpack_count(view, strict)
        _require(len(view) == 8 + 8 * count, f"PAGE_DATA head length {len(view)}, expected {8 + 8 * count} for {count} entries")
        return cls.unpack_words(memoryview(view)[8:], count, strict)


# ---------------------------------------------------------------- PV records

_PV_INFO = struct.Struct("<BB6s")
_P2M_HEAD = struct.Struct("<II")
_VCPU_HEAD = struct.Struct("<II")


@attrs.frozen
class X86PvInfo:
    guest_width: int
    pt_levels: int

    TYPE: ClassVar[int] = C.REC_X86_PV_INFO
    NAME: ClassVar[str] = "X86_PV_INFO"

    def pack(self) -> bytes:
        return _PV_INFO.pack(self.guest_width, self.pt_levels, bytes(6))

    @classmethod
    def unpack(cls, view, strict: bool = True) -> X86PvInfo:
        if strict:
            _require_length(view, 8, cls.NAME)
        else:
            _require(len(view) >= 8, f"{cls.NAME} length {len(view)}, expected 8")
        width, levels, reserved = _PV_INFO.unpack_from(view)
        if strict:
            _require(reserved == bytes(6), f"{cls.NAME} reserved bytes not zero")
        return cls(guest_width=width, pt_levels=levels)


@attrs.frozen
class X86PvP2mFrames:
    start_pfn: int
    end_pfn: int
    frames: tuple[int, ...] = attrs.field(converter=tuple)

    TYPE: ClassVar[int] = C.REC_X86_PV_P2M_FRAMES
    NAME: ClassVar[str] = "X86_PV_P2M_FRAMES"

    def pack(self) -> bytes:
        return _P2M_HEAD.pack(self.start_pfn, self.end_pfn) + struct.pack(f"<{len(self.frames)}Q", *self.frames)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> X86PvP2mFrames:
        _require(len(view) >= 8 and len(view) % 8 == 0, f"{cls.NAME} length {len(view)} is not 8 + a multiple of 8")
        start, end = _P2M_HEAD.unpack_from(view)
        count = (len(view) - 8) // 8
        return cls(start_pfn=start, end_pfn=end, frames=struct.unpack_from(f"<{count}Q", view, 8))

    @staticmethod
    def frame_count(start_pfn: int, end_pfn: int, guest_width: int) -> int:
        """Xen's number of p2m frames covering pfns start..end (spec 3.4)."""
        per_frame = PAGE_SIZE // guest_width
        return end_pfn // per_frame - start_pfn // per_frame + 1


@attrs.frozen
class _VcpuRecord:
    vcpu_id: int
    context: bytes = attrs.field(converter=bytes)

    NAME: ClassVar[str] = ""

    def pack(self) -> bytes:
        return _VCPU_HEAD.pack(self.vcpu_id, 0) + self.context

    @classmethod
    def unpack(cls, view, strict: bool = True):
        _require(len(view) >= 8, f"{cls.NAME} length {len(view)}, expected at least 8")
        vcpu_id, reserved = _VCPU_HEAD.unpack_from(view)
        if strict:
            _require(reserved == 0, f"{cls.NAME} reserved field not zero")
        return cls(vcpu_id=vcpu_id, context=bytes(view[8:]))


@attrs.frozen
class X86PvVcpuBasic(_VcpuRecord):
    TYPE: ClassVar[int] = C.REC_X86_PV_VCPU_BASIC
    NAME: ClassVar[str] = "X86_PV_VCPU_BASIC"


@attrs.frozen
class X86PvVcpuExtended(_VcpuRecord):
    TYPE: ClassVar[int] = C.REC_X86_PV_VCPU_EXTENDED
    NAME: ClassVar[str] = "X86_PV_VCPU_EXTENDED"


@attrs.frozen
class X86PvVcpuXsave(_VcpuRecord):
    TYPE: ClassVar[int] = C.REC_X86_PV_VCPU_XSAVE
    NAME: ClassVar[str] = "X86_PV_VCPU_XSAVE"


@attrs.frozen
class X86PvVcpuMsrs(_VcpuRecord):
    TYPE: ClassVar[int] = C.REC_X86_PV_VCPU_MSRS
    NAME: ClassVar[str] = "X86_PV_VCPU_MSRS"


@attrs.frozen
class SharedInfo:
    data: bytes = attrs.field(converter=bytes)

    TYPE: ClassVar[int] = C.REC_SHARED_INFO
    NAME: ClassVar[str] = "SHARED_INFO"

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, view, strict: bool = True) -> SharedInfo:
        _require_length(view, PAGE_SIZE, cls.NAME)
        return cls(data=bytes(view))


# ---------------------------------------------------------------- PV and HVM records

_TSC_INFO = struct.Struct("<IIQII")
_PARAMS_HEAD = struct.Struct("<II")
_CPUID_LEAF = struct.Struct("<6I")
_MSR_ENTRY = struct.Struct("<IIQ")


@attrs.frozen
class X86TscInfo:
    mode: int = 0
    khz: int = 0
    nsec: int = 0
    incarnation: int = 0

    TYPE: ClassVar[int] = C.REC_X86_TSC_INFO
    NAME: ClassVar[str] = "X86_TSC_INFO"

    def pack(self) -> bytes:
        return _TSC_INFO.pack(self.mode, self.khz, self.nsec, self.incarnation, 0)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> X86TscInfo:
        _require_length(view, _TSC_INFO.size, cls.NAME)
        mode, khz, nsec, incarnation, reserved = _TSC_INFO.unpack(view)
        if strict:
            _require(reserved == 0, f"{cls.NAME} reserved field not zero")
        return cls(mode=mode, khz=khz, nsec=nsec, incarnation=incarnation)


@attrs.frozen
class HvmContext:
    data: bytes = attrs.field(converter=bytes)

    TYPE: ClassVar[int] = C.REC_HVM_CONTEXT
    NAME: ClassVar[str] = "HVM_CONTEXT"

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, view, strict: bool = True) -> HvmContext:
        _require(len(view) > 0, f"{cls.NAME} is empty")
        return cls(data=bytes(view))


@attrs.frozen
class HvmParams:
    """HVM_PARAMS: a tuple of (index, value) pairs."""

    params: tuple[tuple[int, int], ...] = attrs.field(converter=lambda ps: tuple((int(i), int(v)) for i, v in ps))

    TYPE: ClassVar[int] = C.REC_HVM_PARAMS
    NAME: ClassVar[str] = "HVM_PARAMS"

    def pack(self) -> bytes:
        flat = [x for pair in self.params for x in pair]
        return _PARAMS_HEAD.pack(len(self.params), 0) + struct.pack(f"<{len(flat)}Q", *flat)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> HvmParams:
        _require(len(view) >= 8, f"{cls.NAME} length {len(view)}, expected at least 8")
        count, reserved = _PARAMS_HEAD.unpack_from(view)
        if strict:
            _require(reserved == 0, f"{cls.NAME} reserved field not zero")
        _require(len(view) == 8 + 16 * count, f"{cls.NAME} length {len(view)}, expected {8 + 16 * count} for {count} entries")
        flat = struct.unpack_from(f"<{2 * count}Q", view, 8)
        return cls(params=tuple(zip(flat[0::2], flat[1::2])))


@attrs.frozen
class Toolstack:
    """The obsolete TOOLSTACK record: decoded so it can be reported, never written by our writer."""

    data: bytes = attrs.field(converter=bytes)

    TYPE: ClassVar[int] = C.REC_TOOLSTACK
    NAME: ClassVar[str] = "TOOLSTACK"
    READ_ONLY: ClassVar[bool] = True

    def pack(self) -> bytes:
        raise TypeError("TOOLSTACK is obsolete and is never written")

    @classmethod
    def unpack(cls, view, strict: bool = True) -> Toolstack:
        return cls(data=bytes(view))


@attrs.frozen
class CheckpointDirtyPfnList:
    pfns: tuple[int, ...] = attrs.field(converter=tuple)

    TYPE: ClassVar[int] = C.REC_CHECKPOINT_DIRTY_PFN_LIST
    NAME: ClassVar[str] = "CHECKPOINT_DIRTY_PFN_LIST"

    def pack(self) -> bytes:
        return struct.pack(f"<{len(self.pfns)}Q", *self.pfns)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> CheckpointDirtyPfnList:
        _require(len(view) % 8 == 0, f"{cls.NAME} length {len(view)} is not a multiple of 8")
        return cls(pfns=struct.unpack_from(f"<{len(view) // 8}Q", view))


@attrs.frozen
class CpuidLeaf:
    leaf: int
    subleaf: int
    a: int
    b: int
    c: int
    d: int


@attrs.frozen
class X86CpuidPolicy:
    leaves: tuple[CpuidLeaf, ...] = attrs.field(converter=tuple)

    TYPE: ClassVar[int] = C.REC_X86_CPUID_POLICY
    NAME: ClassVar[str] = "X86_CPUID_POLICY"

    def pack(self) -> bytes:
        return b"".join(_CPUID_LEAF.pack(x.leaf, x.subleaf, x.a, x.b, x.c, x.d) for x in self.leaves)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> X86CpuidPolicy:
        size = _CPUID_LEAF.size
        _require(len(view) >= size and len(view) % size == 0, f"{cls.NAME} length {len(view)} is not a non-zero multiple of {size}")
        return cls(leaves=tuple(CpuidLeaf(*fields) for fields in _CPUID_LEAF.iter_unpack(view)))


@attrs.frozen
class MsrEntry:
    idx: int
    val: int
    flags: int = 0


@attrs.frozen
class X86MsrPolicy:
    entries: tuple[MsrEntry, ...] = attrs.field(converter=tuple)

    TYPE: ClassVar[int] = C.REC_X86_MSR_POLICY
    NAME: ClassVar[str] = "X86_MSR_POLICY"

    def pack(self) -> bytes:
        return b"".join(_MSR_ENTRY.pack(e.idx, e.flags, e.val) for e in self.entries)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> X86MsrPolicy:
        size = _MSR_ENTRY.size
        _require(len(view) >= size and len(view) % size == 0, f"{cls.NAME} length {len(view)} is not a non-zero multiple of {size}")
        entries = tuple(MsrEntry(idx=idx, flags=flags, val=val) for idx, flags, val in _MSR_ENTRY.iter_unpack(view))
        if strict:
            _require(all(e.flags == 0 for e in entries), f"{cls.NAME} entry flags not zero")
        return cls(entries=entries)


# ---------------------------------------------------------------- registry

LIBXC_RECORDS: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        End,
        PageData,
        X86PvInfo,
        X86PvP2mFrames,
        X86PvVcpuBasic,
        X86PvVcpuExtended,
        X86PvVcpuXsave,
        SharedInfo,
        X86TscInfo,
        HvmContext,
        HvmParams,
        Toolstack,
        X86PvVcpuMsrs,
        Verify,
        Checkpoint,
        CheckpointDirtyPfnList,
        StaticDataEnd,
        X86CpuidPolicy,
        X86MsrPolicy,
    )
}

LIBXC_RECORD_NAMES: dict[int, str] = {t: cls.NAME for t, cls in LIBXC_RECORDS.items()}


def libxc_record_name(record_type: int) -> str:
    return LIBXC_RECORD_NAMES.get(record_type, f"UNKNOWN({record_type:#x})")
