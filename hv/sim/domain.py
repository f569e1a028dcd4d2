"""Per-domain state the simulated Xen keeps: vcpus, TSC, policy, log-dirty, HVM bits."""

from __future__ import annotations

from array import array

import attrs

from xenstream.hv import abi
from xenstream.hv.interface import CpuPolicy, TscInfo, VcpuContext, XsaveState


def blank_vcpu_context(width: int) -> VcpuContext:
    return VcpuContext.unpack(bytes(abi.VCPU_CONTEXT_SIZES[width]), width)


@attrs.define
class Vcpu:
    vcpu_id: int
    online: bool
    context: VcpuContext
    ext_context: bytes
    xsave: XsaveState
    msrs: bytes
    # Frames this vcpu holds type references on (cr3 root, ctrlreg[1] root, GDT frames).
    held_roots: list[tuple[int, int]] = attrs.field(factory=list)  # (mfn, machine type)


@attrs.define
class LogDirty:
    enabled: bool = False
    bits: bytearray = attrs.field(factory=bytearray)  # bit pfn set = dirty
    fault_count: int = 0

    def mark(self, pfn: int) -> None:
        byte = pfn >> 3
        if byte >= len(self.bits):
            if pfn > abi.INVALID_MFN_32 * 16:  # junk M2P entries: nothing to track
                return
            self.bits.extend(bytes(byte + 1 - len(self.bits) + 4096))
        self.bits[byte] |= 1 << (pfn & 7)
        self.fault_count += 1

    def mark_range(self, first_pfn: int, count: int) -> None:
        for pfn in range(first_pfn, first_pfn + count):
            self.mark(pfn)


@attrs.define
class Domain:
    domid: int
    is_hvm: bool
    width: int
    max_pages: int
    vcpus: list[Vcpu]
    shared_info_frame: int
    grant_frame: int
    tsc: TscInfo
    policy: CpuPolicy
    nr_pages: int = 0
    max_gpfn: int = 0
    pause_count: int = 0
    shutdown: bool = False
    shutdown_reason: int = 0
    logdirty: LogDirty = attrs.field(factory=LogDirty)
    # HVM only: Xen's own gfn -> mfn map (INVALID where unpopulated), context blob, params.
    hvm_p2m: array = attrs.field(factory=lambda: array("Q"))
    hvm_context: bytes = b""
    hvm_params: dict[int, int] = attrs.field(factory=dict)

    @property
    def max_vcpu_id(self) -> int:
        return len(self.vcpus) - 1
