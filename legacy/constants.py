"""Wire constants of the legacy v1 stream and the wrappers around it (spec legacy-v1-stream.md).

Only v1 facts live here; facts shared with v2 (page size, PFINFO types) are in `xenstream.hv.abi`.
"""

# --- chunk ids (XC_SAVE_ID_*, spec 2.4.4); a positive id is a page batch count ---------------------
CHUNK_ENABLE_VERIFY_MODE = -1
CHUNK_VCPU_INFO = -2
CHUNK_HVM_IDENT_PT = -3
CHUNK_HVM_VM86_TSS = -4
CHUNK_TMEM = -5
CHUNK_TMEM_EXTRA = -6
CHUNK_TSC_INFO = -7
CHUNK_HVM_CONSOLE_PFN = -8
CHUNK_LAST_CHECKPOINT = -9
CHUNK_HVM_ACPI_IOPORTS_LOCATION = -10
CHUNK_HVM_VIRIDIAN = -11
CHUNK_COMPRESSED_DATA = -12
CHUNK_ENABLE_COMPRESSION = -13
CHUNK_HVM_GENERATION_ID_ADDR = -14
CHUNK_HVM_PAGING_RING_PFN = -15
CHUNK_HVM_ACCESS_RING_PFN = -16
CHUNK_HVM_SHARING_RING_PFN = -17
CHUNK_TOOLSTACK = -18
CHUNK_HVM_IOREQ_SERVER_PFN = -19
CHUNK_HVM_NR_IOREQ_SERVER_PAGES = -20
CHUNK_HVM_X87_FIP_WIDTH = -21

CHUNK_NAMES = {
    CHUNK_ENABLE_VERIFY_MODE: "ENABLE_VERIFY_MODE",
    CHUNK_VCPU_INFO: "VCPU_INFO",
    CHUNK_HVM_IDENT_PT: "HVM_IDENT_PT",
    CHUNK_HVM_VM86_TSS: "HVM_VM86_TSS",
    CHUNK_TMEM: "TMEM",
    CHUNK_TMEM_EXTRA: "TMEM_EXTRA",
    CHUNK_TSC_INFO: "TSC_INFO",
    CHUNK_HVM_CONSOLE_PFN: "HVM_CONSOLE_PFN",
    CHUNK_LAST_CHECKPOINT: "LAST_CHECKPOINT",
    CHUNK_HVM_ACPI_IOPORTS_LOCATION: "HVM_ACPI_IOPORTS_LOCATION",
    CHUNK_HVM_VIRIDIAN: "HVM_VIRIDIAN",
    CHUNK_COMPRESSED_DATA: "COMPRESSED_DATA",
    CHUNK_ENABLE_COMPRESSION: "ENABLE_COMPRESSION",
    CHUNK_HVM_GENERATION_ID_ADDR: "HVM_GENERATION_ID_ADDR",
    CHUNK_HVM_PAGING_RING_PFN: "HVM_PAGING_RING_PFN",
    CHUNK_HVM_ACCESS_RING_PFN: "HVM_ACCESS_RING_PFN",
    CHUNK_HVM_SHARING_RING_PFN: "HVM_SHARING_RING_PFN",
    CHUNK_TOOLSTACK: "TOOLSTACK",
    CHUNK_HVM_IOREQ_SERVER_PFN: "HVM_IOREQ_SERVER_PFN",
    CHUNK_HVM_NR_IOREQ_SERVER_PAGES: "HVM_NR_IOREQ_SERVER_PAGES",
    CHUNK_HVM_X87_FIP_WIDTH: "HVM_X87_FIP_WIDTH",
}

# The 16-byte `i32 id, u32 pad, u64 value` chunks, with the HVM parameter index each one sets
# (public/hvm/params.h), as the restorer and the converter map them.
HVM_PARAM_CHUNKS = {
    CHUNK_HVM_IDENT_PT: 12,
    CHUNK_HVM_VM86_TSS: 15,
    CHUNK_HVM_CONSOLE_PFN: 17,
    CHUNK_HVM_ACPI_IOPORTS_LOCATION: 19,
    CHUNK_HVM_VIRIDIAN: 9,
    CHUNK_HVM_GENERATION_ID_ADDR: 34,
    CHUNK_HVM_PAGING_RING_PFN: 27,
    CHUNK_HVM_ACCESS_RING_PFN: 28,
    CHUNK_HVM_SHARING_RING_PFN: 29,
    CHUNK_HVM_IOREQ_SERVER_PFN: 32,
    CHUNK_HVM_NR_IOREQ_SERVER_PAGES: 33,
    CHUNK_HVM_X87_FIP_WIDTH: 36,
}

