"""Deciding what a stream is from its first bytes (spec 10), with the evidence for each decision.

Each function looks at a short peek (at most `V1_PEEK` bytes of the v1 stream proper, `WRAPPER_PEEK`
bytes of the input) and either returns a decision with an `Evidence`, or raises: `UnsupportedStream`
for something that is recognisably not v1 (v2 streams), `DetectionError` naming the option to pass when
the bytes cannot decide, `MalformedStream` for a wrapper whose magic is almost right.
"""

from __future__ import annotations

import struct

from xenstream.legacy import constants as c
from xenstream.legacy.errors import DetectionError, MalformedStream, UnsupportedStream
from xenstream.legacy.events import Evidence

WRAPPER_PEEK = 32
V1_PEEK = 28  # 8-byte p2m_size, 8-byte marker, u32 total, "vcpu", u32 size

# The first i32 of an HVM body in any 4.x save: TMEM, TSC_INFO, or a page batch (spec 10.2/10.3).
_HVM_FIRST_CHUNKS = (c.CHUNK_TMEM, c.CHUNK_TSC_INFO)
_PV_EXTENDED_TOTALS = (0xB00, 0xB0C, 0x1440, 0x144C)

# Wrapper magics in the order they are tested; each maps to the wrapper name it announces.
_WRAPPERS = (
    (c.XL_MAGIC, "xl"),
    (c.XEND_MAGIC, "xend"),
    (c.LIBVIRT_MAGIC, "libvirt"),
    (c.XENOPS_MAGIC, "xenops"),
)
_V2_MAGICS = (
    (c.V2_LIBXL_MAGIC, "a v2 libxl stream (\"LibxlFmt\")"),
    (c.V2_LIBXC_MARKER, "a v2 libxc stream (ff x 8, \"XENF\")"),
)
_XL_MAGIC_PREFIX = c.XL_MAGIC[:16]  # "Xen saved domain": enough to say "meant to be xl"


def identify_wrapper(head: bytes, xl: bool | None) -> tuple[str, Evidence]:
    """Which wrapper (if any) starts the input. `head`: WRAPPER_PEEK bytes, fewer only at end of input."""
    for magic, what in _V2_MAGICS:
        if head.startswith(magic):
            raise UnsupportedStream(f"this is {what}, not a legacy v1 stream", 0)
    if xl is True:
        if not head.startswith(c.XL_MAGIC):
            raise MalformedStream(f"bad xl magic {bytes(head[:32])!r} (xl header expected: xl=True)", 0)
        return "xl", Evidence("wrapper", "xl", "option", "xl=True and the 32-byte xl magic is present")
    for magic, name in _WRAPPERS:
        if head.startswith(magic):
            if name == "xl" and xl is False:
                raise DetectionError(
                    "the input starts with an xl save-file header but xl=False was given; pass xl=True (--xl)", 0
                )
            return name, Evidence("wrapper", name, "detected", f"input starts with {magic!r}")
    if xl is None and head.startswith(_XL_MAGIC_PREFIX):
        raise MalformedStream(f"bad xl magic {bytes(head[:32])!r}", 0)
    source = "option" if xl is False else "detected"
    return "none", Evidence("wrapper", "none", source, "no known wrapper magic: a bare libxc v1 stream")


def detect_width(head: bytes, offset: int, width: int | None) -> tuple[int, Evidence]:
    """Toolstack word size in bits from v1 bytes 4..7 (spec 10.2), or the option."""
    if width is not None:
        return width, Evidence("width", str(width), "option", f"width={width} given")
    if len(head) < 8:
        raise DetectionError(
            f"only {len(head)} bytes of v1 stream: cannot tell the toolstack width; pass width=32|64 (--width)",
            offset,
        )
    low, high = struct.unpack_from("<II", head)
    if high == 0:
        if not 0 < low <= c.MAX_P2M_SIZE:
            raise DetectionError(
                f"bytes 4-7 are zero but p2m_size {low:#x} is implausible: cannot tell the toolstack width; "
                "pass width=32|64 (--width)",
                offset,
            )
        return 64, Evidence(
            "width", "64", "detected", f"v1 bytes 4-7 are zero: upper half of a 64-bit p2m_size {low:#x}"
        )
    if not 0 < low <= c.MAX_P2M_SIZE:
        raise DetectionError(
            f"neither a 32-bit nor a 64-bit p2m_size fits the first 8 bytes ({bytes(head[:8]).hex()}); "
            "pass width=32|64 (--width)",
            offset,
        )
    return 32, Evidence(
        "width", "32", "detected", f"v1 bytes 4-7 are {bytes(head[4:8]).hex()} (non-zero): p2m_size is 32-bit"
    )


def detect_guest(head: bytes, offset: int, word: int, guest: str | None) -> tuple[str, Evidence]:
    """PV or HVM from the word after p2m_size (spec 10.3), or the option."""
    if guest is not None:
        return guest, Evidence("guest", guest, "option", f"guest={guest} given")
    if len(head) < 2 * word:
        raise DetectionError(
            f"only {len(head)} bytes of v1 stream: cannot tell PV from HVM; pass guest=pv|hvm (--guest)", offset
        )
    after = bytes(head[word : 2 * word])
    if after == b"\xff" * word:
        reason = "the word after p2m_size is all ones (extended-info marker)"
        if len(head) >= 2 * word + 12:
            total, block_id, size = struct.unpack_from("<I4sI", head, 2 * word)
            if total in _PV_EXTENDED_TOTALS and block_id == c.EXT_BLOCK_VCPU and size in c.GUEST_BY_VCPU_CONTEXT_SIZE:
                reason += f", followed by total {total:#x} and a \"vcpu\" block of {size:#x} bytes"
        return "pv", Evidence("guest", "pv", "detected", reason)
    (first,) = struct.unpack_from("<i", head, word)
    if first in _HVM_FIRST_CHUNKS or 1 <= first <= c.MAX_BATCH_SIZE:
        what = c.CHUNK_NAMES.get(first, f"a page batch of {first}")
        return "hvm", Evidence(
            "guest", "hvm", "detected", f"no extended-info marker; the body starts at once with {what}"
        )
    raise DetectionError(
        f"the word after p2m_size ({after.hex()}) is neither the PV extended-info marker nor a plausible first "
        "HVM element: cannot tell PV from HVM; pass guest=pv|hvm (--guest)",
        offset + word,
    )


def guest_from_vcpu_block(head: bytes, word: int) -> tuple[int, int] | None:
    """(guest word size, paging levels) from the "vcpu" block size, when the peek reaches it."""
    if len(head) < 2 * word + 12:
        return None
    _total, block_id, size = struct.unpack_from("<I4sI", head, 2 * word)
    if block_id != c.EXT_BLOCK_VCPU:
        return None
    return c.GUEST_BY_VCPU_CONTEXT_SIZE.get(size)
