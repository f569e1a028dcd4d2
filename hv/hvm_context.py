"""The HVM context blob (XEN_DOMCTL_{get,set}hvmcontext) as Xen frames and checks it.

A blob is a run of save records with no padding: a descriptor ``{u16 typecode, u16 instance, u32 length}``
then ``length`` bytes (public/hvm/save.h). It opens with a HEADER record (typecode 1, 24 bytes: u32
magic 0x54381286, u32 version 1, u64 changeset, u32 cpuid, u32 gtsc_khz) and closes with END (typecode
0, length 0). Xen saves the record kinds in typecode order, the per-vcpu kinds once per vcpu
(xen/arch/x86/hvm/save.c: hvm_save).

`check_context` refuses a blob the way hvm_load does (its check pass, then what the load handlers
refuse): a missing or malformed HEADER, a bad magic or version, an unknown typecode, a record running
past the end, no END record, a per-vcpu record naming a vcpu the domain does not have, a fixed-size
record of the wrong length. The sizes are Xen 4.17+'s x86 structures (measured with sizeof over the
public headers).
"""

from __future__ import annotations

import errno
import struct

import attrs

from xenstream.hv.interface import HypervisorError

HVM_FILE_MAGIC = 0x54381286
HVM_FILE_VERSION = 1
DESCRIPTOR = struct.Struct("<HHI")
HEADER = struct.Struct("<IIQII")

CODE_END = 0
CODE_HEADER = 1
CODE_CPU = 2
CODE_CPU_XSAVE = 16
CODE_CPU_MSR = 20


@attrs.frozen
class SaveKind:
    """One typecode: its name, its size (None: variable, checked by its own handler) and whether Xen
    saves it once per vcpu (instance = vcpu id) or once per domain."""

    name: str
    size: int | None
    per_vcpu: bool


SAVE_KINDS: dict[int, SaveKind] = {
    CODE_CPU: SaveKind("CPU", 1032, True),
    3: SaveKind("PIC", 8, False),
    4: SaveKind("IOAPIC", 400, False),
    5: SaveKind("LAPIC", 32, True),
    6: SaveKind("LAPIC_REGS", 1024, True),
    7: SaveKind("PCI_IRQ", 16, False),
    8: SaveKind("ISA_IRQ", 8, False),
    9: SaveKind("PCI_LINK", 8, False),
    10: SaveKind("PIT", 56, False),
    11: SaveKind("RTC", 24, False),
    12: SaveKind("HPET", 1048, False),
    13: SaveKind("PMTIMER", 8, False),
    14: SaveKind("MTRR", 240, True),
    15: SaveKind("VIRIDIAN_DOMAIN", 32, False),
    CODE_CPU_XSAVE: SaveKind("CPU_XSAVE", None, True),
    17: SaveKind("VIRIDIAN_VCPU", 216, True),
    18: SaveKind("VMCE_VCPU", 32, True),
    19: SaveKind("TSC_ADJUST", 8, True),
    CODE_CPU_MSR: SaveKind("CPU_MSR", None, True),
}
_NAMES = {CODE_END: "END", CODE_HEADER: "HEADER", **{code: kind.name for code, kind in SAVE_KINDS.items()}}


def record_name(typecode: int) -> str:
    return _NAMES.get(typecode, f"unknown({typecode})")


@attrs.frozen
class ContextRecord:
    """One save record of a blob: where its descriptor starts and what it says."""

    offset: int
    typecode: int
    instance: int
    length: int

    @property
    def name(self) -> str:
        return record_name(self.typecode)


@attrs.frozen
class ContextHeader:
    magic: int
    version: int
    changeset: int
    cpuid: int
    gtsc_khz: int


def encode_record(typecode: int, instance: int, body: bytes) -> bytes:
    return DESCRIPTOR.pack(typecode, instance, len(body)) + body


def encode_header(header: ContextHeader) -> bytes:
    return encode_record(CODE_HEADER, 0, HEADER.pack(header.magic, header.version, header.changeset,
                                                     header.cpuid, header.gtsc_khz))


def _refuse(err: int, message: str) -> HypervisorError:
    return HypervisorError(err, f"HVM context refused: {message}")


def read_header(blob: bytes | memoryview) -> ContextHeader:
    """The HEADER record, which must come first with exactly its size (Xen's hvm_get_entry)."""
    if len(blob) < DESCRIPTOR.size:
        raise _refuse(errno.ENODATA, f"{len(blob)} bytes cannot hold the HEADER record's descriptor")
    typecode, _, length = DESCRIPTOR.unpack_from(blob, 0)
    if typecode != CODE_HEADER or length != HEADER.size or length > len(blob) - DESCRIPTOR.size:
        raise _refuse(errno.ENODATA, f"first record is {record_name(typecode)} of {length} bytes, "
                                     f"expected HEADER of {HEADER.size}")
    header = ContextHeader(*HEADER.unpack_from(blob, DESCRIPTOR.size))
    if header.magic != HVM_FILE_MAGIC:
        raise _refuse(errno.EINVAL, f"bad magic {header.magic:#x} (expected {HVM_FILE_MAGIC:#x})")
    if header.version != HVM_FILE_VERSION:
        raise _refuse(errno.EINVAL, f"unsupported version {header.version}")
    return header


def check_context(blob: bytes | memoryview, vcpus: int) -> list[ContextRecord]:
    """Every record after the HEADER up to (not including) END, or HypervisorError saying why Xen refuses
    the blob for a domain with `vcpus` vcpus. Bytes after END are ignored, as Xen ignores them."""
    read_header(blob)
    records: list[ContextRecord] = []
    pos = DESCRIPTOR.size + HEADER.size
    while True:
        if len(blob) - pos < DESCRIPTOR.size:
            raise _refuse(errno.ENODATA, f"no END record (blob ends at byte {len(blob)})")
        typecode, instance, length = DESCRIPTOR.unpack_from(blob, pos)
        if typecode == CODE_END:
            return records
        kind = SAVE_KINDS.get(typecode)
        if kind is None:
            raise _refuse(errno.EINVAL, f"unknown record typecode {typecode} at byte {pos}")
        if length > len(blob) - pos - DESCRIPTOR.size:
            raise _refuse(errno.ENODATA, f"{kind.name} record at byte {pos} claims {length} bytes, "
                                         f"{len(blob) - pos - DESCRIPTOR.size} remain")
        if kind.per_vcpu and instance >= vcpus:
            raise _refuse(errno.EINVAL, f"{kind.name} record at byte {pos} names vcpu {instance}; "
                                        f"the domain has {vcpus}")
        if kind.size is not None and length != kind.size:
            raise _refuse(errno.EINVAL, f"{kind.name} record at byte {pos} is {length} bytes, expected {kind.size}")
        records.append(ContextRecord(pos, typecode, instance, length))
        pos += DESCRIPTOR.size + length


def list_records(blob: bytes | memoryview) -> list[ContextRecord]:
    """The framing of a blob, HEADER and END included, without judging content (for reports).

    Stops at END or at the first descriptor that does not fit."""
    records: list[ContextRecord] = []
    pos = 0
    while len(blob) - pos >= DESCRIPTOR.size:
        typecode, instance, length = DESCRIPTOR.unpack_from(blob, pos)
        if length > len(blob) - pos - DESCRIPTOR.size:
            break
        records.append(ContextRecord(pos, typecode, instance, length))
        if typecode == CODE_END:
            break
        pos += DESCRIPTOR.size + length
    return records
