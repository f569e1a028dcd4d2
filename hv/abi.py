"""Xen ABI facts that both stream formats need, stated once.

Values from Xen's public headers (xen/include/public/domctl.h, arch-x86/xen.h).
"""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# Page type nibble as carried in a PFINFO word (v1 batches and v2 PAGE_DATA both use
# the top nibble of a 32-bit word; v2 shifts it to bits 60-63 of a 64-bit word).
PAGETYPE_NOTAB = 0x0
PAGETYPE_L1TAB = 0x1
PAGETYPE_L2TAB = 0x2
PAGETYPE_L3TAB = 0x3
PAGETYPE_L4TAB = 0x4
PAGETYPE_LPINTAB = 0x8  # "pinned" flag, ORed with an Ln type
PAGETYPE_BROKEN = 0xD
PAGETYPE_XALLOC = 0xE
PAGETYPE_XTAB = 0xF

PAGETYPE_NAMES = {
    PAGETYPE_NOTAB: "NOTAB",
    PAGETYPE_L1TAB: "L1TAB",
    PAGETYPE_L2TAB: "L2TAB",
    PAGETYPE_L3TAB: "L3TAB",
    PAGETYPE_L4TAB: "L4TAB",
    PAGETYPE_L1TAB | PAGETYPE_LPINTAB: "L1TAB|PIN",
    PAGETYPE_L2TAB | PAGETYPE_LPINTAB: "L2TAB|PIN",
    PAGETYPE_L3TAB | PAGETYPE_LPINTAB: "L3TAB|PIN",
    PAGETYPE_L4TAB | PAGETYPE_LPINTAB: "L4TAB|PIN",
    PAGETYPE_BROKEN: "BROKEN",
    PAGETYPE_XALLOC: "XALLOC",
    PAGETYPE_XTAB: "XTAB",
}

# Types whose entries carry no page payload in either format.
PAGETYPES_WITHOUT_DATA = frozenset({PAGETYPE_XTAB, PAGETYPE_BROKEN, PAGETYPE_XALLOC})


def pagetype_has_data(page_type: int) -> bool:
    return page_type not in PAGETYPES_WITHOUT_DATA


def pagetype_name(page_type: int) -> str:
    return PAGETYPE_NAMES.get(page_type, f"0x{page_type:x}")
