"""The xl save-file header that ``xl save`` / ``xl migrate`` put in front of a libxl stream (spec section 5).

Its integers are in the writing host's byte order, told by the ``byteorder`` word. The header is not
padded: the libxl stream starts right after the optional data, at any file offset.
"""

from __future__ import annotations

import struct
from typing import ClassVar

import attrs

from xenstream.v2 import constants as C
from xenstream.v2.records import BodyError, _require

_FIELDS = {"<": struct.Struct("<IIII"), ">": struct.Struct(">IIII")}
_CONFIG_LEN = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}


@attrs.frozen
class XlHeader:
    """``optional_data`` is the raw optional area (normally u32 config_len + config bytes)."""

    mandatory_flags: int = C.XL_FLAG_JSON | C.XL_FLAG_STREAMV2
    optional_flags: int = 0
    optional_data: bytes = attrs.field(default=b"", converter=bytes)
    byteorder: str = "<"

    FIXED_SIZE: ClassVar[int] = C.XL_HEADER_SIZE

    @classmethod
    def with_config(cls, config: bytes, mandatory_flags: int = C.XL_FLAG_JSON | C.XL_FLAG_STREAMV2, byteorder: str = "<") -> XlHeader:
        """The header xl writes: optional data = u32 config_len + config (JSON configs include their NUL)."""
        return cls(
            mandatory_flags=mandatory_flags,
            optional_data=_CONFIG_LEN[byteorder].pack(len(config)) + config,
            byteorder=byteorder,
        )

    @property
    def size(self) -> int:
        return self.FIXED_SIZE + len(self.optional_data)

    @property
    def streamv2(self) -> bool:
        return bool(self.mandatory_flags & C.XL_FLAG_STREAMV2)

    @property
    def config(self) -> bytes | None:
        """The stored domain configuration (cut to the optional data), None when there is none."""
        if len(self.optional_data) < 4:
            return None
        (length,) = _CONFIG_LEN[self.byteorder].unpack_from(self.optional_data)
        return self.optional_data[4 : 4 + length]

    def pack(self) -> bytes:
        fields = _FIELDS[self.byteorder].pack(C.XL_BYTEORDER, self.mandatory_flags, self.optional_flags, len(self.optional_data))
        return C.XL_MAGIC + fields + self.optional_data

    @staticmethod
    def parse_fixed(view, strict: bool = True) -> tuple[str, int, int, int]:
        """(byteorder, mandatory_flags, optional_flags, optional_data_len) from the first 48 bytes."""
        _require(bytes(view[:32]) == C.XL_MAGIC, "no xl header (magic mismatch)")
        for order, fields in _FIELDS.items():
            byteorder, mandatory, optional, optional_len = fields.unpack_from(view, 32)
            if byteorder == C.XL_BYTEORDER:
                break
        else:
            raise BodyError(f"xl header byteorder word {bytes(view[32:36]).hex()} is not 0x01020304 in either order")
        unknown = mandatory & ~C.XL_KNOWN_MANDATORY_FLAGS
        if strict:
            _require(unknown == 0, f"xl header has unknown mandatory flags {unknown:#x}")
        return order, mandatory, optional, optional_len

    @classmethod
    def unpack(cls, view, strict: bool = True) -> XlHeader:
        """Decode a complete header (fixed part and optional data, nothing more)."""
        _require(len(view) >= cls.FIXED_SIZE, f"xl header length {len(view)}, expected at least {cls.FIXED_SIZE}")
        order, mandatory, optional, optional_len = cls.parse_fixed(view, strict)
        _require(len(view) == cls.FIXED_SIZE + optional_len, f"xl header length {len(view)}, expected {cls.FIXED_SIZE + optional_len}")
        data = bytes(view[cls.FIXED_SIZE :])
        if strict and data:
            _require(len(data) >= 4, "xl header optional data too short for the config length")
            (config_len,) = _CONFIG_LEN[order].unpack_from(data)
            _require(config_len <= len(data) - 4, f"xl header config length {config_len} exceeds the optional data ({len(data) - 4} bytes)")
        return cls(mandatory_flags=mandatory, optional_flags=optional, optional_data=data, byteorder=order)
