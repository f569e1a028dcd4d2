"""The hypervisor as the save/restore engines see it (spec save-restore-engines section 7).

Engines are written against `Hypervisor` only; `xenstream.hv.sim.SimXen` implements it today, real
bindings later. Every operation names its domain explicitly, like the domctls underneath.

Conventions shared by all implementations:

* Frame numbers are Python ints. For PV a gfn *is* an mfn; for HVM it is a pfn.
* Batches are sequences of ints (lists or `array('Q')`), at most `abi.MAX_BATCH_SIZE` for the
  page-type query and for pin ops; mapping and populate take any length.
* Guest memory comes back as 4096-byte memoryviews straight into the frames (no copies): read-only
  unless `writable=True`. They stay valid while the domain exists.
* Failures raise `HypervisorError` carrying an errno (`errno.ESRCH` no such domain, `EINVAL` bad
  argument, `ENOMEM` over the memory limit or out of host frames, `E2BIG` a batch over 1024,
  `EPERM`/`EINVAL` validation refused, `ENOENT` a frame that cannot be mapped).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from xenstream.hv import abi


class HypervisorError(Exception):
    """A refused hypervisor operation: `errno` says why, `index` which batch element (or -1)."""

    def __init__(self, errno: int, message: str, index: int = -1) -> None:
        super().__init__(message)
        self.errno = errno
        self.index = index


@attrs.frozen
class XenVersion:
    major: int
    minor: int


@attrs.frozen
class DomainInfo:
    """XEN_DOMCTL_getdomaininfo, reduced to what the engines use.

    `paused` is the controller-pause flag (pause count > 0), not the shutdown state;
    `shutdown_reason` is meaningful only when `shutdown` is set (abi.SHUTDOWN_*).
    """

    domid: int
    is_hvm: bool
    paused: bool
    shutdown: bool
    shutdown_reason: int
    shared_info_frame: int
    max_vcpu_id: int
    nr_pages: int
    max_pages: int

    @property
    def suspended(self) -> bool:
        return self.shutdown and self.shutdown_reason == abi.SHUTDOWN_SUSPEND


@attrs.frozen
class TscInfo:
    mode: int
    khz: int
    nsec: int
    incarnation: int


@attrs.frozen
class XsaveState:
    """get/set vcpuextstate: `data` is xcr0 (u64), xcr0_accum (u64), then the xsave area."""

    xfeature_mask: int
    data: bytes


@attrs.frozen
class CpuPolicy:
    """CPUID leaves (24-byte entries) and MSRs (16-byte entries), in the stream's own encodings."""

    cpuid: bytes
    msrs: bytes


@attrs.frozen
class LogDirtyStats:
    """Result of a CLEAN or PEEK: `pages` is how many bits Xen reported (must equal the request)."""

    pages: int
    dirty_count: int
    fault_count: int


@attrs.frozen
class MappedRun:
    """`gfns[first:first + count]` of a batch mapped as one view of `count * 4096` bytes."""

    first: int
    count: int
    view: memoryview


_WORD = {abi.WIDTH_64: struct.Struct("<Q"), abi.WIDTH_32: struct.Struct("<I")}


