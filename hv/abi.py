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


# --- Guest geometry -------------------------------------------------------------------------------

WIDTH_32 = 4
WIDTH_64 = 8
LEVELS_FOR_WIDTH = {WIDTH_32: 3, WIDTH_64: 4}
ADDRESS_BITS_FOR_WIDTH = {WIDTH_32: 32, WIDTH_64: 64}
WIDTH_FOR_ADDRESS_BITS = {32: WIDTH_32, 64: WIDTH_64}


def frames_per_page(width: int) -> int:
    """P2M / frame-list entries that fit in one page for a guest of this width."""
    return PAGE_SIZE // width


INVALID_MFN = 0xFFFF_FFFF_FFFF_FFFF
INVALID_MFN_32 = 0xFFFF_FFFF
INVALID_MFN_FOR_WIDTH = {WIDTH_32: INVALID_MFN_32, WIDTH_64: INVALID_MFN}

# 2 MiB extents: the order-9 populate unit and the M2P mapping chunk.
SUPERPAGE_ORDER = 9
SUPERPAGE_FRAMES = 1 << SUPERPAGE_ORDER
MAX_BATCH_SIZE = 1024  # page-type query, PAGE_DATA batch and pin-op limit

# --- PFINFO codes as the page-type query returns them (32-bit words, type in bits 28-31) -----------

PFINFO_LTAB_SHIFT = 28
PFINFO_LTAB_MASK = 0xF << PFINFO_LTAB_SHIFT
PFINFO_LTABTYPE_MASK = 0x7 << PFINFO_LTAB_SHIFT
PFINFO_LPINTAB = PAGETYPE_LPINTAB << PFINFO_LTAB_SHIFT
PFINFO_NOTAB = PAGETYPE_NOTAB << PFINFO_LTAB_SHIFT
PFINFO_XTAB = PAGETYPE_XTAB << PFINFO_LTAB_SHIFT
PFINFO_BROKEN = PAGETYPE_BROKEN << PFINFO_LTAB_SHIFT
PFINFO_XALLOC = PAGETYPE_XALLOC << PFINFO_LTAB_SHIFT

KNOWN_PAGETYPES = frozenset(PAGETYPE_NAMES)


def pfinfo_from_pagetype(page_type: int) -> int:
    return page_type << PFINFO_LTAB_SHIFT


def pagetype_from_pfinfo(code: int) -> int:
    return (code >> PFINFO_LTAB_SHIFT) & 0xF


def pagetable_level(page_type: int) -> int:
    """1..4 for L1TAB..L4TAB, pinned or not; 0 for every other nibble (XTAB etc. share the pin bit)."""
    level = page_type & 0x7
    return level if 1 <= level <= 4 else 0


# --- Pagetable entries (8 bytes for 64-bit and PAE) -----------------------------------------------

PTE_SIZE = 8
PTES_PER_PAGE = PAGE_SIZE // PTE_SIZE
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_USER = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_PSE = 1 << 7  # large page in L2/L3 entries; PAT in L1 entries
PTE_GLOBAL = 1 << 8
PTE_NX = 1 << 63
PTE_FRAME_MASK = 0x000F_FFFF_FFFF_F000
PTE_FRAME_SHIFT = 12


def pte_frame(pte: int) -> int:
    return (pte & PTE_FRAME_MASK) >> PTE_FRAME_SHIFT


def pte_with_frame(pte: int, frame: int) -> int:
    return (pte & ~PTE_FRAME_MASK & 0xFFFF_FFFF_FFFF_FFFF) | ((frame << PTE_FRAME_SHIFT) & PTE_FRAME_MASK)


# Xen-owned slots (inclusive ranges) that the save side writes as zero and Xen refills on validation.
L4_XEN_SLOTS_64 = range(256, 272)  # 0xFFFF800000000000 - 0xFFFF87FFFFFFFFFF
PAE_L3_GUEST_SLOTS = 4  # only entries 0-3 of a PAE L3 belong to the guest
PAE_L3_XEN_SLOTS = range(4, 512)
PAE_L2_XEN_FIRST = 428  # (0xF5800000 >> 21) & 511: compat M2P mappings in the top-GiB L2
PAE_L2_XEN_SLOTS = range(PAE_L2_XEN_FIRST, 512)
PAE_TOP_L3_SLOT = 3  # the L3 entry naming the top-GiB L2; Xen requires it present

# Virtual ranges Xen keeps for itself (checked when validating a linear P2M address).
XEN_VIRT_START_64 = 0xFFFF_8000_0000_0000
XEN_VIRT_END_64 = 0xFFFF_8800_0000_0000
XEN_VIRT_START_32 = 0xF580_0000

