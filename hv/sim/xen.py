"""SimXen: the simulated hypervisor, implementing `xenstream.hv.interface.Hypervisor`.

Besides the engine-facing protocol it offers what a test harness and a simulated guest need
(spec 7.8): domain creation and destruction, pause/unpause, the guest's own hypercalls (mmu_update,
pin/unpin, M2P updates, balloon, the suspend shutdown) and guest writes that log-dirty sees.

Page typing follows Xen's rules (xen/arch/x86/mm.c): a type reference is held by each pin, by each
present entry of a validated table on the table it names, by each writable L1 mapping on its target
(type "writable") and by each vcpu's cr3/ctrlreg[1] root and GDT frames. The first reference
validates the page (recursively), the last one de-validates it. Validation refuses foreign and
non-RAM frames, superpages and other disallowed flag bits, type conflicts (a writable mapping of a
pagetable or GDT page, a table used at two levels) and fills Xen's own slots (64-bit L4 256-271, PAE L3 4-511 cleared, PAE top L2
428-511 = compat M2P).
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Sequence

import attrs

from xenstream.hv import abi, hvm_context, hvm_params, kernels
from xenstream.hv.interface import (
    CpuPolicy,
    DomainInfo,
    HypervisorError,
    LogDirtyStats,
    MappedRun,
    TscInfo,
    VcpuContext,
    XenVersion,
    XsaveState,
)
from xenstream.hv.sim import hotpaths
from xenstream.hv.u64runs import consecutive
from xenstream.hv.sim.domain import Domain, Vcpu, blank_vcpu_context
from xenstream.hv.sim.machine import (
    FLAG_BROKEN,
    FLAG_PINNED,
    FLAG_SPECIAL,
    FLAG_VALIDATED,
    OWNER_FREE,
    TYPE_L1,
    TYPE_L2,
    TYPE_L3,
    TYPE_L4,
    TYPE_LEVEL,
    TYPE_NONE,
    TYPE_PAE_XEN_L2,
    TYPE_SEG_DESC,
    TYPE_WRITABLE,
    Machine,
)

XEN_VERSION = XenVersion(4, 17)
_PIN_TYPES = {1: TYPE_L1, 2: TYPE_L2, 3: TYPE_L3, 4: TYPE_L4}
_CHILD_TYPE = {TYPE_L4: TYPE_L3, TYPE_L3: TYPE_L2, TYPE_L2: TYPE_L1, TYPE_PAE_XEN_L2: TYPE_L1}
_XEN_L4_FLAGS = abi.PTE_PRESENT | abi.PTE_RW | abi.PTE_ACCESSED | abi.PTE_DIRTY
_LINEAR_PT_SLOT = 258  # Xen's L4 self-map slot
_COMPAT_M2P_FLAGS = abi.PTE_PRESENT | abi.PTE_PSE | abi.PTE_ACCESSED | abi.PTE_USER
_FRAME = abi.PTE_FRAME_MASK
# Flag bits a guest may set in a present entry (xen/arch/x86/mm.c base_disallow_mask and friends):
# P, RW, USER, A, D, the software bits 9-11 and 52-62, NX; GLOBAL only in L1s; a PAE guest's L3
# entries take neither NX nor the high software bits. Anything else (PSE, PWT/PCD, PAT) is refused.
_SOFTWARE_BITS = 0xE00 | (0x7FF << 52)
_UPPER_ALLOWED = (abi.PTE_PRESENT | abi.PTE_RW | abi.PTE_USER | abi.PTE_ACCESSED | abi.PTE_DIRTY
                  | _SOFTWARE_BITS | abi.PTE_NX | _FRAME)
_L1_ALLOWED = _UPPER_ALLOWED | abi.PTE_GLOBAL
_PAE_L3_ALLOWED = _UPPER_ALLOWED & ~(abi.PTE_NX | (0x7FF << 52))
_NOT_ALLOWED = {TYPE_L1: ~_L1_ALLOWED, TYPE_L2: ~_UPPER_ALLOWED, TYPE_PAE_XEN_L2: ~_UPPER_ALLOWED,
                TYPE_L3: ~_UPPER_ALLOWED, TYPE_L4: ~_UPPER_ALLOWED}
_TYPE_LEVELS = bytes(TYPE_LEVEL.get(t, 0) for t in range(8))  # machine type -> table level
_L1_FAILURES = {hotpaths.L1_REFUSED_FLAGS: "sets disallowed flags",
                hotpaths.L1_NOT_OWNED: "maps a frame the domain does not own",
                hotpaths.L1_WRITABLE_TYPED: "maps a pagetable or descriptor page writable"}
_VM86_TSS_UPDATED = 1 << 63
_TSS32_SIZE = 104
DEFAULT_TSC = TscInfo(mode=0, khz=2_400_000, nsec=0, incarnation=0)
# HVM gfns must lie below 2**36: a 4-level EPT walk translates 48-bit guest-physical addresses, and Xen's
# ept_set_entry (xen/arch/x86/mm/p2m-ept.c) refuses any gfn with bits at or above 36 with EINVAL, so
# populate_physmap never grows the p2m past that however far a stream's gfn points.
HVM_GFN_LIMIT = 1 << 36


class ValidationError(HypervisorError):
    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class SimXen:
    """One simulated host. `capacity_frames` bounds all domains' memory together (lazily committed).

    `calls` counts the batched operations (map_foreign, get_page_types, populate_physmap, mmuext_pin,
    logdirty_clean, get_vcpu_context) so tests can assert batching (spec 9.4).
    """

    def __init__(self, capacity_frames: int = 1 << 20, seed: int = 0, high_memory: bool = True) -> None:
        try:
            self.machine = Machine(capacity_frames, seed=seed, high_memory=high_memory)
        except OSError:
            # The sparse M2P above 2**32 frames needs lazily committed memory (32 GiB of address
            # space); under strict overcommit keep every frame low instead.
            if not high_memory:
                raise
            self.machine = Machine(capacity_frames, seed=seed, high_memory=False)
        self.domains: dict[int, Domain] = {}
        self._next_domid = 1
        self.calls: dict[str, int] = {}  # operation -> count, for batching assertions

    # ================================================================ harness (spec 7.8) =======

    def create_domain(self, max_vcpus: int = 1, max_pages: int = 0, hvm: bool = False) -> int:
        """A new empty domain: shared_info and grant frame allocated, PV starts 64-bit, paused once."""
        if max_vcpus < 1:
            raise HypervisorError(errno.EINVAL, "a domain needs a vcpu")
        domid = self._free_domid()
        shared_info, grant = self.machine.allocate_xenheap(domid, 2)
        for mfn in (shared_info, grant):
            self.machine.flags[self.machine.slot_of(mfn)] = FLAG_SPECIAL
            self.machine.m2p[mfn] = abi.INVALID_MFN
        width = abi.WIDTH_64
        vcpus = [Vcpu(i, False, blank_vcpu_context(width), b"", XsaveState(0, b""), b"") for i in range(max_vcpus)]
        self.domains[domid] = Domain(domid=domid, is_hvm=hvm, width=width, max_pages=max_pages,
                                     vcpus=vcpus, shared_info_frame=shared_info, grant_frame=grant,
                                     tsc=DEFAULT_TSC, policy=CpuPolicy(b"", b""), pause_count=1)
        return domid

    def _free_domid(self) -> int:
        """As Xen: the next domid not in use, wrapping round below the reserved ids (a long-lived host
        such as the restore service must never hand out DOMID_XEN, nor overflow the frame owner array)."""
        for _ in range(abi.DOMID_FIRST_RESERVED):
            domid = self._next_domid
            self._next_domid = domid + 1 if domid + 1 < abi.DOMID_FIRST_RESERVED else 1
            if domid not in self.domains:
                return domid
        raise HypervisorError(errno.ENOSPC, "no free domain id")

    def destroy_domain(self, domid: int) -> None:
        self._domain(domid)
        self.machine.release_all(domid)
        del self.domains[domid]

    def set_max_mem(self, domid: int, max_pages: int) -> None:
        self._domain(domid).max_pages = max_pages

    def pause(self, domid: int) -> None:
        self._domain(domid).pause_count += 1

    def unpause(self, domid: int) -> None:
        dom = self._domain(domid)
        if dom.pause_count == 0:
            raise HypervisorError(errno.EINVAL, "domain is not paused")
        dom.pause_count -= 1

    def resume_domain(self, domid: int) -> None:
        """Cancelled suspend: vcpu 0 sees the suspend hypercall return 1, the shutdown is undone."""
        dom = self._domain(domid)
        vcpu0 = dom.vcpus[0].context
        layout = abi.VCPU_CONTEXT_LAYOUTS[dom.width]
        blob = bytearray(vcpu0.pack())
        blob[layout.rax:layout.rax + dom.width] = (1).to_bytes(dom.width, "little")
        dom.vcpus[0].context = VcpuContext.unpack(bytes(blob), dom.width)
        dom.shutdown = False

    def poke_frame(self, mfn: int) -> memoryview:
        """Writable view of any frame, bypassing Xen's type checks and log-dirty: for negative tests
        that need states real Xen would refuse to create (a PSE entry in a validated L2, ...)."""
        return self.machine.frame(mfn)

    def poke_vcpu_context(self, domid: int, vcpu: int, context: VcpuContext) -> None:
        """Replace a vcpu's context without validation or type references (negative tests only)."""
        self._vcpu(domid, vcpu).context = context

    def frame_owner(self, mfn: int) -> int:
        slot = self.machine.slot_of(mfn)
        return OWNER_FREE if slot < 0 else self.machine.owner[slot]

    def is_pinned(self, mfn: int) -> bool:
        return bool(self.machine.flags[self.machine.slot_of(mfn)] & FLAG_PINNED)

    def mark_broken(self, domid: int, mfn: int) -> None:
        slot = self._owned_slot(self._domain(domid), mfn)
        self.machine.flags[slot] |= FLAG_BROKEN

    def owned_frames(self, domid: int) -> list[int]:
        """Every RAM frame of the domain (shared_info and grant frames excluded)."""
        machine = self.machine
        owner, flags = machine.owner, machine.flags
        return [machine.mfn_of_slot(s) for s in range(machine.capacity)
                if owner[s] == domid and not flags[s] & FLAG_SPECIAL]

    # ----------------------------------------------------------- guest-side hypercalls --------

    def guest_write(self, domid: int, mfn: int, offset: int, data: bytes | memoryview) -> None:
        """The guest stores into one of its frames through a writable mapping (marks it dirty)."""
        dom = self._domain(domid)
        slot = self._owned_slot(dom, mfn)
        if self.machine.tcount[slot] and self.machine.ptype[slot] not in (TYPE_WRITABLE, TYPE_NONE):
            raise HypervisorError(errno.EPERM, f"mfn {mfn:#x} is a typed page: use mmu_update")
        if offset < 0 or offset + len(data) > abi.PAGE_SIZE:
            raise HypervisorError(errno.EINVAL, "write crosses the page")
        self.machine.slot_frame(slot)[offset:offset + len(data)] = data
        self._mark_dirty(dom, mfn)

    def mmu_update(self, domid: int, table_mfn: int, index: int, new_pte: int) -> None:
        """MMU_NORMAL_PT_UPDATE: replace one entry of a (possibly validated) table, Xen-checked."""
        dom = self._domain(domid)
        machine = self.machine
        slot = self._owned_slot(dom, table_mfn)
        entries = machine.slot_frame(slot).cast("Q")
        if not 0 <= index < abi.PTES_PER_PAGE:
            raise HypervisorError(errno.EINVAL, "entry index out of range")
        ttype = machine.ptype[slot]
        if machine.tcount[slot] and ttype in TYPE_LEVEL:
            if self._is_xen_slot(dom, ttype, index):
                raise ValidationError(f"slot {index} of mfn {table_mfn:#x} belongs to Xen")
            old = entries[index]
            self._take_entry_ref(dom, ttype, new_pte, index)
            entries[index] = new_pte
            self._drop_entry_ref(dom, ttype, old)
        else:
            entries[index] = new_pte
        self._mark_dirty(dom, table_mfn)

    def guest_pin(self, domid: int, level: int, mfn: int) -> None:
        self.mmuext_pin(domid, [(level, mfn)])

    def guest_unpin(self, domid: int, mfn: int) -> None:
        dom = self._domain(domid)
        slot = self._owned_slot(dom, mfn)
        if not self.machine.flags[slot] & FLAG_PINNED:
            raise HypervisorError(errno.EINVAL, f"mfn {mfn:#x} is not pinned")
        self.machine.flags[slot] &= ~FLAG_PINNED
        self._put_type(dom, slot)
        self._mark_dirty(dom, mfn)

    def machphys_update(self, domid: int, mfn: int, pfn: int) -> None:
        """MMU_MACHPHYS_UPDATE: the guest tells Xen which pfn a frame now backs."""
        dom = self._domain(domid)
        self._owned_slot(dom, mfn)
        self.machine.m2p[mfn] = pfn
        self._mark_dirty(dom, mfn)

    def decrease_reservation(self, domid: int, mfn: int) -> None:
        """Balloon out one frame: it must hold no type references."""
        dom = self._domain(domid)
        slot = self._owned_slot(dom, mfn)
        if self.machine.tcount[slot] and self.machine.ptype[slot] != TYPE_NONE:
            raise HypervisorError(errno.EBUSY, f"mfn {mfn:#x} is still in use")
        self._mark_dirty(dom, mfn)
        self.machine.release(mfn)
        dom.nr_pages -= 1

    def guest_suspend(self, domid: int, start_info_mfn: int) -> None:
        """SCHEDOP_shutdown(SHUTDOWN_suspend) with rdx/edx = start_info mfn (no controller pause)."""
        dom = self._domain(domid)
        vcpu0 = dom.vcpus[0]
        vcpu0.context = attrs.evolve(vcpu0.context, start_info=start_info_mfn)
        dom.shutdown = True
        dom.shutdown_reason = abi.SHUTDOWN_SUSPEND

    def shared_info(self, domid: int) -> memoryview:
        return self.machine.frame(self._domain(domid).shared_info_frame)

    # ================================================================ 7.1 =======================

    def get_domain_info(self, domid: int) -> DomainInfo:
        dom = self._domain(domid)
        return DomainInfo(domid=domid, is_hvm=dom.is_hvm, paused=dom.pause_count > 0,
                          shutdown=dom.shutdown, shutdown_reason=dom.shutdown_reason,
                          shared_info_frame=dom.shared_info_frame, max_vcpu_id=dom.max_vcpu_id,
                          nr_pages=dom.nr_pages, max_pages=dom.max_pages)

    def get_xen_version(self) -> XenVersion:
        return XEN_VERSION

    def get_address_size(self, domid: int) -> int:
        return abi.ADDRESS_BITS_FOR_WIDTH[self._pv(domid).width]

    def set_address_size(self, domid: int, bits: int) -> None:
        dom = self._pv(domid)
        width = abi.WIDTH_FOR_ADDRESS_BITS.get(bits)
        if width is None:
            raise HypervisorError(errno.EINVAL, f"address size {bits}")
        if width != dom.width:
            if dom.nr_pages:
                raise HypervisorError(errno.EINVAL, "address size is fixed once memory is populated")
            dom.width = width
            for vcpu in dom.vcpus:
                vcpu.context = blank_vcpu_context(width)

    def get_max_gpfn(self, domid: int) -> int:
        dom = self._domain(domid)
        if dom.is_hvm:
            return dom.max_gpfn
        # PV: Xen reads the guest's own shared_info arch.max_pfn (a count) and subtracts one.
        layout = abi.SHARED_INFO_LAYOUTS[dom.width]
        page = self.machine.frame(dom.shared_info_frame)
        count = int.from_bytes(page[layout.max_pfn:layout.max_pfn + dom.width], "little")
        return (count or 1) - 1

    def get_max_mfn(self) -> int:
        return self.machine.max_mfn

    def m2p_view(self) -> memoryview:
        return self.machine.m2p.toreadonly()

    def compat_m2p_first_mfn(self) -> int:
        return self.machine.compat_m2p_mfn0

    # ================================================================ 7.2 =======================

    def map_foreign(self, domid: int, gfns: Sequence[int], writable: bool = False) -> list[memoryview | None]:
        self._count("map_foreign")
        slots = self._mappable_slots(domid, gfns, writable)
        base = self.machine.memview if writable else self.machine.readonly_memview
        return [base[s << 12:(s + 1) << 12] if s >= 0 else None for s in slots]

    def map_foreign_runs(self, domid: int, gfns: Sequence[int], writable: bool = False) -> list[MappedRun]:
        self._count("map_foreign")
        slots = self._mappable_slots(domid, gfns, writable)
        starts, counts = array("I", bytes(4 * len(slots))), array("I", bytes(4 * len(slots)))
        runs = kernels.slot_runs(slots, starts, counts)
        base = self.machine.memview if writable else self.machine.readonly_memview
        out = []
        for first, count in zip(starts[:runs], counts[:runs]):
            slot = slots[first]
            out.append(MappedRun(first, count, base[slot << 12:(slot + count) << 12]))
        return out

    def _mappable_slots(self, domid: int, gfns: Sequence[int], writable: bool) -> array:
        """The slot of each gfn the caller may map (-1 elsewhere); writable mappings mark log-dirty."""
        dom = self._domain(domid)
        machine = self.machine
        if dom.is_hvm:
            gfns = self._hvm_frames(dom, gfns)
        slots = array("q", bytes(8 * len(gfns)))
        kernels.frame_slots(gfns, machine.slot_extent_of, machine.max_mfn, machine.owner, machine.ptype,
                            machine.tcount, domid, int(writable), TYPE_WRITABLE, slots)
        if writable and dom.logdirty.enabled:
            m2p = machine.m2p
            for mfn, slot in zip(gfns, slots):
                if slot >= 0:
                    dom.logdirty.mark(m2p[mfn])
        return slots

    def get_page_types(self, domid: int, gfns: Sequence[int]) -> Sequence[int]:
        self._count("get_page_types")
        if len(gfns) > abi.MAX_BATCH_SIZE:
            raise HypervisorError(errno.E2BIG, f"{len(gfns)} gfns in one page-type query")
        dom = self._domain(domid)
        machine = self.machine
        if dom.is_hvm:
            gfns = self._hvm_frames(dom, gfns)
        codes = array("I", bytes(4 * len(gfns)))
        kernels.page_type_codes(gfns, machine.slot_extent_of, machine.max_mfn, machine.owner, machine.ptype,
                                machine.tcount, machine.flags, domid, _TYPE_LEVELS, codes)
        return codes

    @staticmethod
    def _hvm_frames(dom: Domain, gfns: Sequence[int]) -> Sequence[int]:
        p2m = dom.hvm_p2m
        if isinstance(gfns, range) and gfns.step == 1 and gfns.start >= 0:  # a batch: chunk slices
            return p2m.frames(gfns.start, len(gfns))
        return p2m.lookup(gfns)

    def populate_physmap(self, domid: int, gfns: Sequence[int], order: int = 0) -> Sequence[int]:
        self._count("populate_physmap")
        dom = self._domain(domid)
        frames = len(gfns) << order
        if dom.nr_pages + frames > dom.max_pages:
            raise HypervisorError(errno.ENOMEM, f"populating {frames} frames exceeds max_pages {dom.max_pages}")
        if order and any(g & (abi.SUPERPAGE_FRAMES - 1) for g in gfns):
            raise HypervisorError(errno.EINVAL, "order-9 extent not 2 MiB aligned")
        span = 1 << order
        if dom.is_hvm and gfns and (min(gfns) < 0 or max(gfns) + span > HVM_GFN_LIMIT):
            bad = next(g for g in gfns if g < 0 or g + span > HVM_GFN_LIMIT)
            raise HypervisorError(errno.EINVAL, f"gfn {bad:#x}+{span} is beyond the guest-physical address "
                                                f"width (gfns below {HVM_GFN_LIMIT:#x})")
        low_only = not dom.is_hvm and dom.width == abi.WIDTH_32
        firsts = self.machine.allocate(domid, len(gfns), order, low_only=low_only)
        m2p = self.machine.m2p
        for gfn, mfn in zip(gfns, firsts):
            if span == 1:
                m2p[mfn] = gfn
            else:
                m2p[mfn:mfn + span] = consecutive(gfn, span)
        dom.nr_pages += frames
        top = max(gfns) + span - 1 if gfns else 0
        dom.max_gpfn = max(dom.max_gpfn, top)
        if dom.is_hvm:
            p2m = dom.hvm_p2m
            for gfn, mfn in zip(gfns, firsts):
                if span == 1:
                    p2m.set(gfn, mfn)
                else:
                    p2m.set_run(gfn, consecutive(mfn, span))
            return array("Q", gfns)
        return array("Q", firsts)

    def mmuext_pin(self, domid: int, ops: Sequence[tuple[int, int]]) -> None:
        self._count("mmuext_pin")
        if len(ops) > abi.MAX_BATCH_SIZE:
            raise HypervisorError(errno.E2BIG, f"{len(ops)} pin ops in one call")
        dom = self._pv(domid)
        machine = self.machine
        for index, (level, mfn) in enumerate(ops):
            want = _PIN_TYPES.get(level)
            if want is None or (want == TYPE_L4 and dom.width == abi.WIDTH_32):
                raise HypervisorError(errno.EINVAL, f"pin level {level} for this guest", index)
            try:
                slot = self._owned_slot(dom, mfn)
                if machine.flags[slot] & FLAG_PINNED:
                    raise HypervisorError(errno.EINVAL, f"mfn {mfn:#x} already pinned")
                self._get_type(dom, slot, want)
            except HypervisorError as exc:
                raise HypervisorError(exc.errno, f"pin L{level} mfn {mfn:#x}: {exc}", index) from None
            machine.flags[slot] |= FLAG_PINNED
            self._mark_dirty(dom, mfn)

    def map_grant_frame(self, domid: int, index: int = 0) -> memoryview:
        if index != 0:
            raise HypervisorError(errno.EINVAL, "the simulated grant table has one frame")
        return self.machine.frame(self._domain(domid).grant_frame)

    # ================================================================ 7.3 =======================

    def logdirty_enable(self, domid: int) -> None:
        dom = self._domain(domid)
        if dom.logdirty.enabled:
            raise HypervisorError(errno.EINVAL, "log-dirty already enabled")
        dom.logdirty.enabled = True
        dom.logdirty.clear()  # bits are allocated as pages get dirty, not for max_gpfn up front

    def shadow_off(self, domid: int) -> None:
        self._domain(domid).logdirty.enabled = False

    def logdirty_clean(self, domid: int, bitmap: bytearray | memoryview, nr_pages: int,
                       final: bool = False) -> LogDirtyStats:
        self._count("logdirty_clean")
        return self._report_dirty(domid, bitmap, nr_pages, clear=True)

    def logdirty_peek(self, domid: int, bitmap: bytearray | memoryview, nr_pages: int) -> LogDirtyStats:
        return self._report_dirty(domid, bitmap, nr_pages, clear=False)

    def _report_dirty(self, domid: int, bitmap, nr_pages: int, clear: bool) -> LogDirtyStats:
        dom = self._domain(domid)
        state = dom.logdirty
        if not state.enabled:
            raise HypervisorError(errno.EINVAL, "log-dirty is not enabled")
        if len(bitmap) < (nr_pages + 7) >> 3:
            raise HypervisorError(errno.EINVAL, "bitmap too small")
        state.copy_to(bitmap, nr_pages)
        stats = LogDirtyStats(pages=nr_pages, dirty_count=state.dirty_count(), fault_count=state.fault_count)
        if clear:
            state.clear()
        return stats

    # ================================================================ 7.4 =======================

    def get_vcpu_online(self, domid: int, vcpu: int) -> bool:
        return self._vcpu(domid, vcpu).online

    def get_vcpu_context(self, domid: int, vcpu: int) -> VcpuContext:
        self._count("get_vcpu_context")
        return self._vcpu(domid, vcpu).context

    def set_vcpu_context(self, domid: int, vcpu: int, context: VcpuContext) -> None:
        dom = self._pv(domid)
        target = self._vcpu(domid, vcpu)
        if context.width != dom.width:
            raise HypervisorError(errno.EINVAL, f"context width {context.width} for a width-{dom.width} domain")
        if context.gdt_ents > abi.MAX_GDT_ENTS:
            raise HypervisorError(errno.EINVAL, f"gdt_ents {context.gdt_ents}")
        root_type = TYPE_L4 if dom.width == abi.WIDTH_64 else TYPE_L3
        wanted = [(abi.mfn_from_cr3(context.cr3, dom.width), root_type)]
        if dom.width == abi.WIDTH_64 and context.cr1:
            wanted.append((context.cr1 >> 12, TYPE_L4))
        wanted.extend((mfn, TYPE_SEG_DESC) for mfn in context.gdt_frames_used)
        taken: list[tuple[int, int]] = []
        try:
            for mfn, mtype in wanted:
                slot = self._owned_slot(dom, mfn)
                self._get_type(dom, slot, mtype)
                taken.append((slot, mtype))
        except HypervisorError:
            for slot, _ in reversed(taken):
                self._put_type(dom, slot)
            raise
        for slot, _ in target.held_roots:
            self._put_type(dom, slot)
        target.held_roots = taken
        target.context = context
        target.online = context.online

    def get_ext_vcpu_context(self, domid: int, vcpu: int) -> bytes:
        return self._vcpu(domid, vcpu).ext_context

    def set_ext_vcpu_context(self, domid: int, vcpu: int, blob: bytes) -> None:
        if len(blob) > abi.EXT_VCPU_CONTEXT_MAX or len(blob) < 8:
            raise HypervisorError(errno.EINVAL, f"extended context of {len(blob)} bytes")
        named = int.from_bytes(blob[0:4], "little")
        self._vcpu(domid, named).ext_context = bytes(blob)

    def get_vcpu_xsave(self, domid: int, vcpu: int) -> XsaveState:
        return self._vcpu(domid, vcpu).xsave

    def set_vcpu_xsave(self, domid: int, vcpu: int, state: XsaveState) -> None:
        if len(state.data) < abi.XSAVE_HEADER_SIZE:
            raise HypervisorError(errno.EINVAL, "xsave blob shorter than its header")
        self._vcpu(domid, vcpu).xsave = state

    def get_vcpu_msrs(self, domid: int, vcpu: int) -> bytes:
        return self._vcpu(domid, vcpu).msrs

    def set_vcpu_msrs(self, domid: int, vcpu: int, blob: bytes) -> None:
        if len(blob) % abi.MSR_ENTRY_SIZE:
            raise HypervisorError(errno.EINVAL, "MSR blob not a multiple of 16 bytes")
        self._vcpu(domid, vcpu).msrs = bytes(blob)

    # ================================================================ 7.5 =======================

    def get_tsc_info(self, domid: int) -> TscInfo:
        return self._domain(domid).tsc

    def set_tsc_info(self, domid: int, info: TscInfo) -> None:
        self._domain(domid).tsc = info

    def get_cpu_policy(self, domid: int) -> CpuPolicy:
        return self._domain(domid).policy

    def set_cpu_policy(self, domid: int, policy: CpuPolicy) -> None:
        if len(policy.cpuid) % abi.CPUID_LEAF_SIZE or len(policy.msrs) % abi.MSR_POLICY_ENTRY_SIZE:
            raise HypervisorError(errno.EINVAL, "malformed CPU policy")
        self._domain(domid).policy = policy

    def get_hvm_context(self, domid: int) -> bytes:
        return self._hvm(domid).hvm_context

    def set_hvm_context(self, domid: int, blob: bytes) -> None:
        """Checked as Xen's hvm_load checks it; the vcpus with a CPU record come up, the others stay down."""
        dom = self._hvm(domid)
        records = hvm_context.check_context(blob, len(dom.vcpus))
        dom.hvm_context = bytes(blob)
        running = {r.instance for r in records if r.typecode == hvm_context.CODE_CPU}
        for vcpu in dom.vcpus:
            vcpu.online = vcpu.vcpu_id in running

    def get_hvm_param(self, domid: int, index: int) -> int:
        self._hvm_param_index(index)
        params = self._hvm(domid).hvm_params
        if index == hvm_params.VM86_TSS:  # the old param reads the address half of the sized one
            return params.get(hvm_params.VM86_TSS_SIZED, 0) & 0xFFFF_FFFF
        if index == hvm_params.VM86_TSS_SIZED:
            return params.get(index, 0) & ~_VM86_TSS_UPDATED
        return params.get(index, 0)

    def set_hvm_param(self, domid: int, index: int, value: int) -> None:
        """Xen's checks and aliases (xen/arch/x86/hvm/hvm.c): the old VM86_TSS param stores into
        VM86_TSS_SIZED with the 128-byte size old hvmloaders assumed; a sized TSS below 128 bytes is refused."""
        self._hvm_param_index(index)
        params = self._hvm(domid).hvm_params
        if index == hvm_params.VM86_TSS:
            if value != value & 0xFFFF_FFFF:
                raise HypervisorError(errno.EINVAL, f"VM86_TSS {value:#x} does not fit 32 bits")
            index, value = hvm_params.VM86_TSS_SIZED, value and value | (128 << 32) | _VM86_TSS_UPDATED
        elif index == hvm_params.VM86_TSS_SIZED and value >> 32 < _TSS32_SIZE:
            raise HypervisorError(errno.EINVAL, f"VM86_TSS_SIZED size {value >> 32} is below a 32-bit TSS")
        params[index] = value

    @staticmethod
    def _hvm_param_index(index: int) -> None:
        if not 0 <= index < hvm_params.NR_PARAMS:
            raise HypervisorError(errno.EINVAL, f"no HVM param {index}")

    # ================================================================ internals =================

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _domain(self, domid: int) -> Domain:
        dom = self.domains.get(domid)
        if dom is None:
            raise HypervisorError(errno.ESRCH, f"no domain {domid}")
        return dom

    def _pv(self, domid: int) -> Domain:
        dom = self._domain(domid)
        if dom.is_hvm:
            raise HypervisorError(errno.EINVAL, f"domain {domid} is HVM")
        return dom

    def _hvm(self, domid: int) -> Domain:
        dom = self._domain(domid)
        if not dom.is_hvm:
            raise HypervisorError(errno.EINVAL, f"domain {domid} is PV")
        return dom

    def _vcpu(self, domid: int, vcpu: int) -> Vcpu:
        dom = self._domain(domid)
        if not 0 <= vcpu < len(dom.vcpus):
            raise HypervisorError(errno.ESRCH, f"no vcpu {vcpu} in domain {domid}")
        return dom.vcpus[vcpu]

    def _owned_slot(self, dom: Domain, mfn: int) -> int:
        slot = self.machine.slot_of(mfn)
        if slot < 0 or self.machine.owner[slot] != dom.domid:
            raise HypervisorError(errno.EINVAL, f"mfn {mfn:#x} is not owned by domain {dom.domid}")
        return slot

    def _mark_dirty(self, dom: Domain, mfn: int) -> None:
        if dom.logdirty.enabled:
            pfn = self.machine.m2p[mfn]
            if pfn != abi.INVALID_MFN:
                dom.logdirty.mark(pfn)

    # -- type references --------------------------------------------------------------------

    def _get_type(self, dom: Domain, slot: int, want: int) -> None:
        machine = self.machine
        count = machine.tcount[slot]
        if count:
            have = machine.ptype[slot]
            if have != want and not (have == TYPE_PAE_XEN_L2 and want == TYPE_L2):
                raise ValidationError(f"mfn {machine.mfn_of_slot(slot):#x} type conflict ({have} in use, {want} wanted)")
            machine.tcount[slot] = count + 1
            return
        if machine.flags[slot] & FLAG_SPECIAL and want != TYPE_WRITABLE:
            raise ValidationError(f"mfn {machine.mfn_of_slot(slot):#x} is a special page")
        # The type is taken before validation, as in Xen, so a table that maps itself (or is mapped
        # by its own subtree) writable or at another level conflicts with itself.
        machine.ptype[slot] = want
        machine.tcount[slot] = 1
        if want in TYPE_LEVEL:
            try:
                self._validate_table(dom, slot, want)
            except HypervisorError:
                machine.ptype[slot] = TYPE_NONE
                machine.tcount[slot] = 0
                raise
            machine.flags[slot] |= FLAG_VALIDATED
            self._mark_dirty(dom, machine.mfn_of_slot(slot))

    def _put_type(self, dom: Domain, slot: int) -> None:
        machine = self.machine
        count = machine.tcount[slot] - 1
        machine.tcount[slot] = count
        if count == 0 and machine.ptype[slot] in TYPE_LEVEL:
            self._devalidate_table(dom, slot, machine.ptype[slot])
            machine.flags[slot] &= ~FLAG_VALIDATED
            self._mark_dirty(dom, machine.mfn_of_slot(slot))

    def _is_xen_slot(self, dom: Domain, table_type: int, index: int) -> bool:
        if dom.width == abi.WIDTH_64:
            return table_type == TYPE_L4 and index in abi.L4_XEN_SLOTS_64
        if table_type == TYPE_L3:
            return index >= abi.PAE_L3_GUEST_SLOTS
        return table_type == TYPE_PAE_XEN_L2 and index >= abi.PAE_L2_XEN_FIRST

    def _fill_xen_slots(self, dom: Domain, slot: int, table_type: int, entries: memoryview) -> None:
        machine = self.machine
        if table_type == TYPE_L4 and dom.width == abi.WIDTH_64:
            for k, i in enumerate(abi.L4_XEN_SLOTS_64):
                frame = machine.mfn_of_slot(slot) if i == _LINEAR_PT_SLOT else machine.xen_l4_slot_frames[k]
                entries[i] = (frame << 12) | _XEN_L4_FLAGS
        elif table_type == TYPE_L3 and dom.width == abi.WIDTH_32:
            entries[abi.PAE_L3_GUEST_SLOTS:] = array("Q", bytes(8 * (512 - abi.PAE_L3_GUEST_SLOTS)))
        elif table_type == TYPE_PAE_XEN_L2:
            base = machine.compat_m2p_mfn0
            for k, i in enumerate(abi.PAE_L2_XEN_SLOTS):
                entries[i] = ((base + k * abi.SUPERPAGE_FRAMES) << 12) | _COMPAT_M2P_FLAGS

    def _validate_table(self, dom: Domain, slot: int, table_type: int) -> None:
        machine = self.machine
        entries = machine.slot_frame(slot).cast("Q")
        if table_type == TYPE_L3 and dom.width == abi.WIDTH_32 and not entries[abi.PAE_TOP_L3_SLOT] & abi.PTE_PRESENT:
            raise ValidationError(f"PAE L3 mfn {machine.mfn_of_slot(slot):#x} has no entry 3")
        if table_type == TYPE_L4 and dom.width == abi.WIDTH_32:
            raise ValidationError("L4 table in a 32-bit guest")
        self._fill_xen_slots(dom, slot, table_type, entries)
        taken: list[int] = []
        try:
            if table_type == TYPE_L1:
                self._validate_l1(dom, entries, taken)
            else:
                self._validate_upper(dom, slot, table_type, entries, taken)
        except HypervisorError:
            for child in reversed(taken):
                self._put_type(dom, child)
            raise

    def _validate_l1(self, dom: Domain, entries: memoryview, taken: list[int]) -> None:
        machine = self.machine
        slots = array("I", bytes(4 * abi.PTES_PER_PAGE))
        count = [0]
        result = kernels.take_l1_refs(entries, machine.slot_extent_of, machine.max_mfn, machine.owner,
                                      machine.ptype, machine.tcount, machine.flags, dom.domid,
                                      _NOT_ALLOWED[TYPE_L1], TYPE_WRITABLE, FLAG_SPECIAL, slots, count)
        taken.extend(slots[:count[0]])
        if result < 0:
            index, reason = hotpaths.decode_failure(result)
            pte = entries[index]
            raise ValidationError(f"L1 entry {index} ({pte:#x}): {_L1_FAILURES[reason]}")

    def _validate_upper(self, dom: Domain, slot: int, table_type: int, entries: memoryview,
                        taken: list[int]) -> None:
        machine = self.machine
        pae = dom.width == abi.WIDTH_32
        refused = self._refused_flags(dom, table_type)
        for index, pte in enumerate(entries):
            if not pte & 1 or self._is_xen_slot(dom, table_type, index):
                continue
            if pte & abi.PTE_PSE:
                raise ValidationError(f"superpage entry {index} in mfn {machine.mfn_of_slot(slot):#x}")
            if pte & refused:
                raise ValidationError(f"entry {index} ({pte:#x}) of mfn {machine.mfn_of_slot(slot):#x} "
                                      "sets disallowed flags")
            mfn = (pte & _FRAME) >> 12
            child = machine.slot_of(mfn)
            if child < 0 or machine.owner[child] != dom.domid:
                raise ValidationError(f"entry {index} names mfn {mfn:#x} the domain does not own")
            want = _CHILD_TYPE[table_type]
            if pae and table_type == TYPE_L3 and index == abi.PAE_TOP_L3_SLOT:
                want = TYPE_PAE_XEN_L2
            self._get_type(dom, child, want)
            taken.append(child)

    def _refused_flags(self, dom: Domain, table_type: int) -> int:
        if table_type == TYPE_L3 and dom.width == abi.WIDTH_32:
            return ~_PAE_L3_ALLOWED
        return _NOT_ALLOWED[table_type]

    def _devalidate_table(self, dom: Domain, slot: int, table_type: int) -> None:
        machine = self.machine
        entries = machine.slot_frame(slot).cast("Q")
        for index, pte in enumerate(entries):
            if pte & 1:
                self._drop_entry_ref(dom, table_type, pte, index)

    def _take_entry_ref(self, dom: Domain, table_type: int, pte: int, index: int) -> None:
        if not pte & 1:
            return
        if pte & self._refused_flags(dom, table_type):
            raise ValidationError(f"entry {pte:#x} sets disallowed flags")
        machine = self.machine
        mfn = (pte & _FRAME) >> 12
        child = machine.slot_of(mfn)
        if child < 0 or machine.owner[child] != dom.domid:
            raise ValidationError(f"entry names mfn {mfn:#x} the domain does not own")
        if table_type == TYPE_L1:
            if pte & abi.PTE_RW and not machine.flags[child] & FLAG_SPECIAL:
                self._get_type(dom, child, TYPE_WRITABLE)
            return
        if pte & abi.PTE_PSE:
            raise ValidationError("superpage entry")
        want = _CHILD_TYPE[table_type]
        if dom.width == abi.WIDTH_32 and table_type == TYPE_L3 and index == abi.PAE_TOP_L3_SLOT:
            want = TYPE_PAE_XEN_L2
        self._get_type(dom, child, want)

    def _drop_entry_ref(self, dom: Domain, table_type: int, pte: int, index: int = -1) -> None:
        if not pte & 1 or (index >= 0 and self._is_xen_slot(dom, table_type, index)):
            return
        machine = self.machine
        child = machine.slot_of((pte & _FRAME) >> 12)
        if child < 0 or machine.owner[child] != dom.domid:
            return
        if table_type == TYPE_L1 and (not pte & abi.PTE_RW or machine.flags[child] & FLAG_SPECIAL):
            return
        self._put_type(dom, child)

