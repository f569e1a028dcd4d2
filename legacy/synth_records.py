"""Synthetic contents of the v1 stream's opaque parts: xl config, HVM context, qemu state, tmem pools.

Deterministic from a seed; shaped like what Xen 4.5 and its device models produce, so parsers and
converters see realistic sizes and structure.
"""

import json
import random
import struct

import attrs

from xenstream.hv.abi import PAGE_SIZE

HVM_SAVE_MAGIC = 0x54381286
HVM_SAVE_VERSION = 1
# public/hvm/save.h typecodes and 4.5 record lengths, for the records a small HVM guest has
HVM_TYPE_END, HVM_TYPE_HEADER, HVM_TYPE_CPU, HVM_TYPE_PIC, HVM_TYPE_IOAPIC = 0, 1, 2, 3, 4
HVM_TYPE_LAPIC, HVM_TYPE_LAPIC_REGS, HVM_TYPE_RTC, HVM_TYPE_PMTIMER, HVM_TYPE_MTRR = 5, 6, 11, 13, 14
_PER_VCPU_RECORDS = ((HVM_TYPE_CPU, 1024), (HVM_TYPE_LAPIC, 24), (HVM_TYPE_LAPIC_REGS, 1024),
                     (HVM_TYPE_MTRR, 664))
_DOMAIN_RECORDS = ((HVM_TYPE_PIC, 0, 8), (HVM_TYPE_PIC, 1, 8), (HVM_TYPE_IOAPIC, 0, 216),
                   (HVM_TYPE_RTC, 0, 24), (HVM_TYPE_PMTIMER, 0, 8))


def xl_json_config(name: str, guest: str, memory_kib: int, vcpus: int) -> bytes:
    """libxl_domain_config JSON as xl 4.5 stores it, NUL-terminated (counted in config_len)."""
    config = {
        "c_info": {"type": guest, "name": name, "uuid": "5ecd1e5e-0b5e-4a0d-9e1f-%012x" % (memory_kib,)},
        "b_info": {"max_vcpus": vcpus, "max_memkb": memory_kib, "target_memkb": memory_kib,
                   "type.%s" % guest: {} if guest == "pv" else {"vga": {"kind": "cirrus"}}},
        "disks": [{"pdev_path": "/dev/vg0/%s" % name, "vdev": "xvda", "format": "raw", "readwrite": 1}],
        "nics": [{"devid": 0, "mac": "00:16:3e:12:34:56", "bridge": "xenbr0"}],
        "on_reboot": "restart",
    }
    return json.dumps(config, indent=4).encode() + b"\0"


def xl_text_config(name: str, guest: str, memory_kib: int, vcpus: int) -> bytes:
    """An xl config file as xl 4.1 ... 4.4 stored it verbatim (no NUL)."""
    lines = [f'name = "{name}"', f"memory = {memory_kib // 1024}", f"vcpus = {vcpus}",
             f"disk = [ 'phy:/dev/vg0/{name},xvda,w' ]", "vif = [ 'bridge=xenbr0' ]"]
    lines.insert(0, 'builder = "hvm"' if guest == "hvm" else 'bootloader = "pygrub"')
    return ("\n".join(lines) + "\n").encode()


def hvm_context(seed: int, vcpus: int, gtsc_khz: int) -> bytes:
    """An HVM context blob: HEADER, per-VCPU and platform records, END (spec 4.3)."""
    rng = random.Random(seed * 7919 + 17)
    out = bytearray()
    header = struct.pack("<IIQII", HVM_SAVE_MAGIC, HVM_SAVE_VERSION, 0, 0x000306C3, gtsc_khz)
    out += struct.pack("<HHI", HVM_TYPE_HEADER, 0, len(header)) + header
    for typecode, length in _PER_VCPU_RECORDS:
        for vcpu in range(vcpus):
            out += struct.pack("<HHI", typecode, vcpu, length) + rng.randbytes(length)
    for typecode, instance, length in _DOMAIN_RECORDS:
        out += struct.pack("<HHI", typecode, instance, length) + rng.randbytes(length)
    out += struct.pack("<HHI", HVM_TYPE_END, 0, 0)
    return bytes(out)


def qemu_state(seed: int, size: int = 3000) -> bytes:
    """Device-model state: qemu's savevm format, "QEVM" + version 3, then section data."""
    rng = random.Random(seed * 104729 + 3)
    body = bytearray(struct.pack(">4sI", b"QEVM", 3))
    section = 0
    while len(body) < size:
        name = b"section%d" % section
        data = rng.randbytes(min(400, size - len(body)))
        body += struct.pack(">BIB", 1, section, len(name)) + name + struct.pack(">II", 0, 1) + data
        section += 1
    body.append(0x1F)  # QEMU_VM_EOF
    return bytes(body)


@attrs.frozen
class SyntheticTmemPage:
    object_id: tuple[int, int, int]
    index: int
    data: bytes


@attrs.frozen
class SyntheticTmemPool:
    pool_id: int
    flags: int
    uuid: tuple[int, int]
    pages: tuple[SyntheticTmemPage, ...]


def tmem_pools(seed: int, pages_per_pool: int = 2) -> tuple[SyntheticTmemPool, ...]:
    """One persistent pool with pages and one ephemeral pool (whose page count the saver forces to 0)."""
    rng = random.Random(seed * 15485863 + 5)
    persistent = SyntheticTmemPool(0, 0x1 | (1 << 24), (rng.randrange(1 << 64), rng.randrange(1 << 64)), tuple(
        SyntheticTmemPage((rng.randrange(1 << 32), 0, 0), rng.randrange(1 << 16), rng.randbytes(PAGE_SIZE))
        for _ in range(pages_per_pool)))
    ephemeral = SyntheticTmemPool(1, 1 << 24, (rng.randrange(1 << 64), rng.randrange(1 << 64)), ())
    return persistent, ephemeral