MAX_BATCH_SIZE = 1024  # MAX_BATCH_SIZE in xg_save_restore.h
MAX_VCPU_ID = 4095  # XC_SR_MAX_VCPUS - 1
MAX_P2M_SIZE = 0x0FFFFFFF  # a PFN must fit the 28 bits of a pfn_type entry

# --- pfn_type entries (spec 2.4.1): same bit positions for both toolstack widths -----------------
PFN_MASK = 0x0FFFFFFF
TYPE_SHIFT = 28
XTAB_ENTRY = 0xF0000000  # what every 4.x XTAB entry is: the bare type, no PFN
PAGE_TYPES_REJECTED = frozenset({0x5, 0x6, 0x7})  # "bogus page type" in the restorer

# --- extended-info block (spec 2.2) --------------------------------------------------------------
EXT_BLOCK_VCPU = b"vcpu"
EXT_BLOCK_EXTV = b"extv"
EXT_BLOCK_XCNT = b"xcnt"
VCPU_CONTEXT_SIZE_32 = 0xAF0  # vcpu_guest_context_x86_32_t
VCPU_CONTEXT_SIZE_64 = 0x1430  # vcpu_guest_context_x86_64_t
# guest word size and paging levels, selected by the "vcpu" block size
GUEST_BY_VCPU_CONTEXT_SIZE = {VCPU_CONTEXT_SIZE_32: (4, 3), VCPU_CONTEXT_SIZE_64: (8, 4)}
EXTENDED_CONTEXT_SIZE = 128
XSAVE_HEADER_SIZE = 16  # u64 xfeature_mask, u64 size

# --- PV and HVM tails (spec 3, 4.3) --------------------------------------------------------------
SHARED_INFO_SIZE = 4096
HVM_MAGIC_PFNS_SIZE = 24

# --- device-model records after the HVM tail (spec 4.4) ------------------------------------------
DM_SIGNATURE_LEN = 21
DM_SIG_LIBXL = b"DeviceModelRecord0002"
DM_SIG_REMUS = b"RemusDeviceModelState"
DM_SIG_QEMU = b"QemuDeviceModelRecord"
QEMU_STATE_MAGIC = b"QEVM"

# --- wrappers in front of the libxc stream (spec 1, 1.5, 10.1) -----------------------------------
XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER = 0x01020304
XL_FIXED_SIZE = 48
XL_FLAG_JSON = 0x1
XL_FLAG_STREAMV2 = 0x2
XL_KNOWN_MANDATORY_FLAGS = XL_FLAG_JSON
XL_GO_MESSAGE = b"domain is yours, you are cleared to unpause\0"

XEND_MAGIC = b"LinuxGuestRecord"

# libvirt's libxl driver (src/libxl): 16-byte magic, u32 version, u32 xml length, 40 unused bytes,
# then the NUL-terminated domain XML, then a libxl stream (version 1: v1, version 2: v2).
LIBVIRT_MAGIC = b"libvirt-xml\n \0 \r"
LIBVIRT_FIXED_SIZE = 64
LIBVIRT_VERSION_V1 = 1
LIBVIRT_VERSION_V2 = 2

# XenServer's classic xenopsd put this in front of the libxc stream, and after the HVM tail wrote
# "QemuDeviceModelRecord\n" with a big-endian u32 length (xen-api doc/content/xenopsd/design).
XENOPS_MAGIC = b"XenSavedDomain\n"

V2_LIBXL_MAGIC = b"LibxlFmt"
V2_LIBXC_MARKER = b"\xff" * 8 + b"XENF"

# --- sanity bounds: no allocation is sized by a field before it passes one of these ---------------
MAX_EXTENDED_INFO_TOTAL = 1 << 20  # real blocks total 0x144C at most
MAX_XSAVE_RECORD = 1 << 16  # 16-byte header + XSAVE area (AVX-512 needs under 3 KiB)
MAX_HVM_CONTEXT = 16 << 20  # hvm save records of a few hundred vcpus fit in well under this
MAX_TOOLSTACK = 16 << 20  # libxl physmap entries: tens of bytes each
MAX_WRAPPER_DATA = 16 << 20  # xl optional data, xend / libvirt config
# The saver compresses straight into its 16 MiB output buffer (OUTBUF_SIZE), one chunk at a time.
MAX_COMPRESSED_CHUNK = 16 << 20
DEVICE_MODEL_PIECE = 1 << 20  # qemu state comes out in pieces of this size, whatever the feeding
