"""Complete, plausible v1 streams from a handful of parameters, as a Xen 4.5 toolstack would write them.

`build_events(options)` yields the events of the stream (spec Appendix A, section 2.5 order);
`write_stream(sink, options)` writes them through `LegacyWriter`, reusing one page buffer so that a
GiB-sized stream takes seconds. Everything is deterministic from ``options.seed``.
"""

import array
import random
import struct

import attrs

from xenstream.hv.abi import (
    PAGE_SIZE,
    PAGETYPE_BROKEN,
    PAGETYPE_L1TAB,
    PAGETYPE_L4TAB,
    PAGETYPE_NOTAB,
    PAGETYPE_XALLOC,
    pagetype_has_data,
)
from xenstream.legacy import constants as c
from xenstream.legacy import events as ev
from xenstream.legacy.delta_encode import DeltaEncoder
from xenstream.legacy.synth_pages import POOL_PAGES, PagePool
from xenstream.legacy.synth_pv import PvGuest
from xenstream.legacy.synth_records import (
    hvm_context,
    qemu_state,
    tmem_pools,
    xl_json_config,
    xl_text_config,
)
from xenstream.legacy.writer import LegacyWriter

WRAPPERS = ("none", "xl", "xl-text", "xend", "libvirt", "xenops")
DEVICE_MODEL_RECORDS = {
    "DeviceModelRecord0002": ev.DeviceModelRecord0002,
    "QemuDeviceModelRecord": ev.QemuDeviceModelRecord,
    "RemusDeviceModelState": ev.RemusDeviceModelState,
    "XenopsQemuRecord": ev.XenopsQemuRecord,
}
# The order xc_domain_save writes the non-zero HVM parameter chunks in (spec 2.5 item 7).
HVM_PARAM_ORDER = (
    c.CHUNK_HVM_GENERATION_ID_ADDR, c.CHUNK_HVM_IDENT_PT, c.CHUNK_HVM_PAGING_RING_PFN,
    c.CHUNK_HVM_ACCESS_RING_PFN, c.CHUNK_HVM_SHARING_RING_PFN, c.CHUNK_HVM_VM86_TSS,
    c.CHUNK_HVM_CONSOLE_PFN, c.CHUNK_HVM_ACPI_IOPORTS_LOCATION, c.CHUNK_HVM_VIRIDIAN,
    c.CHUNK_HVM_IOREQ_SERVER_PFN, c.CHUNK_HVM_NR_IOREQ_SERVER_PAGES, c.CHUNK_HVM_X87_FIP_WIDTH,
)
# The Xen version (major, minor) from which each HVM parameter chunk exists (spec 2.4.4, 9.3).
HVM_PARAM_SINCE = {
    c.CHUNK_HVM_IDENT_PT: (4, 0), c.CHUNK_HVM_VM86_TSS: (4, 0), c.CHUNK_HVM_CONSOLE_PFN: (4, 1),
    c.CHUNK_HVM_ACPI_IOPORTS_LOCATION: (4, 1), c.CHUNK_HVM_VIRIDIAN: (4, 2),
    c.CHUNK_HVM_GENERATION_ID_ADDR: (4, 2), c.CHUNK_HVM_PAGING_RING_PFN: (4, 2),
    c.CHUNK_HVM_ACCESS_RING_PFN: (4, 2), c.CHUNK_HVM_SHARING_RING_PFN: (4, 2),
    c.CHUNK_HVM_IOREQ_SERVER_PFN: (4, 5), c.CHUNK_HVM_NR_IOREQ_SERVER_PAGES: (4, 5),
    c.CHUNK_HVM_X87_FIP_WIDTH: (4, 5),
}
XEN_VERSIONS = tuple((4, minor) for minor in range(6))
VGA_HOLE = range(0xA0, 0xC0)
COMPRESSION_STAGING_PAGES = 8192  # the saver's page buffer; a full one is flushed as COMPRESSED_DATA
DIRTY_FRACTION = 8  # one page in this many is in the guest's hot (repeatedly dirtied) working set


@attrs.frozen
class PhysmapSpec:
    """One qemu physmap entry for the libxl TOOLSTACK blob; ``name`` None writes namelen 0."""

    phys_offset: int
    start_addr: int
    size: int
    name: bytes | None = b"vga"


