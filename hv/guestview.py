"""A save-side view of a PV guest, built from `Hypervisor` operations only (spec save-restore-engines 1.1-1.6, 3.2).

Both save engines (v2 and legacy) and the restore report need the same introspection: width and
levels, the M2P, the guest's own P2M found through shared_info (tree or linear list), the
`in_pseudophys` round-trip test, and the mfn -> pfn translation of a vcpu context. It lives here, on
top of the hypervisor interface, because `v2` and `legacy` may not import each other.

Everything raises `GuestStateError` with a one-line message saying what was wrong and where.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import attrs

from xenstream.hv import abi
from xenstream.hv.interface import DomainInfo, Hypervisor, HypervisorError, VcpuContext
from xenstream.hv.pagetables import P2MView, TranslationTables

_ADDRESS_MASK = {abi.WIDTH_64: 0x0000_FFFF_FFFF_FFFF, abi.WIDTH_32: 0xFFFF_FFFF}
_XEN_VIRT_RANGE = {
    abi.WIDTH_64: (abi.XEN_VIRT_START_64, abi.XEN_VIRT_END_64 - 1),
    abi.WIDTH_32: (abi.XEN_VIRT_START_32, 0xFFFF_FFFF),
}
_VIEW_FORMAT = {abi.WIDTH_64: "Q", abi.WIDTH_32: "I"}


class GuestStateError(Exception):
    """The guest (or the hypervisor's view of it) cannot be saved as it is; `errno` like the C engines."""

    def __init__(self, message: str, err: int = errno.ERANGE) -> None:
        super().__init__(message)
        self.errno = err


def _is_canonical(vaddr: int) -> bool:
    top = vaddr >> 47
    return top == 0 or top == 0x1FFFF


def hypervisor_call(what: str, call, *args, **kwargs):
    """Run one hypervisor operation, turning its refusal into a GuestStateError that says what failed."""
    try:
        return call(*args, **kwargs)
    except HypervisorError as exc:
        raise GuestStateError(f"{what}: {exc}", exc.errno) from exc


@contextmanager
def shadow_off_afterwards(hv: Hypervisor, domid: int, log, message: str) -> Iterator[None]:
    """Switch log-dirty (shadow) mode off when the block ends, however it ends (spec 3.8): every save
    engine, v1 or v2, live or not, leaves the domain so. A failed switch-off is logged as `message` on the
    engine's own `log`, not raised: cleanup must not hide the first error."""
    try:
        yield
    finally:
        try:
            hv.shadow_off(domid)
        except Exception as exc:
            log.warning(message, domid=domid, error=str(exc))


@attrs.define
class PvGuestView:
    """The PV guest as the save engine sees it after setup (spec 3.2 PV setup)."""

    hv: Hypervisor
    domid: int
    info: DomainInfo
    width: int
    levels: int
    max_mfn: int
    m2p: memoryview
    compat_m2p_mfn0: int | None
    shared_info: memoryview
    max_pfn: int
    leaf_mfns: list[int]
    p2m: P2MView | None  # the guest's P2M leaf pages, read live
    p2m_pfns: list[int]
    linear_p2m: bool
    tables: TranslationTables | None = None

    @property
    def fpp(self) -> int:
        return abi.frames_per_page(self.width)

    @property
    def p2m_size(self) -> int:
        return self.max_pfn + 1

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def open(cls, hv: Hypervisor, domid: int) -> PvGuestView:
        info = hypervisor_call(f"domain {domid}", hv.get_domain_info, domid)
        if info.is_hvm:
            raise GuestStateError(f"domain {domid} is HVM; only PV guests are supported", errno.EINVAL)
        bits = hypervisor_call("get address size", hv.get_address_size, domid)
        width = abi.WIDTH_FOR_ADDRESS_BITS.get(bits)
        if width is None:
            raise GuestStateError(f"domain {domid} has address size {bits}, expected 32 or 64", errno.EINVAL)
        max_mfn = hv.get_max_mfn()
        m2p = hv.m2p_view()
        levels = abi.LEVELS_FOR_WIDTH[width]
        compat = hv.compat_m2p_first_mfn() if levels == 3 else None
        shared = hypervisor_call("map shared_info", hv.map_foreign, domid, [info.shared_info_frame])[0]
        if shared is None:
            raise GuestStateError(f"cannot map shared_info frame {info.shared_info_frame:#x}", errno.EFAULT)
        view = cls(hv=hv, domid=domid, info=info, width=width, levels=levels, max_mfn=max_mfn, m2p=m2p,
                   compat_m2p_mfn0=compat, shared_info=shared, max_pfn=0, leaf_mfns=[], p2m=None,
                   p2m_pfns=[], linear_p2m=False)
        view._map_p2m()
        return view

    @classmethod
    def with_p2m(cls, hv: Hypervisor, domid: int, p2m, max_pfn: int) -> PvGuestView:
        """A view that trusts `p2m` (u64 per pfn, e.g. what a restore just built) instead of the guest's own.

        For looking at a freshly restored domain, whose published P2M references are stale until it resumes.
        """
        info = hypervisor_call(f"domain {domid}", hv.get_domain_info, domid)
        width = abi.WIDTH_FOR_ADDRESS_BITS[hypervisor_call("get address size", hv.get_address_size, domid)]
        levels = abi.LEVELS_FOR_WIDTH[width]
        shared = hypervisor_call("map shared_info", hv.map_foreign, domid, [info.shared_info_frame])[0]
        view = cls(hv=hv, domid=domid, info=info, width=width, levels=levels, max_mfn=hv.get_max_mfn(),
                   m2p=hv.m2p_view(), compat_m2p_mfn0=hv.compat_m2p_first_mfn() if levels == 3 else None,
                   shared_info=shared, max_pfn=max_pfn, leaf_mfns=[], p2m=P2MView.contiguous(p2m),
                   p2m_pfns=[], linear_p2m=False)
        view._make_tables()
        return view

    def _make_tables(self) -> None:
        compat = abi.INVALID_MFN if self.compat_m2p_mfn0 is None else self.compat_m2p_mfn0
        self.tables = TranslationTables(levels=self.levels, m2p=self.m2p, max_mfn=self.max_mfn, p2m=self.p2m,
                                        max_pfn=self.max_pfn, compat_m2p_mfn0=compat)

    def _shared_field(self, name: str) -> int:
        layout = abi.SHARED_INFO_LAYOUTS[self.width]
        return struct.unpack_from(layout.word, self.shared_info, getattr(layout, name))[0]

    def _read_mfns(self, page: memoryview, count: int) -> list[int]:
        words = page.cast(_VIEW_FORMAT[self.width])[:count].tolist()
        if self.width == abi.WIDTH_32:
            return [abi.INVALID_MFN if w == abi.INVALID_MFN_32 else w for w in words]
        return words

    def _map(self, what: str, mfns: Sequence[int]) -> list[memoryview]:
        views = hypervisor_call(f"map {what}", self.hv.map_foreign, self.domid, list(mfns))
        for mfn, page in zip(mfns, views):
            if page is None:
                raise GuestStateError(f"cannot map {what} frame {mfn:#x}", errno.EFAULT)
        return views

    def _map_p2m(self) -> None:
        self.max_pfn = self._shared_field("max_pfn") - 1
        if self.max_pfn < 0:
            raise GuestStateError("shared_info arch.max_pfn is 0: the guest published no P2M", errno.EINVAL)
        p2m_cr3 = self._shared_field("p2m_cr3")
        leaf_mfns = self._walk_linear(p2m_cr3) if p2m_cr3 else self._walk_tree()
        self.linear_p2m = bool(p2m_cr3)
        self.leaf_mfns = leaf_mfns
        self.p2m = P2MView(self.width, self._map("P2M leaf", leaf_mfns), self.fpp)
        self._make_tables()
        self.p2m_pfns = []
        for index, mfn in enumerate(leaf_mfns):
            if not self.in_pseudophys(mfn):
                raise GuestStateError(f"P2M leaf {index} at mfn {mfn:#x} is not in the guest's pseudo-physical map")
            self.p2m_pfns.append(self.m2p[mfn])

    def _check_frame(self, mfn: int, where: str) -> None:
        if mfn == 0 or mfn > self.max_mfn:
            raise GuestStateError(f"bad mfn {mfn:#x} {where}")

    def _walk_tree(self) -> list[int]:
        fpp = self.fpp
        fll_entries = self.max_pfn // (fpp * fpp) + 1
        if fll_entries > fpp:
            raise GuestStateError(f"max_pfn {self.max_pfn:#x} too large for a P2M tree", errno.EINVAL)
        fll_mfn = self._shared_field("pfn_to_mfn_frame_list_list")
        self._check_frame(fll_mfn, "for the P2M frame-list-list")
        fll = self._read_mfns(self._map("P2M frame-list-list", [fll_mfn])[0], fll_entries)
        last_run_start = 0
        for index, mfn in enumerate(fll):
            self._check_frame(mfn, f"at index {index} of the P2M frame-list-list")
            if mfn != fll[last_run_start]:
                last_run_start = index
        # Trailing identical entries share one all-invalid frame list: trim them (spec 1.3).
        trimmed = (last_run_start + 1) * fpp * fpp - 1
        if trimmed < self.max_pfn:
            self.max_pfn = trimmed
            fll_entries = self.max_pfn // (fpp * fpp) + 1
        fl_entries = self.max_pfn // fpp + 1
        fl_pages = self._map("P2M frame list", fll[:fll_entries])
        leaves: list[int] = []
        for page in fl_pages:
            leaves.extend(self._read_mfns(page, min(fpp, fl_entries - len(leaves))))
        for index, mfn in enumerate(leaves):
            self._check_frame(mfn, f"at index {index} of the P2M frame list")
        return leaves

    def _walk_linear(self, p2m_cr3: int) -> list[int]:
        """Xen's map_p2m_list arithmetic, including its level-2 trim (spec 1.3)."""
        width, fpp = self.width, self.fpp
        root = abi.mfn_from_cr3(p2m_cr3, width)
        if root > self.max_mfn:
            raise GuestStateError(f"bad p2m_cr3 {p2m_cr3:#x}")
        vaddr = self._shared_field("p2m_vaddr")
        frames = self.max_pfn // fpp + 1
        end = vaddr + frames * abi.PAGE_SIZE - 1
        mask = _ADDRESS_MASK[width]
        xen_first, xen_last = _XEN_VIRT_RANGE[width]
        if width == abi.WIDTH_64:
            bad = not _is_canonical(vaddr) or not _is_canonical(end & 0xFFFF_FFFF_FFFF_FFFF)
        else:
            bad = vaddr > mask or end > mask
        if bad or end < vaddr or (vaddr <= xen_last and end > xen_first):
            raise GuestStateError(f"bad linear P2M address range {vaddr:#x}-{end:#x}")
        mfns = [root]
        offset = 0
        idx_start = idx_end = 0
        for level in range(self.levels, 0, -1):
            tables = self._map(f"level {level} table of the linear P2M", mfns)
            ptes = [pte for page in tables for pte in page.cast("Q").tolist()]
            shift = level * 9 + 3
            idx_start = ((vaddr - offset) & mask) >> shift
            idx_end = ((end - offset) & mask) >> shift
            mfns = []
            saved_mfn = saved_idx = 0
            for idx in range(idx_start, idx_end + 1):
                mfn = abi.pte_frame(ptes[idx])
                if mfn == 0 or mfn > self.max_mfn:
                    raise GuestStateError(
                        f"bad mfn {mfn:#x} at level {level} of the linear P2M walk "
                        f"(vaddr {offset + (idx << shift):#x})")
                mfns.append(mfn)
                if level == 2 and mfn != saved_mfn:
                    saved_mfn, saved_idx = mfn, idx - idx_start
            if level == 2:
                # Xen compares the relative index with the absolute one (spec 1.3 quirk): reproduced.
                if saved_idx == idx_end:
                    saved_idx += 1
                trimmed = (saved_idx << 9) * fpp - 1
                if trimmed < 0:  # Xen would go on to walk a wrapped range; say what happened instead
                    raise GuestStateError(
                        f"linear P2M at {vaddr:#x} trims to no pfn at all: Xen's trim keeps nothing of a list "
                        f"whose level-2 entries start at index {idx_start} (it expects 1 GiB alignment)", errno.EINVAL)
                if trimmed < self.max_pfn:
                    self.max_pfn = trimmed
                    frames = (self.max_pfn + fpp) // fpp
                    end = vaddr + frames * abi.PAGE_SIZE - 1
                    idx_end = idx_start + saved_idx
                    mfns = mfns[: saved_idx + 1]
            offset = vaddr & ((mask >> shift) << shift)
        return mfns[: self.max_pfn // fpp + 1]

    # -- queries ----------------------------------------------------------------------------------

    def refresh_info(self) -> DomainInfo:
        self.info = hypervisor_call(f"domain {self.domid}", self.hv.get_domain_info, self.domid)
        return self.info

    def gfns(self, first_pfn: int, count: int) -> list[int]:
        """The guest's live P2M entries for pfns first..first+count-1 (INVALID widened to 64 bits)."""
        leaves, shift = self.p2m.leaves, self.p2m.leaf_shift
        per_leaf = 1 << shift
        out: list[int] = []
        pfn, end = first_pfn, first_pfn + count
        while pfn < end:
            leaf, index = pfn >> shift, pfn & (per_leaf - 1)
            take = min(per_leaf - index, end - pfn)
            out.extend(leaves[leaf][index : index + take].tolist())
            pfn += take
        if self.width == abi.WIDTH_32:
            return [abi.INVALID_MFN if w == abi.INVALID_MFN_32 else w for w in out]
        return out

    def p2m_entry(self, pfn: int) -> int:
        return self.p2m[pfn]

    def in_pseudophys(self, mfn: int) -> bool:
        return self.tables.in_pseudophys(mfn) >= 0

    def pfn_of(self, mfn: int, what: str) -> int:
        if not self.in_pseudophys(mfn):
            raise GuestStateError(f"bad mfn {mfn:#x} for {what}: not in the guest's pseudo-physical map")
        return self.m2p[mfn]

    def normalised_vcpu(self, vcpu_id: int, context: VcpuContext) -> VcpuContext:
        """The vcpu context with its frames as pfns, as the stream carries it (spec 1.6, 3.6)."""
        width = self.width
        start_info = context.start_info
        if vcpu_id == 0:
            start_info = self.pfn_of(context.start_info, "vcpu0's start_info (suspend record)")
        if context.gdt_ents > abi.MAX_GDT_ENTS:
            raise GuestStateError(f"vcpu{vcpu_id} gdt_ents {context.gdt_ents} exceeds {abi.MAX_GDT_ENTS}")
        used = abi.gdt_frames_used(context.gdt_ents)
        gdt = [self.pfn_of(mfn, f"frame {i} of vcpu{vcpu_id}'s GDT") if i < used else mfn
               for i, mfn in enumerate(context.gdt_frames)]
        cr3_pfn = self.pfn_of(abi.mfn_from_cr3(context.cr3, width), f"vcpu{vcpu_id}'s cr3")
        cr1 = context.cr1
        if self.levels == 4 and cr1:
            cr1 = 1 | (self.pfn_of(cr1 >> abi.PAGE_SHIFT, f"vcpu{vcpu_id}'s cr1") << abi.PAGE_SHIFT)
        return attrs.evolve(context, start_info=start_info, gdt_frames=tuple(gdt),
                            cr3=abi.cr3_from_mfn(cr3_pfn, width), cr1=cr1)
