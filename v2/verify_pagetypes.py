"""What a PV restore knows about each pfn when the stream ends: its last page type and whether it was
ever populated. One byte per pfn (type nibble, plus POPULATED), updated a whole record at a time.

Xen's restore (xg_sr_restore.c) records the type of every PAGE_DATA entry, populates entries whose type
carries data and XALLOC ones, and never unpopulates. At END it requires the start-info page, the GDT
frames and the p2m frames to be populated NOTAB pages, and cr3 (and a 64-bit guest's user cr1) to be a
populated page table of the guest's top level (the pinned bit is ignored).
"""

from __future__ import annotations

import attrs

from xenstream.hv.abi import PAGETYPE_XALLOC, pagetype_has_data

POPULATED = 0x10
# type -> byte stored for it (the type, plus POPULATED when Xen populates such an entry)
_STORE = bytes((t | POPULATED) if (pagetype_has_data(t) or t == PAGETYPE_XALLOC) else t for t in range(16))
_STORE += bytes(256 - len(_STORE))

# Tracking stops here (2^24 pfns: a 64 GiB guest, 16 MiB of state); larger guests skip the type checks.
TRACK_LIMIT = 1 << 24


@attrs.define
class PageTypes:
    types: bytearray = attrs.field(factory=bytearray)  # indexed by pfn
    overflow: bool = False  # some pfn was beyond TRACK_LIMIT

    def cover(self, max_pfn: int) -> None:
        """Make room for pfns 0..max_pfn (as far as the limit allows)."""
        wanted = min(max_pfn + 1, TRACK_LIMIT)
        self.overflow = self.overflow or max_pfn >= TRACK_LIMIT
        if wanted > len(self.types):
            self.types.extend(bytes(wanted - len(self.types)))

    def record(self, pfns: tuple[int, ...], types: tuple[int, ...], ascending_run: bool) -> None:
        """A PAGE_DATA record (pfns beyond cover() are left out); ascending_run: see verify_pages."""
        track = self.types
        count = len(pfns)
        first = pfns[0]
        if ascending_run and first + count <= len(track):
            # one slice: new types, keeping POPULATED from before (never undone)
            old = int.from_bytes(track[first:first + count], "little")
            new = int.from_bytes(bytes(types).translate(_STORE), "little")
            keep = int.from_bytes(bytes([POPULATED]) * count, "little")
            track[first:first + count] = ((old & keep) | new).to_bytes(count, "little")
            return
        limit = len(track)
        for pfn, page_type in zip(pfns, types):
            if pfn < limit:
                track[pfn] = (track[pfn] & POPULATED) | _STORE[page_type]

    def known(self, pfn: int) -> bool:
        return pfn < len(self.types)

    def problem(self, pfn: int, wanted_level: int | None) -> str | None:
        """Why restore cannot use pfn as a NOTAB page (wanted_level None) or as a page table of that level."""
        if not self.known(pfn):
            return None
        value = self.types[pfn]
        if not value & POPULATED:
            return "was never sent"
        page_type = value & 0xF
        if wanted_level is None:
            return None if page_type == 0 else f"has page type {page_type:#x}, not NOTAB"
        return None if page_type & 7 == wanted_level else f"has page type {page_type:#x}, not an L{wanted_level} table"