@attrs.frozen
class BuildOptions:
    """What to build. Widths are in bits; ``guest_width`` (PV only) defaults to the toolstack's.

    ``checkpoints`` > 1 or ``remus`` makes a Remus stream (no LAST_CHECKPOINT; checkpoint 1 is a live
    migration); ``compression`` needs Remus. ``live_iterations`` > 0 adds that many live passes before
    the final one. ``holes`` are unpopulated PFNs (PV: the unmapped list; HVM: XTAB entries).
    """

    width: int = 64
    guest: str = "pv"
    guest_width: int | None = None
    pages: int = 64
    vcpus: int = 1
    max_vcpus: int | None = None
    seed: int = 0
    wrapper: str = "none"
    checkpoints: int = 1
    remus: bool = False
    compression: bool = False
    live_iterations: int = 0
    verify_pass: bool = False
    tmem: bool = False
    xsave: bool = True
    holes: int = 3
    broken_pages: int = 0
    toolstack: bool = True
    physmap: tuple[PhysmapSpec, ...] = ()
    physmap_gap: bytes = bytes(4)
    device_model: str = "DeviceModelRecord0002"
    device_model_size: int = 3000
    hvm_params: tuple[tuple[int, int], ...] | None = None
    x87_fip_width: int = 0
    go_message: bool = False
    xen_version: tuple[int, int] = (4, 5)

    def __attrs_post_init__(self):
        if self.width not in (32, 64):
            raise ValueError("width must be 32 or 64")
        if self.guest not in ("pv", "hvm"):
            raise ValueError("guest must be 'pv' or 'hvm'")
        if self.guest_width not in (None, 32, 64):
            raise ValueError("guest_width must be 32 or 64")
        if self.wrapper not in WRAPPERS:
            raise ValueError(f"wrapper must be one of {WRAPPERS}")
        if self.device_model not in DEVICE_MODEL_RECORDS:
            raise ValueError(f"device_model must be one of {tuple(DEVICE_MODEL_RECORDS)}")
        if self.checkpoints < 1:
            raise ValueError("a stream has at least one checkpoint")
        if self.vcpus < 1 or (self.max_vcpus or self.vcpus) < self.vcpus:
            raise ValueError("a guest has at least one vcpu, and max_vcpus at least vcpus")
        if self.compression and not self.checkpointed:
            raise ValueError("checkpoint compression exists only in Remus streams")
        if self.guest == "hvm" and self.device_model == "QemuDeviceModelRecord" and self.checkpoints > 1:
            raise ValueError("QemuDeviceModelRecord runs to end of input: nothing can follow it")
        if self.xen_version not in XEN_VERSIONS:
            raise ValueError(f"xen_version must be one of {XEN_VERSIONS}")
        missing = [feature for feature, since, used in self._versioned_features() if used and self.xen_version < since]
        if missing:
            raise ValueError(f"Xen {self.xen_version[0]}.{self.xen_version[1]} savers wrote no {', '.join(missing)}")

    def _versioned_features(self):
        hvm = self.guest == "hvm"
        return (
            ("xsave records", (4, 1), self.guest == "pv" and self.xsave),
            ("TOOLSTACK chunk", (4, 2), self.toolstack),
            ("checkpoint compression", (4, 2), self.compression),
            ("BROKEN pages", (4, 3), self.broken_pages > 0),
            ("HVM_X87_FIP_WIDTH chunk", (4, 5), self.x87_fip_width > 0),
            ("xl header", (4, 1), self.wrapper.startswith("xl")),
            ("JSON xl config", (4, 5), self.wrapper == "xl"),
            ("DeviceModelRecord0002", (4, 1), hvm and self.device_model == "DeviceModelRecord0002"),
        )

    @property
    def checkpointed(self) -> bool:
        return self.remus or self.checkpoints > 1

    @property
    def live(self) -> bool:
        return self.live_iterations > 0 or self.checkpointed

    @property
    def guest_word_bytes(self) -> int:
        return (self.guest_width or self.width) // 8


def write_stream(sink, options: BuildOptions) -> None:
    """Write the stream `options` describe to `sink` (anything with ``write``)."""
    LegacyWriter(sink, width=options.width).write_all(build_events(options, reuse_buffers=True))


def build_stream(options: BuildOptions) -> bytes:
    out = bytearray()

    class _Sink:
        write = out.extend

    write_stream(_Sink(), options)
    return bytes(out)