@attrs.frozen
class VcpuContext:
    """A PV vcpu_guest_context: the frame-bearing fields decoded, everything else kept as bytes.

    `blob` holds every other byte in the exact Xen layout (5168 or 2800 bytes); `pack()` writes the
    decoded fields over it and is the authoritative byte form (`attrs.evolve` a field, then `pack()`),
    so `VcpuContext.unpack(blob, width).pack() == blob`. Frame fields hold mfns inside the
    hypervisor and pfns inside a stream; `cr3` is in cr3 encoding (abi.cr3_from_mfn), `cr1` is
    ctrlreg[1] (64-bit only, 0 = none), `start_info` is user_regs.rdx/edx.
    """

    width: int
    flags: int
    start_info: int
    gdt_frames: tuple[int, ...]
    gdt_ents: int
    cr3: int
    cr1: int
    blob: bytes

    @property
    def online(self) -> bool:
        return bool(self.flags & abi.VGCF_ONLINE)

    @property
    def gdt_frames_used(self) -> tuple[int, ...]:
        return self.gdt_frames[: abi.gdt_frames_used(self.gdt_ents)]

    @classmethod
    def unpack(cls, blob: bytes | memoryview, width: int) -> VcpuContext:
        layout = abi.VCPU_CONTEXT_LAYOUTS.get(width)
        if layout is None or len(blob) != layout.size:
            raise ValueError(f"vcpu context of {len(blob)} bytes does not fit width {width}")
        word = _WORD[width]
        blob = bytes(blob)

        def read(offset: int) -> int:
            return word.unpack_from(blob, offset)[0]

        return cls(
            width=width,
            flags=read(layout.flags),
            start_info=read(layout.rdx),
            gdt_frames=tuple(read(layout.gdt_frames + i * width) for i in range(abi.GDT_FRAME_SLOTS)),
            gdt_ents=read(layout.gdt_ents),
            cr3=read(layout.ctrlreg_offset(3)),
            cr1=read(layout.ctrlreg_offset(1)) if width == abi.WIDTH_64 else 0,
            blob=blob,
        )

    def pack(self) -> bytes:
        layout = abi.VCPU_CONTEXT_LAYOUTS[self.width]
        word = _WORD[self.width]
        out = bytearray(self.blob)
        word.pack_into(out, layout.flags, self.flags)
        word.pack_into(out, layout.rdx, self.start_info)
        for i, frame in enumerate(self.gdt_frames):
            word.pack_into(out, layout.gdt_frames + i * self.width, frame)
        word.pack_into(out, layout.gdt_ents, self.gdt_ents)
        word.pack_into(out, layout.ctrlreg_offset(3), self.cr3)
        if self.width == abi.WIDTH_64:
            word.pack_into(out, layout.ctrlreg_offset(1), self.cr1)
        return bytes(out)


