"""Numbers of the v2/v3 stream family (libxc layer, libxl layer, xl save-file header).

Source: /work/shared/spec/stream-v2.md, appendix A and sections 1-5.
"""

from __future__ import annotations

# ---- framing (both record layers) ----
RECORD_HEADER_SIZE = 8
RECORD_ALIGN = 8
# Xen's REC_LENGTH_MAX. Xen enforces it on libxc records only; we apply it to libxl records too so that
# no claimed length can make a reader buffer more than this (spec A27).
RECORD_LENGTH_MAX = 0x08000000
OPTIONAL_RECORD_BIT = 0x80000000

# ---- libxc image header (big-endian) ----
IMAGE_MARKER = 0xFFFFFFFFFFFFFFFF
IMAGE_ID = 0x58454E46  # "XENF"
IMAGE_VERSIONS = (2, 3)
IMAGE_OPTION_BIG_ENDIAN = 0x0001
IMAGE_HEADER_SIZE = 24

# ---- libxc domain header ----
DOMAIN_HEADER_SIZE = 16
DOMAIN_TYPE_X86_PV = 1
DOMAIN_TYPE_X86_HVM = 2
DOMAIN_TYPE_NAMES = {DOMAIN_TYPE_X86_PV: "x86 PV", DOMAIN_TYPE_X86_HVM: "x86 HVM"}

# ---- libxc record types ----
REC_END = 0x00
REC_PAGE_DATA = 0x01
REC_X86_PV_INFO = 0x02
REC_X86_PV_P2M_FRAMES = 0x03
REC_X86_PV_VCPU_BASIC = 0x04
REC_X86_PV_VCPU_EXTENDED = 0x05
REC_X86_PV_VCPU_XSAVE = 0x06
REC_SHARED_INFO = 0x07
REC_X86_TSC_INFO = 0x08
REC_HVM_CONTEXT = 0x09
REC_HVM_PARAMS = 0x0A
REC_TOOLSTACK = 0x0B
REC_X86_PV_VCPU_MSRS = 0x0C
REC_VERIFY = 0x0D
REC_CHECKPOINT = 0x0E
REC_CHECKPOINT_DIRTY_PFN_LIST = 0x0F
REC_STATIC_DATA_END = 0x10
REC_X86_CPUID_POLICY = 0x11
REC_X86_MSR_POLICY = 0x12

# ---- PAGE_DATA pfn words ----
PFN_MASK = 0x000FFFFFFFFFFFFF
PFN_RESERVED_MASK = 0x0FF0000000000000
PFN_TYPE_SHIFT = 60
# Types 0x5-0x8 are not valid page types (0x8 alone would be "pinned" without a level).
INVALID_PAGE_TYPES = frozenset({0x5, 0x6, 0x7, 0x8})
MAX_BATCH_SIZE = 1024  # what Xen's saver puts in one PAGE_DATA record

# ---- libxl stream header (big-endian) ----
LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_HEADER_SIZE = 16
LIBXL_OPTION_BIG_ENDIAN = 0x1
LIBXL_OPTION_LEGACY = 0x2

# ---- libxl record types ----
LIBXL_REC_END = 0
LIBXL_REC_LIBXC_CONTEXT = 1
LIBXL_REC_EMULATOR_XENSTORE_DATA = 2
LIBXL_REC_EMULATOR_CONTEXT = 3
LIBXL_REC_CHECKPOINT_END = 4
LIBXL_REC_CHECKPOINT_STATE = 5

EMULATOR_UNKNOWN = 0
EMULATOR_QEMU_TRADITIONAL = 1
EMULATOR_QEMU_UPSTREAM = 2
EMULATOR_NAMES = {
    EMULATOR_UNKNOWN: "unknown",
    EMULATOR_QEMU_TRADITIONAL: "qemu-traditional",
    EMULATOR_QEMU_UPSTREAM: "qemu-upstream",
}

CHECKPOINT_STATE_NEW = 0
CHECKPOINT_STATE_SVM_SUSPENDED = 1
CHECKPOINT_STATE_SVM_READY = 2
CHECKPOINT_STATE_SVM_RESUMED = 3
CHECKPOINT_STATE_NAMES = {
    CHECKPOINT_STATE_NEW: "NEW",
    CHECKPOINT_STATE_SVM_SUSPENDED: "SVM_SUSPENDED",
    CHECKPOINT_STATE_SVM_READY: "SVM_READY",
    CHECKPOINT_STATE_SVM_RESUMED: "SVM_RESUMED",
}

# ---- xl save-file header ----
XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER = 0x01020304
XL_HEADER_SIZE = 48  # magic + byteorder + mandatory + optional flags + optional_data_len
XL_FLAG_JSON = 0x1
XL_FLAG_STREAMV2 = 0x2
XL_KNOWN_MANDATORY_FLAGS = XL_FLAG_JSON | XL_FLAG_STREAMV2
# xl's optional data holds the domain configuration (a few KiB); a larger claim is refused before buffering.
XL_OPTIONAL_DATA_MAX = 16 << 20

# Not a stream field: Linux's limit on the buffers of one readv/writev, which every fd driver here respects.
IOV_MAX = 1024

# ---- vcpu context sizes (Xen, tools/include/xen-foreign/reference.size) ----
VCPU_CONTEXT_SIZE_64 = 5168
VCPU_CONTEXT_SIZE_32 = 2800