def build_events(options: BuildOptions, *, reuse_buffers: bool = False):
    """The events of the stream. With ``reuse_buffers`` page payloads are views of one buffer that the
    next batch overwrites: only for consumers that use each event before asking for the next."""
    return _StreamBuilder(options, reuse_buffers).events()


class _HvmGuest:
    """PFN layout of a small HVM guest: RAM with holes (VGA hole when large enough), special pages at the top."""

    def __init__(self, options: BuildOptions, rng: random.Random):
        self.p2m_size = options.pages + options.holes
        holes = set(VGA_HOLE) if self.p2m_size > VGA_HOLE.stop + options.holes else set()
        self.p2m_size += len(holes)
        candidates = [pfn for pfn in range(1, self.p2m_size - 6) if pfn not in holes]
        holes.update(rng.sample(candidates, options.holes))
        self.holes = holes
        top = self.p2m_size
        self.ioreq_pfn, self.bufioreq_pfn, self.store_pfn, self.console_pfn = top - 1, top - 2, top - 3, top - 4
        self.ioreq_server_pfn = top - 6

    def params(self, options: BuildOptions) -> list[tuple[int, int]]:
        if options.hvm_params is not None:
            values = dict(options.hvm_params)
        else:
            values = {
                c.CHUNK_HVM_GENERATION_ID_ADDR: 0xFC00_3000,
                c.CHUNK_HVM_IDENT_PT: 0xFEFF_D000,
                c.CHUNK_HVM_VM86_TSS: 0xFC01_2000,
                c.CHUNK_HVM_CONSOLE_PFN: self.console_pfn,
                c.CHUNK_HVM_ACPI_IOPORTS_LOCATION: 1,
                c.CHUNK_HVM_IOREQ_SERVER_PFN: self.ioreq_server_pfn,
                c.CHUNK_HVM_NR_IOREQ_SERVER_PAGES: 2,
            }
        if options.x87_fip_width:
            values[c.CHUNK_HVM_X87_FIP_WIDTH] = options.x87_fip_width
        return [(chunk, values[chunk]) for chunk in HVM_PARAM_ORDER
                if values.get(chunk) and options.xen_version >= HVM_PARAM_SINCE[chunk]]


def _xl_header(flags: int, config: bytes) -> ev.XlHeader:
    return ev.XlHeader(flags, 0, struct.pack("<I", len(config)) + config)


_WRAPPER_EVENTS = {
    "xl": lambda name, guest, kib, vcpus: _xl_header(c.XL_FLAG_JSON, xl_json_config(name, guest, kib, vcpus)),
    "xl-text": lambda name, guest, kib, vcpus: _xl_header(0, xl_text_config(name, guest, kib, vcpus)),
    "xend": lambda name, guest, kib, vcpus: ev.XendHeader(
        f"(domain (domid 7) (name {name}) (memory {kib // 1024}) (vcpus {vcpus}))".encode()),
    "libvirt": lambda name, guest, kib, vcpus: ev.LibvirtHeader(
        c.LIBVIRT_VERSION_V1, f"<domain type='xen'><name>{name}</name><memory>{kib}</memory></domain>\n\0".encode()),
    "xenops": lambda name, guest, kib, vcpus: ev.XenopsHeader(),
}


