"""Seeded builder of realistic simulated PV guests.

`build_guest(xen, "pv64:mem=256M,vcpus=2,seed=7")` makes a running (unpaused) guest the way Xen's
domain builder plus a booted Linux would leave it:

* memory populated like the toolstack does (2 MiB extents, a few extents and the tail frame by frame),
  so pfn -> mfn is scattered, and for 64-bit guests partly above 2**32 frames;
* the guest's P2M in its own pages, with frame-list and frame-list-list published in shared_info;
* kernel pagetables (64-bit 4-level or 32-bit PAE) mapping its memory, pagetables and GDTs read-only,
  a fixmap entry for shared_info, per-process user address spaces; every root pinned;
* start_info, xenstore and console rings, one GDT per online vcpu, vcpu contexts, extended/xsave/MSR
  state, TSC info and a CPU policy; some vcpus may be offline;
* page contents that do not compress trivially (mostly pseudo-random, some sparse, a few zero pages).

Everything except the host's choice of mfns is a function of the spec string alone.
"""

from __future__ import annotations

import hashlib
import random
import re
import struct
from array import array

import attrs

from xenstream.hv import abi
from xenstream.hv.interface import CpuPolicy, TscInfo, VcpuContext, XsaveState
from xenstream.hv.sim.layout import (
    DIRECT_MAP_64,
    HIGHMEM_PFNS_32,
    LOWMEM_L2_SLOTS_32,
    LOWMEM_PFNS_32,
    P2M_VADDR_32,
    P2M_VADDR_64,
    USER_BASE,
    GuestLayout,
    TableRef,
    VcpuRoots,
)
from xenstream.hv.sim.xen import SimXen

