"""libxl's v1 TOOLSTACK blob (spec 8): version 1, count, qemu physmap entries with the 64-bit gap quirk.

An entry is u64 phys_offset, u64 start_addr, u64 size, u32 namelen, the name (namelen bytes with its
NUL), and on a 64-bit toolstack 4 more unspecified bytes: libxl advanced by sizeof(struct) + namelen and
the struct is 32 bytes there, 28 on i386.
"""

from __future__ import annotations

import struct

from xenstream.legacy.errors import MalformedStream
from xenstream.legacy.events import LibxlToolstack, PhysmapEntry

LIBXL_TOOLSTACK_VERSION = 1
_HEADER = struct.Struct("<II")
_ENTRY = struct.Struct("<QQQI")  # 28 bytes
_GAP = {32: 0, 64: 4}


class _Overrun(Exception):
    def __init__(self, message: str, at: int):
        super().__init__(message)
        self.message = message
        self.at = at


def _decode(data: bytes, width: int, exact: bool) -> LibxlToolstack:
    """Entries in one layout; `exact` also wants NUL-terminated names and no bytes after the last entry."""
    version, count = _HEADER.unpack_from(data)
    gap = _GAP[width]
    if len(data) < _HEADER.size + count * (_ENTRY.size + gap):
        raise _Overrun(
            f"toolstack record of {len(data)} bytes cannot hold {count} physmap entries ({width}-bit layout)",
            _HEADER.size,
        )
    pos = _HEADER.size
    entries = []
    for index in range(count):
        if pos + _ENTRY.size + gap > len(data):  # names are variable: the check above cannot cover this
            raise _Overrun(
                f"physmap entry {index} ({_ENTRY.size + gap} bytes at least, {width}-bit layout) overruns "
                f"its {len(data)}-byte toolstack record",
                pos,
            )
        phys_offset, start_addr, size, namelen = _ENTRY.unpack_from(data, pos)
        end = pos + _ENTRY.size + namelen + gap
        if end > len(data):
            raise _Overrun(
                f"physmap entry {index} ({_ENTRY.size + namelen + gap} bytes, {width}-bit layout) overruns "
                f"its {len(data)}-byte toolstack record",
                pos,
            )
        name_at = pos + _ENTRY.size
        name = bytes(data[name_at : name_at + namelen]) if namelen else None
        if exact and name is not None and not name.endswith(b"\0"):
            raise _Overrun(f"physmap entry {index}'s name is not NUL-terminated ({width}-bit layout)", name_at)
        entries.append(PhysmapEntry(phys_offset, start_addr, size, name, bytes(data[end - gap : end])))
        pos = end
    if exact and pos != len(data):
        raise _Overrun(f"{len(data) - pos} bytes after the last physmap entry ({width}-bit layout)", pos)
    return LibxlToolstack(version, tuple(entries), width, bytes(data[pos:]))


def decode_libxl_toolstack(data: bytes, width: int, offset: int) -> LibxlToolstack | None:
    """Decode a TOOLSTACK blob as libxl's (spec 8: "parse the blob both ways").

    The layout that fits exactly wins, the toolstack's own `width` first; failing both, the own layout
    is taken as libxl's restorer reads it (trailing bytes kept, names unchecked). None when the blob is
    not libxl's (shorter than its header, or another version). MalformedStream at `offset` + position
    when an entry overruns the record.
    """
    if len(data) < _HEADER.size or _HEADER.unpack_from(data)[0] != LIBXL_TOOLSTACK_VERSION:
        return None
    for layout in (width, 32 if width == 64 else 64):
        try:
            return _decode(data, layout, exact=True)
        except _Overrun:
            pass
    try:
        return _decode(data, width, exact=False)
    except _Overrun as error:
        raise MalformedStream(error.message, offset + error.at) from None


def encode_libxl_toolstack(toolstack: LibxlToolstack) -> bytes:
    """The blob for `toolstack` in its `width` layout (a 64-bit entry without a gap gets four zeros)."""
    gap = _GAP[toolstack.width]
    out = [_HEADER.pack(toolstack.version, len(toolstack.entries))]
    for entry in toolstack.entries:
        name = entry.name or b""
        out.append(_ENTRY.pack(entry.phys_offset, entry.start_addr, entry.size, len(name)))
        out.append(name)
        out.append(entry.gap if len(entry.gap) == gap else bytes(gap))
    out.append(toolstack.trailing)
    return b"".join(out)
