"""The simulated PV guest kernel: what it does to its own memory and around suspend (spec 1.10).

A `PvGuest` acts only through the guest-side hypercalls of `SimXen` (writes, mmu_update, pin,
balloon, the suspend shutdown) and reads its memory the way a kernel does: through its own
pagetables (walked from vcpu 0's cr3) and its own P2M. `problems()` lists every way the guest's
state disagrees with itself or with Xen, for tests (empty = consistent).
"""

from __future__ import annotations

import struct
from array import array

from xenstream.hv import abi
from xenstream.hv.sim.layout import GuestLayout
from xenstream.hv.sim.machine import FLAG_PINNED, TYPE_LEVEL, TYPE_PAE_XEN_L2
from xenstream.hv.sim.xen import SimXen

_DATA_FLAGS = (abi.PTE_PRESENT | abi.PTE_RW | abi.PTE_ACCESSED | abi.PTE_DIRTY | abi.PTE_GLOBAL
               | abi.PTE_NX)


class GuestError(Exception):
    pass


class PvGuest:
    def __init__(self, xen: SimXen, domid: int, layout: GuestLayout) -> None:
        self.xen = xen
        self.domid = domid
        self.layout = layout
        self.width = layout.width
        self.fpp = layout.fpp
        self._word = struct.Struct("<Q" if self.width == abi.WIDTH_64 else "<I")
        self._leaf_mfns: list[int] | None = None

    # -- reading memory as the kernel does ------------------------------------------------------

    def _frame(self, mfn: int) -> memoryview:
        return self.xen.machine.frame(mfn)

    def root_mfn(self) -> int:
        context = self.xen.domains[self.domid].vcpus[0].context
        return abi.mfn_from_cr3(context.cr3, self.width)

    def walk(self, vaddr: int) -> tuple[int, int, int]:
        """(L1 table mfn, index in it, PTE) for `vaddr`; the PTE may be non-present, the tables above not."""
        if self.width == abi.WIDTH_64:
            indices = [(vaddr >> 39) & 511, (vaddr >> 30) & 511, (vaddr >> 21) & 511, (vaddr >> 12) & 511]
        else:
            indices = [(vaddr >> 30) & 3, (vaddr >> 21) & 511, (vaddr >> 12) & 511]
        table = self.root_mfn()
        for depth, index in enumerate(indices):
            pte = self._frame(table).cast("Q")[index]
            if depth == len(indices) - 1:
                return table, index, pte
            if not pte & abi.PTE_PRESENT:
                raise GuestError(f"vaddr {vaddr:#x} not mapped at level {len(indices) - depth}")
            table = abi.pte_frame(pte)
        raise AssertionError("unreachable")

    def direct_map_slot(self, pfn: int) -> tuple[int, int, int]:
        vaddr = self.layout.direct_map_vaddr(pfn)
        if vaddr is None:
            raise GuestError(f"pfn {pfn:#x} is not in the direct map")
        return self.walk(vaddr)

    def leaf_mfns(self) -> list[int]:
        """The frame of every P2M leaf, found through the kernel's own mappings."""
        if self._leaf_mfns is None:
            frames = {pfn: abi.pte_frame(self.direct_map_slot(pfn)[2]) for pfn in set(self.layout.p2m_leaf_pfns)}
            self._leaf_mfns = [frames[pfn] for pfn in self.layout.p2m_leaf_pfns]
        return self._leaf_mfns

    @property
    def p2m_pages(self) -> int:
        return max(self.layout.p2m_pages, self.layout.nr_pages)

    def p2m(self, pfn: int) -> int:
        """The guest's own P2M entry (64-bit INVALID for a hole)."""
        if not 0 <= pfn < self.p2m_pages:
            return abi.INVALID_MFN
        leaf = self._frame(self.leaf_mfns()[pfn // self.fpp])
        value = self._word.unpack_from(leaf, (pfn % self.fpp) * self.width)[0]
        if value == abi.INVALID_MFN_FOR_WIDTH[self.width]:
            return abi.INVALID_MFN
        return value

    def p2m_table(self) -> array:
        fmt = "Q" if self.width == abi.WIDTH_64 else "I"
        out = array("Q")
        for mfn in self.leaf_mfns():
            out.extend(self._frame(mfn).cast(fmt))
        del out[self.p2m_pages:]
        if self.width == abi.WIDTH_32:
            out = array("Q", (abi.INVALID_MFN if v == abi.INVALID_MFN_32 else v for v in out))
        return out

    def read_page(self, pfn: int) -> bytes:
        return bytes(self._frame(self.p2m(pfn)))

    # -- acting ---------------------------------------------------------------------------------

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        self.xen.guest_write(self.domid, self.p2m(pfn), offset, data)

    def _set_p2m(self, pfn: int, mfn: int) -> None:
        if pfn // self.fpp >= len(self.layout.p2m_pfns):
            raise GuestError(f"pfn {pfn:#x} lies in the shared missing leaf")
        value = abi.INVALID_MFN_FOR_WIDTH[self.width] if mfn == abi.INVALID_MFN else mfn
        leaf = self.leaf_mfns()[pfn // self.fpp]
        self.xen.guest_write(self.domid, leaf, (pfn % self.fpp) * self.width, self._word.pack(value))

    def set_pte(self, table_pfn: int, index: int, pte: int) -> None:
        self.xen.mmu_update(self.domid, self.p2m(table_pfn), index, pte)

    def balloon_out(self, pfn: int) -> None:
        """Give one page back to Xen: unmap it, release the frame, mark the P2M entry invalid."""
        mfn = self.p2m(pfn)
        table, index, _ = self.direct_map_slot(pfn)
        self.xen.mmu_update(self.domid, table, index, 0)
        self.xen.decrease_reservation(self.domid, mfn)
        self._set_p2m(pfn, abi.INVALID_MFN)

    def balloon_in(self, pfn: int) -> int:
        """Take a fresh frame for a ballooned-out pfn and map it again; returns the new mfn."""
        if self.p2m(pfn) != abi.INVALID_MFN:
            raise GuestError(f"pfn {pfn:#x} is populated")
        mfn = self.xen.populate_physmap(self.domid, [pfn])[0]
        self._set_p2m(pfn, mfn)
        table, index, _ = self.direct_map_slot(pfn)
        self.xen.mmu_update(self.domid, table, index, (mfn << 12) | _DATA_FLAGS)
        return mfn

    def data_pfns(self) -> list[int]:
        """Ordinary pages the guest may scribble on (no structures, no read-only kernel text)."""
        reserved = self.layout.special_pfns | set(self.layout.p2m_pfns) | set(self.layout.fl_pfns) | {
            self.layout.fll_pfn, self.layout.start_info_pfn, self.layout.store_pfn, self.layout.console_pfn,
            self.layout.p2m_missing_pfn, self.layout.p2m_mid_missing_pfn}
        return [pfn for pfn in range(self.layout.kernel_pfns, self.layout.nr_pages) if pfn not in reserved]

    def work(self, rng, pages: int, ptes: int = 0, candidates: list[int] | None = None) -> set[int]:
        """Run for a while: write `pages` random data pages and toggle the accessed bit of `ptes`
        direct-map entries through mmu_update. Returns the pfns that changed (for log-dirty tests)."""
        candidates = candidates if candidates is not None else self.data_pfns()
        touched: set[int] = set()
        for pfn in rng.sample(candidates, min(pages, len(candidates))):
            if self.p2m(pfn) == abi.INVALID_MFN:
                continue
            offset = rng.randrange(0, abi.PAGE_SIZE, 8)
            self.write(pfn, offset, rng.randbytes(8))
            touched.add(pfn)
        m2p = self.xen.machine.m2p
        for pfn in rng.sample(candidates, min(ptes, len(candidates))):
            table, index, pte = self.direct_map_slot(pfn)
            if pte & abi.PTE_PRESENT:
                self.xen.mmu_update(self.domid, table, index, pte ^ abi.PTE_ACCESSED)
                touched.add(m2p[table])
        return touched

    def _rewrite_ring_frames(self, to_pfn: bool) -> None:
        layout = abi.START_INFO_LAYOUTS[self.width]
        for field, pfn in ((layout.store_mfn, self.layout.store_pfn), (layout.console_mfn, self.layout.console_pfn)):
            value = pfn if to_pfn else self.p2m(pfn)
            self.xen.guest_write(self.domid, self.p2m(self.layout.start_info_pfn), field, self._word.pack(value))

    def _map_shared_info(self, frame: int | None) -> None:
        l1 = self.p2m(self.layout.fixmap_l1_pfn)
        self.xen.mmu_update(self.domid, l1, 0, 0 if frame is None else (frame << 12) | _DATA_FLAGS)

    def suspend(self) -> None:
        """Linux's pre-suspend steps, then SCHEDOP_shutdown(suspend) with the start_info mfn."""
        self._rewrite_ring_frames(to_pfn=True)
        self._map_shared_info(None)
        self.xen.guest_suspend(self.domid, self.p2m(self.layout.start_info_pfn))

    def resume_cancelled(self) -> None:
        """After the toolstack's resume_domain: the old domain carries on."""
        self._rewrite_ring_frames(to_pfn=False)
        self._map_shared_info(self.xen.get_domain_info(self.domid).shared_info_frame)

    def resume_new_domain(self) -> None:
        """First steps in the restored domain: re-map shared_info, rebuild and publish the P2M tree."""
        self._leaf_mfns = None
        dom = self.xen.domains[self.domid]
        start_info = self._frame(dom.vcpus[0].context.start_info)
        layout = abi.START_INFO_LAYOUTS[self.width]
        shared = self._word.unpack_from(start_info, layout.shared_info)[0] >> 12
        self._map_shared_info(shared)
        leaf_filler = fl_filler = abi.INVALID_MFN_FOR_WIDTH[self.width]
        leaves = self.leaf_mfns()[:len(self.layout.p2m_pfns)]
        fmt = "Q" if self.width == abi.WIDTH_64 else "I"
        if self.layout.p2m_missing_pfn is not None:
            leaf_filler = self.p2m(self.layout.p2m_missing_pfn)
            fl_filler = self.p2m(self.layout.p2m_mid_missing_pfn)
            self.write(self.layout.p2m_mid_missing_pfn, 0, array(fmt, [leaf_filler] * self.fpp).tobytes())
        for k, pfn in enumerate(self.layout.fl_pfns):
            chunk = leaves[k * self.fpp:(k + 1) * self.fpp]
            self.write(pfn, 0, array(fmt, chunk + [leaf_filler] * (self.fpp - len(chunk))).tobytes())
        fls = [self.p2m(pfn) for pfn in self.layout.fl_pfns]
        self.write(self.layout.fll_pfn, 0, array(fmt, fls + [fl_filler] * (self.fpp - len(fls))).tobytes())
        info = abi.SHARED_INFO_LAYOUTS[self.width]
        page = self._frame(shared)
        self._word.pack_into(page, info.max_pfn, self.p2m_pages)
        self._word.pack_into(page, info.pfn_to_mfn_frame_list_list, self.p2m(self.layout.fll_pfn))
        if self.layout.p2m_vaddr:
            root = self.p2m(self.layout.pinned[0].pfn)
            self._word.pack_into(page, info.p2m_cr3, abi.cr3_from_mfn(root, self.width))
            self._word.pack_into(page, info.p2m_vaddr, self.layout.p2m_vaddr)

    def bump_p2m_generation(self) -> None:
        """What the guest does around remapping its linear P2M (the save engine must notice)."""
        info = abi.SHARED_INFO_LAYOUTS[self.width]
        page = self._frame(self.xen.get_domain_info(self.domid).shared_info_frame)
        value = self._word.unpack_from(page, info.p2m_generation)[0]
        self._word.pack_into(page, info.p2m_generation, (value + 2) % (1 << (8 * self.width)))

    # -- consistency ----------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every disagreement between the guest's P2M, Xen's M2P, ownership, pagetables and pins."""
        xen, machine, domid = self.xen, self.xen.machine, self.domid
        found: list[str] = []
        seen: dict[int, int] = {}
        p2m = self.p2m_table()
        for pfn, mfn in enumerate(p2m):
            if mfn == abi.INVALID_MFN:
                continue
            slot = machine.slot_of(mfn)
            if slot < 0 or machine.owner[slot] != domid:
                found.append(f"pfn {pfn:#x}: mfn {mfn:#x} not owned by the domain")
            elif machine.m2p[mfn] != pfn:
                found.append(f"pfn {pfn:#x}: M2P[{mfn:#x}] = {machine.m2p[mfn]:#x}")
            if mfn in seen:
                found.append(f"pfns {seen[mfn]:#x} and {pfn:#x} share mfn {mfn:#x}")
            seen[mfn] = pfn
        if len(seen) != xen.domains[domid].nr_pages:
            found.append(f"P2M holds {len(seen)} frames, Xen counts {xen.domains[domid].nr_pages}")
        special = {xen.domains[domid].shared_info_frame}
        for ref in self.layout.tables:
            mfn = p2m[ref.pfn]
            slot = machine.slot_of(mfn)
            if TYPE_LEVEL.get(machine.ptype[slot]) != ref.level or not machine.tcount[slot]:
                found.append(f"table pfn {ref.pfn:#x} is not a validated L{ref.level}")
            entries = machine.slot_frame(slot).cast("Q")
            xen_l2 = machine.ptype[slot] == TYPE_PAE_XEN_L2
            for index, pte in enumerate(entries):
                if not pte & abi.PTE_PRESENT or self._xen_slot(ref.level, index, xen_l2):
                    continue
                frame = abi.pte_frame(pte)
                back = machine.m2p[frame] if frame < machine.max_mfn else abi.INVALID_MFN
                if frame in special:
                    continue
                if back >= len(p2m) or p2m[back] != frame:
                    found.append(f"table pfn {ref.pfn:#x} entry {index} names mfn {frame:#x} outside the P2M")
        if self.layout.p2m_vaddr:
            for k, leaf in enumerate(self.layout.p2m_pfns):
                if abi.pte_frame(self.walk(self.layout.p2m_vaddr + k * abi.PAGE_SIZE)[2]) != p2m[leaf]:
                    found.append(f"linear P2M page {k} does not map leaf pfn {leaf:#x}")
        for ref in self.layout.pinned:
            if not machine.flags[machine.slot_of(p2m[ref.pfn])] & FLAG_PINNED:
                found.append(f"root pfn {ref.pfn:#x} is not pinned")
        for vcpu, roots in enumerate(self.layout.vcpus):
            state = xen.domains[domid].vcpus[vcpu]
            if (roots is not None) != state.online:
                found.append(f"vcpu {vcpu} online={state.online}, layout says {roots is not None}")
            if roots is None:
                continue
            if abi.mfn_from_cr3(state.context.cr3, self.width) != p2m[roots.kernel_root]:
                found.append(f"vcpu {vcpu} cr3 does not name pfn {roots.kernel_root:#x}")
            if roots.user_root is not None and state.context.cr1 >> 12 != p2m[roots.user_root]:
                found.append(f"vcpu {vcpu} ctrlreg[1] does not name pfn {roots.user_root:#x}")
            if state.context.gdt_frames_used != tuple(p2m[p] for p in roots.gdt):
                found.append(f"vcpu {vcpu} GDT frames differ from the layout")
        return found

    def _xen_slot(self, level: int, index: int, xen_l2: bool) -> bool:
        if self.width == abi.WIDTH_64:
            return level == 4 and index in abi.L4_XEN_SLOTS_64
        return (level == 3 and index >= abi.PAE_L3_GUEST_SLOTS) or (xen_l2 and index >= abi.PAE_L2_XEN_FIRST)
