"""libxl layer of the v2 stream: the 16-byte big-endian header and one attrs class per record body.

Same contract as ``xenstream.v2.records``: ``pack() -> bytes`` (body only), classmethod
``unpack(view, strict=True)`` raising ``BodyError``; ``LIBXL_RECORDS`` maps type number -> class.
"""

from __future__ import annotations

import struct
from typing import ClassVar

import attrs

from xenstream.v2 import constants as C
from xenstream.v2.records import BodyError, EmptyRecord, _require

_LIBXL_HEADER = struct.Struct(">QII")
_EMULATOR_HEAD = struct.Struct("<II")
_CHECKPOINT_STATE = struct.Struct("<I")


@attrs.frozen
class LibxlHeader:
    options: int = 0

    SIZE: ClassVar[int] = C.LIBXL_HEADER_SIZE

    def pack(self) -> bytes:
        return _LIBXL_HEADER.pack(C.LIBXL_IDENT, C.LIBXL_VERSION, self.options)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> LibxlHeader:
        _require(len(view) == cls.SIZE, f"libxl header length {len(view)}, expected {cls.SIZE}")
        ident, version, options = _LIBXL_HEADER.unpack(view)
        _require(ident == C.LIBXL_IDENT, f"libxl header ident {ident:#x}, expected {C.LIBXL_IDENT:#x} ('LibxlFmt')")
        _require(version == C.LIBXL_VERSION, f"libxl header version {version}, expected {C.LIBXL_VERSION}")
        if strict:
            known = C.LIBXL_OPTION_BIG_ENDIAN | C.LIBXL_OPTION_LEGACY
            _require(options & ~known == 0, f"libxl header reserved option bits set: {options:#x}")
        return cls(options=options)

    @property
    def big_endian(self) -> bool:
        return bool(self.options & C.LIBXL_OPTION_BIG_ENDIAN)

    @property
    def legacy(self) -> bool:
        return bool(self.options & C.LIBXL_OPTION_LEGACY)


@attrs.frozen
class LibxlEnd(EmptyRecord):
    TYPE: ClassVar[int] = C.LIBXL_REC_END
    NAME: ClassVar[str] = "END"


@attrs.frozen
class LibxcContext(EmptyRecord):
    """Marks that a complete libxc stream follows immediately."""

    TYPE: ClassVar[int] = C.LIBXL_REC_LIBXC_CONTEXT
    NAME: ClassVar[str] = "LIBXC_CONTEXT"


@attrs.frozen
class CheckpointEnd(EmptyRecord):
    TYPE: ClassVar[int] = C.LIBXL_REC_CHECKPOINT_END
    NAME: ClassVar[str] = "CHECKPOINT_END"


@attrs.frozen
class _EmulatorRecord:
    emulator_id: int
    index: int
    data: bytes = attrs.field(converter=bytes)

    NAME: ClassVar[str] = ""

    def pack(self) -> bytes:
        return _EMULATOR_HEAD.pack(self.emulator_id, self.index) + self.data

    @classmethod
    def unpack(cls, view, strict: bool = True):
        _require(len(view) >= 8, f"{cls.NAME} length {len(view)}, expected at least 8")
        emulator_id, index = _EMULATOR_HEAD.unpack_from(view)
        return cls(emulator_id=emulator_id, index=index, data=bytes(view[8:]))


@attrs.frozen
class EmulatorXenstoreData(_EmulatorRecord):
    """Key/value pairs for the device model's xenstore directory; ``data`` is the raw NUL-separated area."""

    TYPE: ClassVar[int] = C.LIBXL_REC_EMULATOR_XENSTORE_DATA
    NAME: ClassVar[str] = "EMULATOR_XENSTORE_DATA"

    @classmethod
    def from_pairs(cls, pairs, emulator_id: int = C.EMULATOR_QEMU_UPSTREAM, index: int = 0) -> EmulatorXenstoreData:
        data = b"".join(key + b"\0" + value + b"\0" for key, value in pairs)
        return cls(emulator_id=emulator_id, index=index, data=data)

    def pairs(self) -> list[tuple[bytes, bytes]]:
        """The (key, value) pairs; BodyError when the area is not an even number of NUL-terminated strings."""
        if not self.data:
            return []
        if not self.data.endswith(b"\0"):
            raise BodyError(f"{self.NAME} data not NUL terminated")
        strings = self.data[:-1].split(b"\0")
        if len(strings) % 2:
            raise BodyError(f"{self.NAME} holds an odd number of strings ({len(strings)})")
        return list(zip(strings[0::2], strings[1::2]))


@attrs.frozen
class EmulatorContext(_EmulatorRecord):
    TYPE: ClassVar[int] = C.LIBXL_REC_EMULATOR_CONTEXT
    NAME: ClassVar[str] = "EMULATOR_CONTEXT"


@attrs.frozen
class CheckpointState:
    control_id: int

    TYPE: ClassVar[int] = C.LIBXL_REC_CHECKPOINT_STATE
    NAME: ClassVar[str] = "CHECKPOINT_STATE"

    def pack(self) -> bytes:
        return _CHECKPOINT_STATE.pack(self.control_id)

    @classmethod
    def unpack(cls, view, strict: bool = True) -> CheckpointState:
        _require(len(view) >= 4, f"{cls.NAME} length {len(view)}, expected 4")
        if strict:
            _require(len(view) == 4, f"{cls.NAME} length {len(view)}, expected 4")
        return cls(control_id=_CHECKPOINT_STATE.unpack_from(view)[0])


LIBXL_RECORDS: dict[int, type] = {
    cls.TYPE: cls
    for cls in (LibxlEnd, LibxcContext, EmulatorXenstoreData, EmulatorContext, CheckpointEnd, CheckpointState)
}

LIBXL_RECORD_NAMES: dict[int, str] = {t: cls.NAME for t, cls in LIBXL_RECORDS.items()}


def libxl_record_name(record_type: int) -> str:
    return LIBXL_RECORD_NAMES.get(record_type, f"UNKNOWN({record_type:#x})")