P = abi.PTE_PRESENT
TABLE_FLAGS = P | abi.PTE_RW | abi.PTE_USER | abi.PTE_ACCESSED | abi.PTE_DIRTY
DATA_FLAGS = P | abi.PTE_RW | abi.PTE_ACCESSED | abi.PTE_DIRTY | abi.PTE_GLOBAL | abi.PTE_NX
READONLY_FLAGS = P | abi.PTE_ACCESSED | abi.PTE_GLOBAL | abi.PTE_NX
TEXT_FLAGS = P | abi.PTE_ACCESSED | abi.PTE_GLOBAL
USER_FLAGS = P | abi.PTE_RW | abi.PTE_USER | abi.PTE_ACCESSED | abi.PTE_DIRTY | abi.PTE_NX
PAE_L3_FLAGS = P
STORE_EVTCHN = 1
CONSOLE_EVTCHN = 2
CONTENT_POOL = 8 << 20
_SPEC_RE = re.compile(r"^(pv64|pv32):(.*)$")
_SIZE_RE = re.compile(r"^(\d+)([KMG]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class GuestSpecError(ValueError):
    pass


@attrs.frozen
class GuestSpec:
    """`pv64:mem=256M,vcpus=2,online=1,seed=7,p2m=linear` (mem required; vcpus 1, online all, seed 0).

    `p2m=linear` also maps the P2M linearly and publishes p2m_cr3/p2m_vaddr (Xen >= 4.7 guests);
    the default `tree` publishes only the frame-list-list. `maxmem=` (>= mem) makes the P2M cover
    more pfns than are populated, the way Linux does: the unpopulated tail shares one all-INVALID
    leaf ("p2m_missing"), one frame list of it ("p2m_mid_missing") and, when linear, one L1 table
    mapping it ("p2m_missing_pte"); arch.max_pfn publishes maxmem. The save engine trims that tail.
    """

    width: int
    nr_pages: int
    vcpus: int = 1
    online: int = 1
    seed: int = 0
    p2m: str = "tree"
    max_pages: int = 0  # pfns the P2M covers (maxmem); 0 = nr_pages

    @classmethod
    def parse(cls, text: str) -> GuestSpec:
        match = _SPEC_RE.match(text.strip())
        if not match:
            raise GuestSpecError(f"guest spec {text!r} must start with pv64: or pv32:")
        width = abi.WIDTH_64 if match.group(1) == "pv64" else abi.WIDTH_32
        fields = spec_fields(match.group(2), ("mem", "vcpus", "online", "seed", "p2m", "maxmem"))
        mem = memory_size(fields["mem"])
        maxmem = memory_size(fields["maxmem"]) if "maxmem" in fields else mem
        vcpus, online, seed = spec_counts(fields)
        if mem % abi.PAGE_SIZE or mem < 64 * abi.PAGE_SIZE:
            raise GuestSpecError("mem must be a whole number of pages, at least 256K")
        if maxmem % abi.PAGE_SIZE or maxmem < mem:
            raise GuestSpecError("maxmem must be a whole number of pages, at least mem")
        if not 1 <= online <= vcpus <= abi.XEN_LEGACY_MAX_VCPUS:
            raise GuestSpecError("need 1 <= online <= vcpus <= 32")
        p2m = fields.get("p2m", "tree")
        if p2m not in ("tree", "linear"):
            raise GuestSpecError(f"p2m must be tree or linear, not {p2m!r}")
        max_pages = maxmem // abi.PAGE_SIZE if maxmem > mem else 0
        return cls(width=width, nr_pages=mem // abi.PAGE_SIZE, vcpus=vcpus, online=online, seed=seed, p2m=p2m,
                   max_pages=max_pages)

    @property
    def p2m_pages(self) -> int:
        return max(self.max_pages, self.nr_pages)

    def __str__(self) -> str:
        kind = "pv64" if self.width == abi.WIDTH_64 else "pv32"
        linear = ",p2m=linear" if self.p2m == "linear" else ""
        maxmem = f",maxmem={self.max_pages * 4}K" if self.max_pages > self.nr_pages else ""
        return (f"{kind}:mem={self.nr_pages * 4}K,vcpus={self.vcpus},online={self.online},seed={self.seed}"
                f"{linear}{maxmem}")


@attrs.frozen
class BuiltGuest:
    domid: int
    spec: GuestSpec
    layout: GuestLayout


def build_guest(xen: SimXen, spec: GuestSpec | str) -> BuiltGuest:
    if isinstance(spec, str):
        spec = GuestSpec.parse(spec)
    return _Builder(xen, spec).build()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def spec_fields(items: str, keys: tuple[str, ...]) -> dict[str, str]:
    """The key=value items of a guest spec (the text after its kind prefix), each key one of `keys` and
    given once; mem= is required (GuestSpecError otherwise). Shared by the PV and HVM specs."""
    fields: dict[str, str] = {}
    for item in filter(None, items.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in keys or key in fields:
            raise GuestSpecError(f"bad guest spec item {item!r}")
        fields[key] = value
    if "mem" not in fields:
        raise GuestSpecError("guest spec needs mem=")
    return fields


def spec_counts(fields: dict[str, str]) -> tuple[int, int, int]:
    """vcpus (default 1), online (default all vcpus) and seed (default 0) of a guest spec's fields."""
    try:
        vcpus = int(fields.get("vcpus", "1"))
        online = int(fields.get("online", str(vcpus)))
        seed = int(fields.get("seed", "0"))
    except ValueError as exc:
        raise GuestSpecError(str(exc)) from None
    return vcpus, online, seed


def memory_size(text: str) -> int:
    """Bytes of a spec size such as 256M, 1G, 512K or 4096."""
    size = _SIZE_RE.match(text)
    if not size:
        raise GuestSpecError(f"bad memory size {text!r}")
    return int(size.group(1)) * _UNITS[size.group(2).upper()]


class _Builder:
    def __init__(self, xen: SimXen, spec: GuestSpec) -> None:
        self.xen = xen
        self.spec = spec
        self.rng = random.Random(f"guest:{spec}")
        self.width = spec.width
        self.nr = spec.nr_pages
        self.fpp = abi.frames_per_page(self.width)
        self.n_leaves = _ceil_div(self.nr, self.fpp)  # leaves holding populated pfns
        self.total_leaves = _ceil_div(spec.p2m_pages, self.fpp)
        self.sparse = self.total_leaves > self.n_leaves
        if _ceil_div(self.total_leaves, self.fpp) > self.fpp:
            raise GuestSpecError("maxmem beyond what a P2M tree can describe")
        self.word = "Q" if self.width == abi.WIDTH_64 else "I"

    # -- plan -----------------------------------------------------------------------------------

    def build(self) -> BuiltGuest:
        spec, xen = self.spec, self.xen
        self.domid = xen.create_domain(max_vcpus=spec.vcpus, max_pages=self.nr)
        if self.width == abi.WIDTH_32:
            xen.set_address_size(self.domid, 32)
        self._populate()
        self._plan()
        self._write_tables()
        self._write_p2m()
        self._write_start_info()
        self._write_rings()
        self._write_gdts()
        self._write_data()
        self._pin_roots()
        self._set_vcpus()
        self._write_shared_info()
        self._set_domain_state()
        xen.unpause(self.domid)
        return BuiltGuest(domid=self.domid, spec=spec, layout=self.layout)

    def _populate(self) -> None:
        nr, rng = self.nr, self.rng
        full = nr - nr % abi.SUPERPAGE_FRAMES
        extents = list(range(0, full, abi.SUPERPAGE_FRAMES))
        singles = [g for g in extents if rng.random() < 0.125]
        big = [g for g in extents if g not in set(singles)]
        p2m = array("Q", [abi.INVALID_MFN]) * nr
        if big:
            for gfn, mfn in zip(big, self.xen.populate_physmap(self.domid, big, abi.SUPERPAGE_ORDER)):
                p2m[gfn:gfn + abi.SUPERPAGE_FRAMES] = array("Q", range(mfn, mfn + abi.SUPERPAGE_FRAMES))
        loose = [g + k for g in singles for k in range(abi.SUPERPAGE_FRAMES)] + list(range(full, nr))
        if loose:
            for gfn, mfn in zip(loose, self.xen.populate_physmap(self.domid, loose, 0)):
                p2m[gfn] = mfn
        self.p2m = p2m

    def _plan(self) -> None:
        spec, rng, nr = self.spec, self.rng, self.nr
        self.kernel_pfns = min(max(16, nr // 64), 2048)
        online = sorted(rng.sample(range(1, spec.vcpus), spec.online - 1)) if spec.online > 1 else []
        self.online = [0] + online
        self.nproc = max(1, min(len(self.online), 1 + rng.randrange(2)))
        n_leaves = self.n_leaves
        n_fl = _ceil_div(n_leaves, self.fpp)
        n_missing = 2 if self.sparse else 0
        self.gdt_ents = {v: (32 if v == 0 else rng.choice((32, 640))) for v in self.online}
        n_gdt = sum(abi.gdt_frames_used(e) for e in self.gdt_ents.values())
        shape = self._table_shape()
        n_tables = sum(shape.values())
        needed = 3 + n_leaves + n_fl + 1 + n_missing + n_gdt + n_tables
        if self.kernel_pfns + needed + 1 > nr:
            raise GuestSpecError(f"{nr} pages cannot hold the guest's {needed} structure pages")
        region = list(range(self.kernel_pfns, self.kernel_pfns + needed))
        rng.shuffle(region)
        take = iter(region)

        def pfns(count: int) -> list[int]:
            return [next(take) for _ in range(count)]

        self.start_info_pfn, self.store_pfn, self.console_pfn = pfns(3)
        self.p2m_pfns = sorted(pfns(n_leaves))
        self.fl_pfns = sorted(pfns(n_fl))
        self.fll_pfn = pfns(1)[0]
        self.missing_pfns = pfns(n_missing)  # p2m_missing leaf, p2m_mid_missing frame list
        self.gdt_pfns = {v: pfns(abi.gdt_frames_used(self.gdt_ents[v])) for v in self.online}
        self.table_pfns = {name: pfns(count) for name, count in shape.items()}
        self.tables = [TableRef(pfn, _TABLE_LEVEL[self.width][name]) for name, pfn_list in self.table_pfns.items()
                       for pfn in pfn_list]
        self.readonly = {t.pfn for t in self.tables} | {p for lst in self.gdt_pfns.values() for p in lst}
        top = 4 if self.width == abi.WIDTH_64 else 3
        roots = self.table_pfns["root"] + self.table_pfns["proc_root"] + self.table_pfns.get("user_root", [])
        pinned = tuple(TableRef(pfn, top) for pfn in roots)
        vcpus: list[VcpuRoots | None] = [None] * spec.vcpus
        for i, v in enumerate(self.online):
            proc = i % self.nproc
            user = self.table_pfns["user_root"][proc] if self.width == abi.WIDTH_64 else None
            vcpus[v] = VcpuRoots(kernel_root=self.table_pfns["proc_root"][proc], user_root=user,
                                 gdt=tuple(self.gdt_pfns[v]), gdt_ents=self.gdt_ents[v])
        self.layout = GuestLayout(
            width=self.width, nr_pages=nr, start_info_pfn=self.start_info_pfn, store_pfn=self.store_pfn,
            console_pfn=self.console_pfn, p2m_pfns=tuple(self.p2m_pfns), fl_pfns=tuple(self.fl_pfns),
            fll_pfn=self.fll_pfn, tables=tuple(self.tables), pinned=pinned, vcpus=tuple(vcpus),
            fixmap_l1_pfn=self.table_pfns["fixmap_l1"][0], kernel_pfns=self.kernel_pfns,
            p2m_vaddr=self._p2m_vaddr(), p2m_pages=spec.p2m_pages,
            p2m_missing_pfn=self.missing_pfns[0] if self.sparse else None,
            p2m_mid_missing_pfn=self.missing_pfns[1] if self.sparse else None)
        taken = set(region)
        self.data_pfns = [p for p in range(nr) if p not in taken]
        self.user_pages = [sorted(rng.sample(self.data_pfns[self.kernel_pfns:] or self.data_pfns,
                                             min(48, len(self.data_pfns) // 4 or 1)))
                           for _ in range(self.nproc)]

    def _p2m_vaddr(self) -> int:
        if self.spec.p2m != "linear":
            return 0
        return P2M_VADDR_64 if self.width == abi.WIDTH_64 else P2M_VADDR_32

    def _table_shape(self) -> dict[str, int]:
        nr, nproc = self.nr, self.nproc
        linear = self.spec.p2m == "linear"
        linear_l1 = _ceil_div(self.n_leaves, 512) if linear else 0
        l2_entries = _ceil_div(self.total_leaves, 512)
        missing_pte = 1 if linear and l2_entries > linear_l1 else 0
        if self.width == abi.WIDTH_64:
            n_l1 = _ceil_div(nr, 512)
            n_l2 = _ceil_div(n_l1, 512)
            shape = {"l1": n_l1, "l2": n_l2, "l3": _ceil_div(n_l2, 512), "root": 1,
                     "fixmap_l3": 1, "fixmap_l2": 1, "fixmap_l1": 1,
                     "proc_root": nproc, "user_root": nproc, "user_l3": nproc, "user_l2": nproc, "user_l1": nproc}
            if linear_l1:
                shape.update(p2m_l1=linear_l1, p2m_l2=_ceil_div(l2_entries, 512), p2m_l3=1)
            if missing_pte:
                shape.update(p2m_missing_pte=1)
            return shape
        low = min(nr, LOWMEM_PFNS_32)
        high = min(nr, LOWMEM_PFNS_32 + HIGHMEM_PFNS_32) - low
        n_high_l1 = _ceil_div(high, 512)
        shape = {"l1": _ceil_div(low, 512), "high_l1": n_high_l1, "high_l2": _ceil_div(n_high_l1, 512),
                 "top_l2": 1, "fixmap_l1": 1, "root": 1, "proc_root": nproc}
        if linear_l1:
            shape.update(p2m_l1=linear_l1, p2m_l2=1)
        if missing_pte:
            shape.update(p2m_missing_pte=1)
        return shape

    def _linear_p2m_l1s(self, t: dict[str, list[int]]) -> None:
        """L1s mapping the leaves in order; past the populated ones the shared missing leaf, and whole
        L1s of nothing but that are one shared table repeated (what the save engine's trim looks for)."""
        leaves = [(self.p2m[leaf] << 12) | DATA_FLAGS for leaf in self.p2m_pfns]
        if self.sparse:
            leaves += [(self.p2m[self.missing_pfns[0]] << 12) | READONLY_FLAGS] * (self.total_leaves - self.n_leaves)
        for k, pfn in enumerate(t["p2m_l1"]):
            self._write_entries(pfn, leaves[k * 512:(k + 1) * 512])
        l1s = list(t["p2m_l1"])
        if "p2m_missing_pte" in t:
            missing_pte = t["p2m_missing_pte"][0]
            self._write_entries(missing_pte, [(self.p2m[self.missing_pfns[0]] << 12) | READONLY_FLAGS] * 512)
            l1s += [missing_pte] * (_ceil_div(self.total_leaves, 512) - len(l1s))
        self._write_upper(t["p2m_l2"], l1s)

    # -- writing --------------------------------------------------------------------------------

    def _frame(self, pfn: int) -> memoryview:
        view = self.xen.map_foreign(self.domid, [self.p2m[pfn]], writable=True)[0]
        assert view is not None
        return view

    def _write_entries(self, pfn: int, entries: dict[int, int] | list[int]) -> None:
        table = array("Q", bytes(abi.PAGE_SIZE))
        items = entries.items() if isinstance(entries, dict) else enumerate(entries)
        for index, value in items:
            table[index] = value
        self._frame(pfn)[:] = table.tobytes()

    def _table_entry(self, pfn: int) -> int:
        return (self.p2m[pfn] << 12) | TABLE_FLAGS

    def _leaf_entries(self, pfns: range) -> list[int]:
        p2m, readonly, kernel = self.p2m, self.readonly, self.kernel_pfns
        out = []
        for pfn in pfns:
            flags = TEXT_FLAGS if pfn < kernel else READONLY_FLAGS if pfn in readonly else DATA_FLAGS
            out.append((p2m[pfn] << 12) | flags)
        return out

    def _write_tables(self) -> None:
        t = self.table_pfns
        if self.width == abi.WIDTH_64:
            self._write_tables_64(t)
        else:
            self._write_tables_32(t)
        si = (self.xen.get_domain_info(self.domid).shared_info_frame << 12) | DATA_FLAGS
        self._write_entries(t["fixmap_l1"][0], {0: si})

    def _write_direct_l1s(self, l1s: list[int], first_pfn: int, last_pfn: int) -> None:
        for k, pfn in enumerate(l1s):
            lo = first_pfn + k * 512
            self._write_entries(pfn, self._leaf_entries(range(lo, min(lo + 512, last_pfn))))

    def _write_upper(self, tables: list[int], children: list[int], flags_of=None) -> None:
        for k, pfn in enumerate(tables):
            kids = children[k * 512:(k + 1) * 512]
            self._write_entries(pfn, [self._table_entry(c) if flags_of is None else flags_of(c) for c in kids])

    def _write_tables_64(self, t: dict[str, list[int]]) -> None:
        self._write_direct_l1s(t["l1"], 0, self.nr)
        self._write_upper(t["l2"], t["l1"])
        self._write_upper(t["l3"], t["l2"])
        direct_slot = (DIRECT_MAP_64 >> 39) & 511
        kernel = {direct_slot + k: self._table_entry(pfn) for k, pfn in enumerate(t["l3"])}
        kernel[511] = self._table_entry(t["fixmap_l3"][0])
        if "p2m_l1" in t:
            self._linear_p2m_l1s(t)
            self._write_upper(t["p2m_l3"], t["p2m_l2"])
            kernel[(P2M_VADDR_64 >> 39) & 511] = self._table_entry(t["p2m_l3"][0])
        self._write_entries(t["fixmap_l3"][0], {511: self._table_entry(t["fixmap_l2"][0])})
        self._write_entries(t["fixmap_l2"][0], {511: self._table_entry(t["fixmap_l1"][0])})
        self._write_entries(t["root"][0], kernel)
        l2_slot = (USER_BASE >> 21) & 511
        for proc in range(self.nproc):
            user = self.user_pages[proc]
            self._write_entries(t["user_l1"][proc], [(self.p2m[p] << 12) | USER_FLAGS for p in user])
            self._write_entries(t["user_l2"][proc], {l2_slot: self._table_entry(t["user_l1"][proc])})
            self._write_entries(t["user_l3"][proc], {0: self._table_entry(t["user_l2"][proc])})
            self._write_entries(t["user_root"][proc], {0: self._table_entry(t["user_l3"][proc])})
            self._write_entries(t["proc_root"][proc], {**kernel, 0: self._table_entry(t["user_l3"][proc])})

    def _write_tables_32(self, t: dict[str, list[int]]) -> None:
        low = min(self.nr, LOWMEM_PFNS_32)
        self._write_direct_l1s(t["l1"], 0, low)
        self._write_direct_l1s(t["high_l1"], LOWMEM_PFNS_32, min(self.nr, LOWMEM_PFNS_32 + HIGHMEM_PFNS_32))
        self._write_upper(t["high_l2"], t["high_l1"])
        top = {k: self._table_entry(pfn) for k, pfn in enumerate(t["l1"])}
        top[LOWMEM_L2_SLOTS_32] = self._table_entry(t["fixmap_l1"][0])
        self._write_entries(t["top_l2"][0], top)
        l3 = {k: (self.p2m[pfn] << 12) | PAE_L3_FLAGS for k, pfn in enumerate(t["high_l2"])}
        l3[abi.PAE_TOP_L3_SLOT] = (self.p2m[t["top_l2"][0]] << 12) | PAE_L3_FLAGS
        if "p2m_l1" in t:
            self._linear_p2m_l1s(t)
            l3[(P2M_VADDR_32 >> 30) & 3] = (self.p2m[t["p2m_l2"][0]] << 12) | PAE_L3_FLAGS
        for pfn in t["root"] + t["proc_root"]:
            self._write_entries(pfn, l3)

    def _words(self, values: list[int]) -> bytes:
        return array(self.word, values).tobytes()

    def _write_p2m(self) -> None:
        invalid = abi.INVALID_MFN_FOR_WIDTH[self.width]
        fpp = self.fpp
        p2m = self.p2m if self.width == abi.WIDTH_64 else array("I", self.p2m)
        for k, pfn in enumerate(self.p2m_pfns):
            chunk = list(p2m[k * fpp:(k + 1) * fpp])
            self._frame(pfn)[:] = self._words(chunk + [invalid] * (fpp - len(chunk)))
        leaves = [self.p2m[p] for p in self.p2m_pfns]
        leaf_filler, fl_filler = invalid, invalid
        if self.sparse:
            missing, mid_missing = (self.p2m[p] for p in self.missing_pfns)
            self._frame(self.missing_pfns[0])[:] = self._words([invalid] * fpp)
            self._frame(self.missing_pfns[1])[:] = self._words([missing] * fpp)
            leaf_filler, fl_filler = missing, mid_missing
        for k, pfn in enumerate(self.fl_pfns):
            chunk = leaves[k * fpp:(k + 1) * fpp]
            self._frame(pfn)[:] = self._words(chunk + [leaf_filler] * (fpp - len(chunk)))
        fls = [self.p2m[p] for p in self.fl_pfns]
        self._frame(self.fll_pfn)[:] = self._words(fls + [fl_filler] * (fpp - len(fls)))

    def _put(self, view: memoryview, offset: int, width: int, value: int) -> None:
        view[offset:offset + width] = value.to_bytes(width, "little")

    def _write_start_info(self) -> None:
        layout, w = abi.START_INFO_LAYOUTS[self.width], self.width
        page = self._frame(self.start_info_pfn)
        page[:] = bytes(abi.PAGE_SIZE)
        magic = abi.START_INFO_MAGIC[w]
        page[0:len(magic)] = magic
        shared = self.xen.get_domain_info(self.domid).shared_info_frame
        root = self.table_pfns["root"][0]
        self._put(page, layout.nr_pages, w, self.nr)
        self._put(page, layout.shared_info, w, shared << 12)
        self._put(page, layout.store_mfn, w, self.p2m[self.store_pfn])
        self._put(page, layout.store_evtchn, 4, STORE_EVTCHN)
        self._put(page, layout.console_mfn, w, self.p2m[self.console_pfn])
        self._put(page, layout.console_evtchn, 4, CONSOLE_EVTCHN)
        self._put(page, layout.pt_base, w, self.layout.direct_map_vaddr(root) or 0)
        self._put(page, layout.nr_pt_frames, w, len(self.tables))
        self._put(page, layout.mfn_list, w, self.layout.direct_map_vaddr(self.p2m_pfns[0]) or 0)
        cmdline = f"root=/dev/xvda1 ro console=hvc0 xenstream.seed={self.spec.seed}".encode()
        page[layout.cmd_line:layout.cmd_line + len(cmdline)] = cmdline

    def _text(self, size: int) -> bytes:
        words = ("xenstore", "watch", "/local/domain", "device/vbd", "backend", "state", "ring-ref",
                 "event-channel", "console", "tty", "vif", "mac", "00:16:3e", "memory/target")
        out = bytearray()
        while len(out) < size:
            out += self.rng.choice(words).encode() + b"\0"
        return bytes(out[:size])

    def _write_rings(self) -> None:
        store = self._frame(self.store_pfn)
        store[:] = bytes(abi.PAGE_SIZE)
        store[0:2048] = self._text(2048)
        store[2048:2064] = struct.pack("<4I", 412, 412, 1990, 1990)
        console = self._frame(self.console_pfn)
        console[:] = bytes(abi.PAGE_SIZE)
        console[0:3072] = self._text(3072)
        console[3072:3088] = struct.pack("<4I", 77, 77, 2921, 2921)

    def _write_gdts(self) -> None:
        for vcpu, pfns in self.gdt_pfns.items():
            descriptors = array("Q", [0]) * (len(pfns) * abi.GDT_ENTRIES_PER_PAGE)
            for i in range(1, self.gdt_ents[vcpu]):
                descriptors[i] = 0x00CF_9A00_0000_FFFF ^ (self.rng.getrandbits(16) << 16) if i % 7 else 0
            raw = descriptors.tobytes()
            for k, pfn in enumerate(pfns):
                self._frame(pfn)[:] = raw[k * abi.PAGE_SIZE:(k + 1) * abi.PAGE_SIZE]

    def _write_data(self) -> None:
        pool = memoryview(hashlib.shake_128(f"content:{self.spec}".encode()).digest(CONTENT_POOL + abi.PAGE_SIZE))
        state = self.rng.getrandbits(64) | 1
        data = self.data_pfns
        for start in range(0, len(data), 4096):
            chunk = data[start:start + 4096]
            views = self.xen.map_foreign(self.domid, [self.p2m[p] for p in chunk], writable=True)
            for view in views:
                state = (state * 6364136223846793005 + 1442695040888963407) & 0xFFFF_FFFF_FFFF_FFFF
                kind = state >> 60
                offset = (state >> 8) % CONTENT_POOL
                if kind == 0:
                    continue  # fresh frames are zero already
                if kind == 1:
                    view[0:1024] = pool[offset:offset + 1024]
                else:
                    view[:] = pool[offset:offset + abi.PAGE_SIZE]

    def _pin_roots(self) -> None:
        top = 4 if self.width == abi.WIDTH_64 else 3
        self.xen.mmuext_pin(self.domid, [(top, self.p2m[ref.pfn]) for ref in self.layout.pinned])

    def _context_blob(self, vcpu: int, roots: VcpuRoots) -> VcpuContext:
        w, rng = self.width, self.rng
        lay = abi.VCPU_CONTEXT_LAYOUTS[w]
        blob = bytearray(lay.size)
        word_mask = (1 << (8 * w)) - 1
        for offset in range(lay.user_regs, lay.trap_ctxt, w):
            blob[offset:offset + w] = (rng.getrandbits(8 * w) & word_mask).to_bytes(w, "little")
        entry = 16 if w == abi.WIDTH_64 else 8
        for vector in range(256):
            base = lay.trap_ctxt + vector * entry
            handler = (0xFFFF_FFFF_8100_0000 if w == abi.WIDTH_64 else 0xC100_0000) + vector * 0x40
            blob[base] = vector
            blob[base + 1] = 3 if vector in (3, 4, 0x80) else 0
            blob[base + 2:base + 4] = (0xE033 if w == abi.WIDTH_64 else 0xE019).to_bytes(2, "little")
            blob[base + entry - w:base + entry] = (handler & word_mask).to_bytes(w, "little")
        kernel_sp = rng.getrandbits(8 * w - 4) & word_mask
        blob[lay.kernel_ss:lay.kernel_ss + w] = (0xE02B if w == abi.WIDTH_64 else 0xE021).to_bytes(w, "little")
        blob[lay.kernel_sp:lay.kernel_sp + w] = kernel_sp.to_bytes(w, "little")
        blob[lay.ctrlreg:lay.ctrlreg + w] = (0x8005003B).to_bytes(w, "little")  # cr0
        blob[lay.ctrlreg_offset(4):lay.ctrlreg_offset(4) + w] = (0x000006F0).to_bytes(w, "little")
        tail_start = lay.debugreg + 8 * w
        for offset in range(tail_start, lay.vm_assist, w):
            blob[offset:offset + w] = (rng.getrandbits(8 * w) & word_mask).to_bytes(w, "little")
        assist = (1 << 2) | (1 << 3) if w == abi.WIDTH_32 else 1 << 2
        blob[lay.vm_assist:lay.vm_assist + w] = assist.to_bytes(w, "little")
        for offset in range(lay.vm_assist + w, lay.size, w):
            blob[offset:offset + w] = (rng.getrandbits(8 * w) & word_mask).to_bytes(w, "little")
        context = VcpuContext.unpack(bytes(blob), w)
        gdt = tuple(self.p2m[p] for p in roots.gdt) + (0,) * (abi.GDT_FRAME_SLOTS - len(roots.gdt))
        flags = abi.VGCF_I387_VALID | abi.VGCF_IN_KERNEL | abi.VGCF_ONLINE
        cr1 = (self.p2m[roots.user_root] << 12) if roots.user_root is not None else 0
        return attrs.evolve(context, flags=flags, start_info=0, gdt_frames=gdt, gdt_ents=roots.gdt_ents,
                            cr3=abi.cr3_from_mfn(self.p2m[roots.kernel_root], w), cr1=cr1)

    def _set_vcpus(self) -> None:
        xen, rng = self.xen, self.rng
        for vcpu, roots in enumerate(self.layout.vcpus):
            if roots is not None:
                xen.set_vcpu_context(self.domid, vcpu, self._context_blob(vcpu, roots))
            ext = struct.pack("<II", vcpu, abi.EXT_VCPU_CONTEXT_SIZE) + rng.randbytes(abi.EXT_VCPU_CONTEXT_SIZE - 8)
            xen.set_ext_vcpu_context(self.domid, vcpu, ext)
            area = rng.randbytes(512 + 64 + 256)
            xen.set_vcpu_xsave(self.domid, vcpu, XsaveState(0x7, struct.pack("<QQ", 0x7, 0x7) + area))
            if rng.random() < 0.75:
                msrs = [(0xC000_0103, vcpu), (0xC001_1027, rng.getrandbits(32))][: 1 + rng.randrange(2)]
                xen.set_vcpu_msrs(self.domid, vcpu, b"".join(struct.pack("<IIQ", i, 0, v) for i, v in msrs))

    def _write_shared_info(self) -> None:
        lay, w, rng = abi.SHARED_INFO_LAYOUTS[self.width], self.width, self.rng
        page = self.xen.shared_info(self.domid)
        for vcpu in range(self.spec.vcpus):
            base = lay.vcpu_info + vcpu * abi.VCPU_INFO_SIZE
            page[base] = rng.getrandbits(1)
            page[base + 1] = rng.getrandbits(1)
            page[base + lay.evtchn_pending_sel:base + lay.evtchn_pending_sel + w] = rng.randbytes(w)
            page[base + 32:base + 64] = rng.randbytes(32)  # vcpu_time_info
        page[lay.evtchn_pending:lay.evtchn_pending + lay.evtchn_bytes] = bytes(
            b & c for b, c in zip(rng.randbytes(lay.evtchn_bytes), rng.randbytes(lay.evtchn_bytes)))
        page[lay.evtchn_mask:lay.evtchn_mask + lay.evtchn_bytes] = rng.randbytes(lay.evtchn_bytes)
        page[lay.wc_version:lay.wc_version + 12] = struct.pack("<III", 2, 1_764_000_000 + rng.randrange(10**6),
                                                               rng.randrange(10**9))
        self._put(page, lay.max_pfn, w, self.spec.p2m_pages)
        self._put(page, lay.pfn_to_mfn_frame_list_list, w, self.p2m[self.fll_pfn])
        for field in (lay.nmi_reason, lay.p2m_cr3, lay.p2m_vaddr, lay.p2m_generation):
            self._put(page, field, w, 0)
        if self.layout.p2m_vaddr:
            root = self.p2m[self.table_pfns["root"][0]]
            self._put(page, lay.p2m_cr3, w, abi.cr3_from_mfn(root, w))
            self._put(page, lay.p2m_vaddr, w, self.layout.p2m_vaddr)

    def _set_domain_state(self) -> None:
        rng = self.rng
        self.xen.set_tsc_info(self.domid, TscInfo(mode=rng.randrange(4), khz=2_000_000 + rng.randrange(10**6),
                                                  nsec=rng.getrandbits(40), incarnation=rng.randrange(4)))
        leaves = [(0, 0xFFFFFFFF, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69), (1, 0xFFFFFFFF, 0x906EA, 0x800, 0x7FFAFBBF, 0xBFEBFBFF),
                  (7, 0, 0, 0x29C6FBF, 0, 0x9C000400), (0xD, 0, 0x7, 0x340, 0x340, 0),
                  (0x8000_0000, 0xFFFFFFFF, 0x8000_0008, 0, 0, 0)]
        cpuid = b"".join(struct.pack("<6I", *leaf) for leaf in leaves)
        msrs = struct.pack("<IIQ", 0xCE, 0, 0x8000_0000) + struct.pack("<IIQ", 0x10A, 0, rng.getrandbits(16))
        self.xen.set_cpu_policy(self.domid, CpuPolicy(cpuid=cpuid, msrs=msrs))


_TABLE_LEVEL = {
    abi.WIDTH_64: {"l1": 1, "l2": 2, "l3": 3, "root": 4, "fixmap_l3": 3, "fixmap_l2": 2, "fixmap_l1": 1,
                   "proc_root": 4, "user_root": 4, "user_l3": 3, "user_l2": 2, "user_l1": 1,
                   "p2m_l1": 1, "p2m_l2": 2, "p2m_l3": 3, "p2m_missing_pte": 1},
    abi.WIDTH_32: {"l1": 1, "high_l1": 1, "high_l2": 2, "top_l2": 2, "fixmap_l1": 1, "root": 3, "proc_root": 3,
                   "p2m_l1": 1, "p2m_l2": 2, "p2m_missing_pte": 1},
}