# --- cr3 encodings (1.5.5) ------------------------------------------------------------------------


def cr3_from_mfn(mfn: int, width: int) -> int:
    """cr3 value naming `mfn`; 32-bit guests fold bits 20+ of the frame into the low bits."""
    if width == WIDTH_64:
        return (mfn << 12) & 0xFFFF_FFFF_FFFF_FFFF
    if mfn >= 1 << 32:
        return INVALID_MFN
    return ((mfn << 12) | (mfn >> 20)) & 0xFFFF_FFFF


def mfn_from_cr3(cr3: int, width: int) -> int:
    if width == WIDTH_64:
        return cr3 >> 12
    if cr3 >> 32:
        return INVALID_MFN
    return ((cr3 >> 12) | (cr3 << 20)) & 0xFFFF_FFFF


# --- vcpu_guest_context (public/arch-x86/xen.h), the two fixed layouts -----------------------------

VGCF_I387_VALID = 1 << 0
VGCF_IN_KERNEL = 1 << 2
VGCF_ONLINE = 1 << 5
MAX_GDT_ENTS = 14 * 512  # FIRST_RESERVED_GDT_ENTRY: 14 pages of 512 eight-byte descriptors
GDT_ENTRIES_PER_PAGE = 512
GDT_FRAME_SLOTS = 16


def gdt_frames_used(gdt_ents: int) -> int:
    return (gdt_ents + GDT_ENTRIES_PER_PAGE - 1) // GDT_ENTRIES_PER_PAGE


class VcpuContextLayout:
    """Byte offsets of the fields the engines and the simulator interpret; word = guest width."""

    __slots__ = ("width", "size", "flags", "user_regs", "rdx", "rsi", "rax", "rip", "rsp",
                 "trap_ctxt", "ldt_base", "ldt_ents", "gdt_frames", "gdt_ents", "kernel_ss",
                 "kernel_sp", "ctrlreg", "debugreg", "vm_assist", "word")

    def __init__(self, **fields: int) -> None:
        for name, value in fields.items():
            setattr(self, name, value)
        self.word = "<Q" if self.width == WIDTH_64 else "<I"

    def ctrlreg_offset(self, index: int) -> int:
        return self.ctrlreg + index * self.width


VCPU_CONTEXT_64 = VcpuContextLayout(
    width=WIDTH_64, size=5168, flags=512, user_regs=520, rdx=616, rsi=624, rax=600, rip=648,
    rsp=672, trap_ctxt=720, ldt_base=4816, ldt_ents=4824, gdt_frames=4832, gdt_ents=4960,
    kernel_ss=4968, kernel_sp=4976, ctrlreg=4984, debugreg=5048, vm_assist=5136,
)
VCPU_CONTEXT_32 = VcpuContextLayout(
    width=WIDTH_32, size=2800, flags=512, user_regs=516, rdx=524, rsi=528, rax=540, rip=548,
    rsp=560, trap_ctxt=584, ldt_base=2632, ldt_ents=2636, gdt_frames=2640, gdt_ents=2704,
    kernel_ss=2708, kernel_sp=2712, ctrlreg=2716, debugreg=2748, vm_assist=2796,
)
VCPU_CONTEXT_LAYOUTS = {WIDTH_64: VCPU_CONTEXT_64, WIDTH_32: VCPU_CONTEXT_32}
VCPU_CONTEXT_SIZES = {WIDTH_64: 5168, WIDTH_32: 2800}

EXT_VCPU_CONTEXT_MAX = 128  # the domctl union; the restorer accepts blobs up to this
EXT_VCPU_CONTEXT_SIZE = 64  # what current Xen reports in the blob's size field
XSAVE_HEADER_SIZE = 16  # xcr0 + xcr0_accum ahead of the xsave area
MSR_ENTRY_SIZE = 16  # u32 index, u32 reserved, u64 value
CPUID_LEAF_SIZE = 24  # u32 leaf, subleaf, a, b, c, d
MSR_POLICY_ENTRY_SIZE = 16  # u32 idx, u32 flags, u64 val

# --- start_info (public/xen.h) --------------------------------------------------------------------


class StartInfoLayout:
    __slots__ = ("width", "size", "magic", "nr_pages", "shared_info", "flags", "store_mfn",
                 "store_evtchn", "console_mfn", "console_evtchn", "pt_base", "nr_pt_frames",
                 "mfn_list", "cmd_line", "word")

    def __init__(self, **fields: int) -> None:
        for name, value in fields.items():
            setattr(self, name, value)
        self.word = "<Q" if self.width == WIDTH_64 else "<I"