class _StreamBuilder:
    def __init__(self, options: BuildOptions, reuse_buffers: bool):
        self.o = options
        self.reuse = reuse_buffers
        self.rng = random.Random(options.seed)
        self.pv = options.guest == "pv"
        if self.pv:
            self.guest = PvGuest(guest_width=options.guest_word_bytes, pages=options.pages, vcpus=options.vcpus,
                                 seed=options.seed, holes=options.holes, toolstack_width=options.width // 8)
            self.p2m_size = self.guest.p2m_size
            self.holes = set(self.guest.layout.holes)
        else:
            self.guest = _HvmGuest(options, self.rng)
            self.p2m_size = self.guest.p2m_size
            self.holes = self.guest.holes
        self.pool = PagePool(options.seed, pool_pages=min(POOL_PAGES, max(64, self.p2m_size)))
        populated = [pfn for pfn in range(self.p2m_size) if pfn not in self.holes]
        self.broken = set(self.rng.sample(self._plain_pfns(populated), options.broken_pages))
        self.populated = populated
        self.generation = dict.fromkeys(populated, 0)
        self.max_vcpu_id = (options.max_vcpus or options.vcpus) - 1
        self.online = list(range(options.vcpus))
        # Sent again in every dirty pass without having changed (the saver's dirty log over-reports):
        # what makes EMPTY encodings in compressed checkpoints.
        self.resent_unchanged = self.guest.layout.start_info if self.pv else self.guest.store_pfn
        self.dirtiable = [pfn for pfn in populated if pfn not in self.broken]
        self.hot_pages = sorted(self.rng.sample(self.dirtiable, max(2, len(self.dirtiable) // DIRTY_FRACTION)))
        self.buffer = bytearray(c.MAX_BATCH_SIZE * PAGE_SIZE) if reuse_buffers else None
        self.extended_context_size = 56 if options.xen_version >= (4, 3) else 40 if options.xen_version >= (4, 2) else 32
        self.tmem_oid_words = 3 if options.xen_version >= (4, 1) else 1
        self.tsc = ev.TscInfo(0, self.rng.randrange(10**9, 10**13), 2_893_000 + self.rng.randrange(1000), 0)

    def _plain_pfns(self, populated: list[int]) -> list[int]:
        if not self.pv:
            special = {self.guest.ioreq_pfn, self.guest.bufioreq_pfn, self.guest.store_pfn, self.guest.console_pfn}
            return [pfn for pfn in populated if pfn not in special]
        return [pfn for pfn in populated if self.guest.special_page(pfn) is None
                and pfn not in self.guest.layout.gdt_frames
                and pfn not in (self.guest.layout.store, self.guest.layout.console)]

    # ---- the stream ------------------------------------------------------------------------------

    def events(self):
        o = self.o
        yield ev.Detected(wrapper=o.wrapper.split("-")[0], width=o.width, guest=o.guest,
                          guest_width=o.guest_word_bytes if self.pv else None,
                          pt_levels=(4 if o.guest_word_bytes == 8 else 3) if self.pv else None)
        yield from self._wrapper()
        yield ev.P2mSize(self.p2m_size)
        if self.pv:
            yield self._extended_info()
            yield ev.P2mFrames(self.guest.layout.p2m_frames)
        encoder = None
        for checkpoint in range(1, o.checkpoints + 1):
            if checkpoint == 1:
                yield from self._first_body()
            elif encoder is not None:
                yield from self._compressed_pass(self._dirty_set(), encoder)
            else:
                yield from self._pass(self._dirty_set())
            yield from self._body_end(first=checkpoint == 1)
            yield from self._tail(checkpoint)
            if o.compression and encoder is None:
                encoder = DeltaEncoder()
        if o.go_message:
            yield ev.XlGoMessage()

    def _wrapper(self):
        o = self.o
        if o.wrapper == "none":
            return
        guest_name = f"guest{o.seed}"
        memory_kib = len(self.populated) * 4
        yield _WRAPPER_EVENTS[o.wrapper](guest_name, o.guest, memory_kib, o.vcpus)

    def _extended_info(self) -> ev.ExtendedInfo:
        blocks = [ev.ExtendedInfoBlock(c.EXT_BLOCK_VCPU, self.guest.vcpu_context(0, canonical=False)),
                  ev.ExtendedInfoBlock(c.EXT_BLOCK_EXTV, b"")]
        if self.o.xsave:
            xcnt = len(self.guest.xsave_record(0))
            blocks.append(ev.ExtendedInfoBlock(c.EXT_BLOCK_XCNT, struct.pack("<I", xcnt)))
        total = sum(8 + len(block.data) for block in blocks)
        return ev.ExtendedInfo(total, tuple(blocks))

    def _first_body(self):
        o = self.o
        if o.tmem:
            yield from self._tmem()
        every_pfn = self.populated if self.pv else range(self.p2m_size)
        if not o.live:
            yield self.tsc
            yield from self._pass(every_pfn, dirty=False)
        else:
            # HVM saves (superpage mode) send pages the guest dirtied again during the first live pass
            # as XALLOC: allocate now, contents in the next pass (Xen 4.2+).
            dirty_next = self._dirty_set()
            allocate_only = set(dirty_next[::2]) if not self.pv and o.xen_version >= (4, 2) else set()
            yield from self._pass(every_pfn, dirty=False, allocate_only=allocate_only)
            for _ in range(max(o.live_iterations, 1) - 1):
                yield from self._pass(dirty_next)
                dirty_next = self._dirty_set()
            if o.tmem:
                yield from self._tmem_extra()
            yield self.tsc
            yield from self._pass(dirty_next)
        if o.verify_pass:
            yield ev.EnableVerifyMode()
            yield from self._pass(every_pfn, dirty=False)

    def _body_end(self, first: bool):
        o = self.o
        vcpumap = [0] * (self.max_vcpu_id // 64 + 1)
        for vcpu in [0, *self.online]:
            vcpumap[vcpu // 64] |= 1 << (vcpu % 64)
        yield ev.VcpuInfo(self.max_vcpu_id, tuple(vcpumap))
        if not self.pv:
            for chunk_id, value in self.guest.params(o):
                yield ev.HvmParam(chunk_id, value)
        if o.toolstack:
            yield self._toolstack()
        if not o.checkpointed and o.xen_version >= (4, 1):
            yield ev.LastCheckpoint()
        if first and o.compression:
            yield ev.EnableCompression()
        yield ev.EndOfBody()

    def _toolstack(self) -> ev.Toolstack:
        o = self.o
        blob = bytearray(struct.pack("<II", 1, len(o.physmap)))
        entries = []
        gap = o.physmap_gap if o.width == 64 else b""
        for spec in o.physmap:
            name = None if spec.name is None else spec.name + b"\0"
            blob += struct.pack("<QQQI", spec.phys_offset, spec.start_addr, spec.size, len(name or b""))
            blob += (name or b"") + gap
            entries.append(ev.PhysmapEntry(spec.phys_offset, spec.start_addr, spec.size, name, gap))
        return ev.Toolstack(bytes(blob), ev.LibxlToolstack(1, tuple(entries), o.width))

    def _tail(self, checkpoint: int):
        o = self.o
        if self.pv:
            yield ev.UnmappedPfns(tuple(sorted(self.holes)))
            for vcpu in self.online:
                yield ev.VcpuBasic(vcpu, self.guest.vcpu_context(vcpu, generation=checkpoint))
                yield ev.VcpuExtended(vcpu, self.guest.extended_context(vcpu, self.extended_context_size))
                if o.xsave:
                    record = self.guest.xsave_record(vcpu, checkpoint)
                    mask, size = struct.unpack_from("<QQ", record)
                    yield ev.VcpuXsave(vcpu, mask, size, record[16:])
            yield ev.SharedInfo(self.guest.shared_info(self.online, checkpoint))
            return
        guest = self.guest
        yield ev.HvmMagicPfns(guest.ioreq_pfn, guest.bufioreq_pfn, guest.store_pfn)
        yield ev.HvmContext(hvm_context(o.seed + checkpoint, o.vcpus, self.tsc.gtsc_khz))
        record_class = DEVICE_MODEL_RECORDS[o.device_model]
        state = qemu_state(o.seed + checkpoint, o.device_model_size)
        if record_class is ev.QemuDeviceModelRecord:
            yield record_class()
        else:
            yield record_class(len(state))
        yield ev.DeviceModelData(state)
        yield ev.DeviceModelEnd(len(state))

    # ---- page batches ------------------------------------------------------------------------------

    def _dirty_set(self) -> list[int]:
        """Pages a running guest dirtied since the last pass, ascending: mostly from its hot working set
        (so successive checkpoints resend the same PFNs, as real ones do), plus (PV) an L1 table."""
        hot = self.hot_pages
        chosen = set(self.rng.sample(hot, max(1, len(hot) * 3 // 4)))
        chosen.add(self.rng.choice(self.dirtiable))
        chosen.add(self.resent_unchanged)
        if self.pv:
            l1_tables = [pfn for pfn, table in self.guest.layout.pagetables.items() if table[0] == PAGETYPE_L1TAB]
            chosen.add(l1_tables[0])
        return sorted(chosen)

    def _bump_generations(self, pfns) -> None:
        for pfn in pfns:
            if pfn in self.generation and pfn != self.resent_unchanged:
                self.generation[pfn] += 1

    def _entry(self, pfn: int, allocate_only=frozenset()) -> int:
        if pfn in self.holes:
            return c.XTAB_ENTRY
        if pfn in self.broken:
            return (PAGETYPE_BROKEN << c.TYPE_SHIFT) | pfn
        if pfn in allocate_only:
            return (PAGETYPE_XALLOC << c.TYPE_SHIFT) | pfn
        page_type = self.guest.page_type(pfn) if self.pv else PAGETYPE_NOTAB
        return (page_type << c.TYPE_SHIFT) | pfn

    def _page_into(self, dest, offset: int, pfn: int) -> None:
        if self.pv:
            special = self.guest.special_page(pfn)
            if special is not None:
                dest[offset:offset + PAGE_SIZE] = special
                return
        self.pool.fill(dest, offset, pfn, self.generation[pfn])

    def _batches(self, pfns):
        """Split an ascending PFN sequence as the saver does: 1024 selected PFNs a batch (so a first HVM
        pass, which selects every PFN, gives batches aligned to 1024 PFNs); batches made only of XTAB
        entries are dropped later."""
        pfns = list(pfns)
        for start in range(0, len(pfns), c.MAX_BATCH_SIZE):
            yield pfns[start:start + c.MAX_BATCH_SIZE]

    def _entries_array(self, entries: list[int]) -> array.array:
        return array.array("Q" if self.o.width == 64 else "I", entries)

    def _pass(self, pfns, dirty: bool = True, allocate_only=frozenset()):
        """One Format A pass: the given PFNs sent with their current contents, first rewritten by the
        guest when they are `dirty` (a pass over pages dirtied since the previous one); PFNs in
        `allocate_only` go as data-less XALLOC entries."""
        if dirty:
            self._bump_generations(pfns)
        for batch in self._batches(pfns):
            entries = [self._entry(pfn, allocate_only) for pfn in batch]
            data_pfns = [pfn for pfn, entry in zip(batch, entries) if pagetype_has_data(entry >> c.TYPE_SHIFT)]
            if not data_pfns and all(entry == c.XTAB_ENTRY for entry in entries):
                continue
            size = len(data_pfns) * PAGE_SIZE
            buffer = self.buffer if self.reuse else bytearray(size)
            for index, pfn in enumerate(data_pfns):
                self._page_into(buffer, index * PAGE_SIZE, pfn)
            payload = memoryview(buffer)[:size].toreadonly()
            yield ev.PageBatch(self._entries_array(entries), payload)

    def _compressed_pass(self, pfns, encoder: DeltaEncoder):
        """A Format B checkpoint body (spec 6.2): entry arrays, then the pages as COMPRESSED_DATA."""
        self._bump_generations(pfns)
        staged = bytearray()
        staged_pages = 0
        page = bytearray(PAGE_SIZE)
        for batch in self._batches(pfns):
            entries = [self._entry(pfn) for pfn in batch]
            yield ev.PageBatch(self._entries_array(entries), None, compressed=True)
            for pfn, entry in zip(batch, entries):
                page_type = entry >> c.TYPE_SHIFT
                if not pagetype_has_data(page_type):
                    continue
                self._page_into(page, 0, pfn)
                table = PAGETYPE_L1TAB <= (page_type & 0x7) <= PAGETYPE_L4TAB
                staged += encoder.encode(pfn, page, pagetable=table)
                staged_pages += 1
                if staged_pages == COMPRESSION_STAGING_PAGES:
                    yield ev.CompressedData(bytes(staged))
                    staged.clear()
                    staged_pages = 0
        if staged_pages:
            yield ev.CompressedData(bytes(staged))

    # ---- tmem --------------------------------------------------------------------------------------

    def _tmem(self):
        pools = tmem_pools(self.o.seed)
        yield ev.TmemHeader(0 if self.tmem_oid_words == 1 else 1, 16, 0, 0, 0)
        for pool in pools:
            persistent = pool.flags & 1
            n_pages = len(pool.pages) if persistent else 0
            yield ev.TmemPool(pool.pool_id, pool.flags, n_pages, struct.pack("<QQ", *pool.uuid))
            for page in pool.pages[:n_pages]:
                yield ev.TmemPage(pool.pool_id, page.object_id[:self.tmem_oid_words], page.index, page.data)
        yield ev.TmemEnd()

    def _tmem_extra(self):
        (persistent, _) = tmem_pools(self.o.seed)
        yield ev.TmemExtraStart()
        for page in persistent.pages:
            yield ev.TmemInvalidation(persistent.pool_id, page.object_id[:self.tmem_oid_words], page.index)
        yield ev.TmemExtraEnd()