@runtime_checkable
class Hypervisor(Protocol):
    """Every hypervisor operation the save/restore engines perform (spec section 7.1-7.5)."""

    # -- 7.1 host and domain information --------------------------------------------------------

    def get_domain_info(self, domid: int) -> DomainInfo:
        """Domain flags and frames; ESRCH if there is no such domain."""

    def get_xen_version(self) -> XenVersion: ...

    def get_address_size(self, domid: int) -> int:
        """32 or 64 (bits) for a PV domain."""

    def set_address_size(self, domid: int, bits: int) -> None:
        """Turn a fresh PV domain into a 32-bit (compat) or 64-bit guest; EINVAL once it has memory."""

    def get_max_gpfn(self, domid: int) -> int:
        """HVM: highest gfn mapped in Xen's p2m. PV: shared_info arch.max_pfn - 1 (the guest's own
        published count; 0 when unset). The engines add 1."""

    def get_max_mfn(self) -> int:
        """Xen's max_page: the highest machine frame + 1 (the engines nevertheless compare with <=)."""

    def m2p_view(self) -> memoryview:
        """Live read-only mfn -> pfn table: a memoryview of u64 ('Q'), at least max_mfn entries.

        Entries of frames that are not guest RAM are junk; trust one only after the round-trip
        check (in_pseudophys).
        """

    def compat_m2p_first_mfn(self) -> int:
        """First frame of the compat (32-bit) M2P; Xen maps it at slot 428 of a PAE guest's top L2."""

    # -- 7.2 guest memory -----------------------------------------------------------------------

    def map_foreign(self, domid: int, gfns: Sequence[int], writable: bool = False) -> list[memoryview | None]:
        """One 4096-byte view per gfn, or None where that gfn cannot be mapped (per-page error).

        Writable mappings of a log-dirty domain's pages mark them dirty.
        """

    def map_foreign_runs(self, domid: int, gfns: Sequence[int], writable: bool = False) -> list[MappedRun]:
        """As map_foreign, but gfns adjacent in the batch whose frames are adjacent in memory come back
        as one view (a real batched foreign mapping is one contiguous region): one copy or one iovec
        per run instead of per page. Runs are in batch order; a gfn no run covers cannot be mapped.
        """

    def get_page_types(self, domid: int, gfns: Sequence[int]) -> Sequence[int]:
        """PFINFO code (abi.PFINFO_*, type in bits 28-31) per gfn; at most 1024 gfns."""

    def populate_physmap(self, domid: int, gfns: Sequence[int], order: int = 0) -> Sequence[int]:
        """Allocate 2**order frames at each gfn (order 0 or 9; for 9 each gfn starts an aligned extent).

        PV: returns the new first mfn per extent and sets the M2P. HVM: returns the gfns.
        "Exact": all extents or an error (ENOMEM over the domain's limit or the host's frames; the
        simulator then allocates nothing, real Xen may keep a prefix). PV Xen does not track which
        pfns are populated: populating a pfn twice gives it a second frame (the engine must not).
        """

    def mmuext_pin(self, domid: int, ops: Sequence[tuple[int, int]]) -> None:
        """Pin (level, mfn) pairs in order, at most 1024; validates each tree as Xen does.

        Raises HypervisorError with the failing op's index; pins before it stay in place.
        """

    def map_grant_frame(self, domid: int, index: int = 0) -> memoryview:
        """Writable view of grant-table frame `index` (acquire_resource of the shared frames)."""

    # -- 7.3 log-dirty --------------------------------------------------------------------------

    def logdirty_enable(self, domid: int) -> None: ...

    def shadow_off(self, domid: int) -> None:
        """Turn log-dirty (and any shadow mode) off; harmless when already off."""

    def logdirty_clean(self, domid: int, bitmap: bytearray | memoryview, nr_pages: int,
                       final: bool = False) -> LogDirtyStats:
        """Copy the dirty bits of pfns 0..nr_pages-1 into `bitmap` (bit i = byte i//8, bit i%8) and clear them."""

    def logdirty_peek(self, domid: int, bitmap: bytearray | memoryview, nr_pages: int) -> LogDirtyStats:
        """As logdirty_clean without clearing."""

    # -- 7.4 vcpu state -------------------------------------------------------------------------

    def get_vcpu_online(self, domid: int, vcpu: int) -> bool: ...

    def get_vcpu_context(self, domid: int, vcpu: int) -> VcpuContext: ...

    def set_vcpu_context(self, domid: int, vcpu: int, context: VcpuContext) -> None:
        """PV: takes type references on cr3/ctrlreg[1] roots and GDT frames, validating the trees."""

    def get_ext_vcpu_context(self, domid: int, vcpu: int) -> bytes:
        """The extended-context blob, its leading u32 vcpu and u32 size included (size bytes long)."""

    def set_ext_vcpu_context(self, domid: int, vcpu: int, blob: bytes) -> None:
        """Applies to the vcpu named inside the blob; at most abi.EXT_VCPU_CONTEXT_MAX bytes."""

    def get_vcpu_xsave(self, domid: int, vcpu: int) -> XsaveState: ...

    def set_vcpu_xsave(self, domid: int, vcpu: int, state: XsaveState) -> None: ...

    def get_vcpu_msrs(self, domid: int, vcpu: int) -> bytes:
        """16-byte {u32 index, u32 reserved, u64 value} entries; b"" when there are none."""

    def set_vcpu_msrs(self, domid: int, vcpu: int, blob: bytes) -> None: ...

    # -- 7.5 other domain state -----------------------------------------------------------------

    def get_tsc_info(self, domid: int) -> TscInfo: ...

    def set_tsc_info(self, domid: int, info: TscInfo) -> None: ...

    def get_cpu_policy(self, domid: int) -> CpuPolicy: ...

    def set_cpu_policy(self, domid: int, policy: CpuPolicy) -> None: ...

    def get_hvm_context(self, domid: int) -> bytes: ...

    def set_hvm_context(self, domid: int, blob: bytes) -> None: ...

    def get_hvm_param(self, domid: int, index: int) -> int: ...

    def set_hvm_param(self, domid: int, index: int, value: int) -> None: ...