START_INFO_64 = StartInfoLayout(width=WIDTH_64, size=1168, magic=0, nr_pages=32, shared_info=40,
                                flags=48, store_mfn=56, store_evtchn=64, console_mfn=72,
                                console_evtchn=80, pt_base=88, nr_pt_frames=96, mfn_list=104,
                                cmd_line=128)
START_INFO_32 = StartInfoLayout(width=WIDTH_32, size=1112, magic=0, nr_pages=32, shared_info=36,
                                flags=40, store_mfn=44, store_evtchn=48, console_mfn=52,
                                console_evtchn=56, pt_base=60, nr_pt_frames=64, mfn_list=68,
                                cmd_line=80)
START_INFO_LAYOUTS = {WIDTH_64: START_INFO_64, WIDTH_32: START_INFO_32}
START_INFO_MAGIC = {WIDTH_64: b"xen-3.0-x86_64", WIDTH_32: b"xen-3.0-x86_32p"}
MAX_GUEST_CMDLINE = 1024

# --- shared_info (public/xen.h + arch-x86/xen.h) ---------------------------------------------------

XEN_LEGACY_MAX_VCPUS = 32
VCPU_INFO_SIZE = 64


class SharedInfoLayout:
    __slots__ = ("width", "size", "vcpu_info", "evtchn_pending_sel", "evtchn_pending",
                 "evtchn_mask", "evtchn_bytes", "wc_version", "wc_sec", "wc_nsec", "arch",
                 "max_pfn", "pfn_to_mfn_frame_list_list", "nmi_reason", "p2m_cr3", "p2m_vaddr",
                 "p2m_generation", "arch_end", "word")

    def __init__(self, **fields: int) -> None:
        for name, value in fields.items():
            setattr(self, name, value)
        self.word = "<Q" if self.width == WIDTH_64 else "<I"


# evtchn_pending_sel is an offset inside each 64-byte vcpu_info.
SHARED_INFO_64 = SharedInfoLayout(width=WIDTH_64, size=3136, vcpu_info=0, evtchn_pending_sel=8,
                                  evtchn_pending=2048, evtchn_mask=2560, evtchn_bytes=512,
                                  wc_version=3072, wc_sec=3076, wc_nsec=3080, arch=3088,
                                  max_pfn=3088, pfn_to_mfn_frame_list_list=3096, nmi_reason=3104,
                                  p2m_cr3=3112, p2m_vaddr=3120, p2m_generation=3128, arch_end=3136)
SHARED_INFO_32 = SharedInfoLayout(width=WIDTH_32, size=2344, vcpu_info=0, evtchn_pending_sel=4,
                                  evtchn_pending=2048, evtchn_mask=2176, evtchn_bytes=128,
                                  wc_version=2304, wc_sec=2308, wc_nsec=2312, arch=2316,
                                  max_pfn=2316, pfn_to_mfn_frame_list_list=2320, nmi_reason=2324,
                                  p2m_cr3=2328, p2m_vaddr=2332, p2m_generation=2336, arch_end=2344)
SHARED_INFO_LAYOUTS = {WIDTH_64: SHARED_INFO_64, WIDTH_32: SHARED_INFO_32}

# --- Domain info flags, shutdown reasons, grant table, console ring --------------------------------

DOMINFO_HVM = 1 << 1
DOMINFO_SHUTDOWN = 1 << 2
DOMINFO_PAUSED = 1 << 3
DOMINFO_SHUTDOWN_SHIFT = 16
SHUTDOWN_POWEROFF = 0
SHUTDOWN_REBOOT = 1
SHUTDOWN_SUSPEND = 2
SHUTDOWN_CRASH = 3

DOMID_FIRST_RESERVED = 0x7FF0  # domids from here up name Xen itself, IO, COW, ...: never a guest
DOMID_XEN = 0x7FF2
DOMID_INVALID = 0x7FF4

GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1
GTF_PERMIT_ACCESS = 1
GRANT_ENTRY_V1_SIZE = 8  # u16 flags, u16 domid, u32 frame

XENCONSOLE_CONNECTION_OFFSET = 3088  # struct xencons_interface.connection
XENCONSOLE_DISCONNECTED = 1

MMUEXT_PIN_OPS = {1: 0, 2: 1, 3: 2, 4: 3}  # level -> MMUEXT_PIN_Ln_TABLE
