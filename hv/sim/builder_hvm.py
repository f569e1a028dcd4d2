"""Seeded builder of simulated HVM guests: `build_hvm_guest(xen, "hvm:mem=1G,vcpus=2,seed=7")`.

The guest is laid out the way Xen's HVM domain builder (tools/libs/guest/xg_dom_x86.c) leaves it:

* RAM at gfns 0-0x9F and from 0xC0 up, skipping the VGA hole 0xA0-0xBF; RAM that would reach into the
  MMIO hole below 4 GiB (from 0xF0000, a 256 MiB hole) continues at 4 GiB (gfn 0x100000). Populated in
  2 MiB extents where a whole aligned extent is RAM (a few frame by frame), elsewhere page by page.
* Eight special pages at 0xFEFF8-0xFEFFF (paging, monitor and sharing rings, buffered ioreq, xenstore,
  ioreq, identity pagetable, console) and eight ioreq-server pages below them, each named by its HVM
  param; plus the other parameters a booted guest has (VM86 TSS, ACPI port layout, Viridian, VM
  generation id, x87 FIP width, MCA capabilities), and a few that are not migrated (timer mode, HPET).
* An HVM context blob in Xen's record order (HEADER, per-vcpu CPU for online vcpus, PIC, IOAPIC, LAPIC,
  ..., END), loaded through set_hvm_context like a restore would, so the online vcpus come up.
* TSC info, a CPU policy, and the device model's state (`EmulatorState`: a "QEVM" blob and the VGA
  physmap entry) which the toolstack, not Xen, keeps.

Everything except the host's choice of mfns is a function of the spec string.
"""

from __future__ import annotations

import hashlib
import random
import re
import struct

import attrs

from xenstream.hv import abi, hvm_context, hvm_params
from xenstream.hv.emulator import EmulatorState, PhysmapRange
from xenstream.hv.interface import CpuPolicy, TscInfo
from xenstream.hv.sim.builder import GuestSpecError, memory_size, spec_counts, spec_fields
from xenstream.hv.sim.xen import SimXen

VGA_HOLE = range(0xA0, 0xC0)
MMIO_HOLE_START = 0xF0000  # pfn of 0xF0000000: libxl's default 256 MiB MMIO hole
HIGH_RAM_START = 0x100000  # 4 GiB
SPECIAL_REGION_END = 0xFF000  # X86_HVM_END_SPECIAL_REGION
NR_SPECIAL_PAGES = 8
NR_IOREQ_SERVER_PAGES = 8
SPECIAL_BASE = SPECIAL_REGION_END - NR_SPECIAL_PAGES
IOREQ_SERVER_BASE = SPECIAL_BASE - NR_IOREQ_SERVER_PAGES
# Special page index -> the param naming it (xg_dom_x86.c SPECIALPAGE_*).
SPECIAL_PAGE_PARAMS = {0: hvm_params.PAGING_RING_PFN, 1: hvm_params.MONITOR_RING_PFN, 2: hvm_params.SHARING_RING_PFN,
                       3: hvm_params.BUFIOREQ_PFN, 4: hvm_params.STORE_PFN, 5: hvm_params.IOREQ_PFN,
                       7: hvm_params.CONSOLE_PFN}
IDENT_PT_PAGE = 6
STORE_EVTCHN = 1
CONSOLE_EVTCHN = 2
CONTENT_POOL = 8 << 20
_SPEC_RE = re.compile(r"^hvm:(.*)$")
_MAX_VCPUS = 128


@attrs.frozen
class HvmGuestSpec:
    """`hvm:mem=1G,vcpus=2,online=2,seed=7` (mem required; vcpus 1, online all, seed 0)."""

    nr_pages: int
    vcpus: int = 1
    online: int = 1
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> HvmGuestSpec:
        match = _SPEC_RE.match(text.strip())
        if not match:
            raise GuestSpecError(f"guest spec {text!r} must start with hvm:")
        fields = spec_fields(match.group(1), ("mem", "vcpus", "online", "seed"))
        mem = memory_size(fields["mem"])
        vcpus, online, seed = spec_counts(fields)
        if mem % abi.PAGE_SIZE or mem < (1 << 20):
            raise GuestSpecError("mem must be a whole number of pages, at least 1M")
        if not 1 <= online <= vcpus <= _MAX_VCPUS:
            raise GuestSpecError(f"need 1 <= online <= vcpus <= {_MAX_VCPUS}")
        return cls(nr_pages=mem // abi.PAGE_SIZE, vcpus=vcpus, online=online, seed=seed)

    def __str__(self) -> str:
        return f"hvm:mem={self.nr_pages * 4}K,vcpus={self.vcpus},online={self.online},seed={self.seed}"


@attrs.frozen
class HvmLayout:
    """Where the guest's RAM is (half-open gfn ranges) and its special pages."""

    ram: tuple[tuple[int, int], ...]
    special: tuple[int, ...]
    ioreq_server: tuple[int, ...]

    @property
    def max_gpfn(self) -> int:
        return max(self.ram[-1][1], self.special[-1] + 1) - 1

    def populated(self) -> list[int]:
        pfns = [p for start, end in self.ram for p in range(start, end)]
        return sorted(pfns + list(self.ioreq_server) + list(self.special))


@attrs.frozen
class BuiltHvmGuest:
    domid: int
    spec: HvmGuestSpec
    layout: HvmLayout
    emulator: EmulatorState


def ram_layout(nr_pages: int) -> HvmLayout:
    low_end = min(VGA_HOLE.stop + nr_pages - VGA_HOLE.start, MMIO_HOLE_START)
    ram = [(0, VGA_HOLE.start), (VGA_HOLE.stop, low_end)]
    high = nr_pages - (VGA_HOLE.start + low_end - VGA_HOLE.stop)
    if high:
        ram.append((HIGH_RAM_START, HIGH_RAM_START + high))
    return HvmLayout(ram=tuple(ram), special=tuple(range(SPECIAL_BASE, SPECIAL_REGION_END)),
                     ioreq_server=tuple(range(IOREQ_SERVER_BASE, SPECIAL_BASE)))


def build_hvm_guest(xen: SimXen, spec: HvmGuestSpec | str) -> BuiltHvmGuest:
    if isinstance(spec, str):
        spec = HvmGuestSpec.parse(spec)
    return _HvmBuilder(xen, spec).build()


class HvmGuest:
    """The guest side of a built HVM guest: what the save path asks of it."""

    def __init__(self, xen: SimXen, built: BuiltHvmGuest) -> None:
        self.xen = xen
        self.domid = built.domid
        self.built = built

    def suspend(self) -> None:
        """The PV-on-HVM suspend: SCHEDOP_shutdown(SHUTDOWN_suspend); an HVM guest passes no start_info."""
        self.xen.guest_suspend(self.domid, 0)


class _HvmBuilder:
    def __init__(self, xen: SimXen, spec: HvmGuestSpec) -> None:
        self.xen = xen
        self.spec = spec
        self.rng = random.Random(f"hvm-guest:{spec}")
        self.layout = ram_layout(spec.nr_pages)

    def build(self) -> BuiltHvmGuest:
        spec, xen = self.spec, self.xen
        extra = NR_SPECIAL_PAGES + NR_IOREQ_SERVER_PAGES
        self.domid = xen.create_domain(max_vcpus=spec.vcpus, max_pages=spec.nr_pages + extra, hvm=True)
        self._populate()
        self._write_ram()
        self._write_special_pages()
        self._set_params()
        self._set_domain_state()
        xen.set_hvm_context(self.domid, self._context())
        xen.unpause(self.domid)
        return BuiltHvmGuest(domid=self.domid, spec=spec, layout=self.layout, emulator=self._emulator())

    def _populate(self) -> None:
        span = abi.SUPERPAGE_FRAMES
        extents, singles = [], []
        for start, end in self.layout.ram:
            pfn = start
            while pfn < end:
                if pfn % span == 0 and pfn + span <= end and self.rng.random() >= 0.125:
                    extents.append(pfn)
                    pfn += span
                else:
                    singles.append(pfn)
                    pfn += 1
        singles += list(self.layout.ioreq_server) + list(self.layout.special)
        if extents:
            self.xen.populate_physmap(self.domid, extents, abi.SUPERPAGE_ORDER)
        self.xen.populate_physmap(self.domid, singles, 0)

    def _pages(self, pfns: list[int]):
        return self.xen.map_foreign(self.domid, pfns, writable=True)

    def _write_ram(self) -> None:
        pool = memoryview(hashlib.shake_128(f"hvm-content:{self.spec}".encode()).digest(CONTENT_POOL + abi.PAGE_SIZE))
        state = self.rng.getrandbits(64) | 1
        for start, end in self.layout.ram:
            for first in range(start, end, 4096):
                for view in self._pages(list(range(first, min(first + 4096, end)))):
                    state = (state * 6364136223846793005 + 1442695040888963407) & 0xFFFF_FFFF_FFFF_FFFF
                    kind = state >> 60
                    offset = (state >> 8) % CONTENT_POOL
                    if kind == 0:
                        continue  # fresh frames are zero
                    if kind == 1:
                        view[0:1024] = pool[offset:offset + 1024]
                    else:
                        view[:] = pool[offset:offset + abi.PAGE_SIZE]

    def _text(self, size: int) -> bytes:
        words = (b"xenstore", b"watch", b"/local/domain", b"device/vbd", b"backend", b"state", b"console",
                 b"ioreq", b"vif", b"memory/target", b"control/shutdown", b"data/updated")
        out = bytearray()
        while len(out) < size:
            out += self.rng.choice(words) + b"\0"
        return bytes(out[:size])

    def _write_special_pages(self) -> None:
        special = self.layout.special
        pages = dict(zip(special, self._pages(list(special))))
        store, console = pages[special[4]], pages[special[7]]
        store[0:2048] = self._text(2048)
        store[2048:2064] = struct.pack("<4I", 301, 301, 1211, 1211)
        console[0:3072] = self._text(3072)
        console[3072:3088] = struct.pack("<4I", 40, 40, 2300, 2300)
        for index in (3, 5):  # buffered and synchronous ioreq pages: in-flight requests
            pages[special[index]][0:512] = self.rng.randbytes(512)
        # A 32-bit non-PAE identity map of 4 GiB in 4 MiB pages, as Xen's domain builder writes it.
        ident = struct.pack("<1024I", *((i << 22) | 0xE7 for i in range(1024)))
        pages[special[IDENT_PT_PAGE]][:] = ident

    def _set_params(self) -> None:
        rng, special = self.rng, self.layout.special
        values = {param: special[index] for index, param in SPECIAL_PAGE_PARAMS.items()}
        values.update({
            hvm_params.IDENT_PT: special[IDENT_PT_PAGE] << abi.PAGE_SHIFT,
            hvm_params.IOREQ_SERVER_PFN: self.layout.ioreq_server[0],
            hvm_params.NR_IOREQ_SERVER_PAGES: NR_IOREQ_SERVER_PAGES,
            hvm_params.VM86_TSS_SIZED: (0x80 << 32) | 0xFC00_8000,
            hvm_params.ACPI_IOPORTS_LOCATION: 1,
            hvm_params.VIRIDIAN: rng.choice((0, 0x1, 0x1F, 0x3F)),
            hvm_params.VM_GENERATION_ID_ADDR: rng.choice((0, 0xFC00_A000 + 16 * rng.randrange(64))),
            hvm_params.X87_FIP_WIDTH: rng.choice((0, 4, 8)),
            hvm_params.MCA_CAP: rng.choice((0, 1)),
            hvm_params.STORE_EVTCHN: STORE_EVTCHN,
            hvm_params.CONSOLE_EVTCHN: CONSOLE_EVTCHN,
            hvm_params.TIMER_MODE: 1,
            hvm_params.HPET_ENABLED: 1,
            hvm_params.PAE_ENABLED: 1,
        })
        for index, value in values.items():
            self.xen.set_hvm_param(self.domid, index, value)
        self.viridian = values[hvm_params.VIRIDIAN] != 0

    def _set_domain_state(self) -> None:
        rng = self.rng
        self.tsc = TscInfo(mode=rng.randrange(3), khz=2_000_000 + rng.randrange(10**6), nsec=rng.getrandbits(40),
                           incarnation=rng.randrange(4))
        self.xen.set_tsc_info(self.domid, self.tsc)
        leaves = [(0, 0xFFFFFFFF, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
                  (1, 0xFFFFFFFF, 0x906EA, 0x800, 0xF7FA3223, 0x0F8BFBFF),
                  (7, 0, 0, 0x29C6FBF, 0, 0x9C000400), (0x4000_0000, 0xFFFFFFFF, 0x4000_0005, 0, 0, 0)]
        cpuid = b"".join(struct.pack("<6I", *leaf) for leaf in leaves)
        msrs = struct.pack("<IIQ", 0xCE, 0, 0x8000_0000) + struct.pack("<IIQ", 0x10A, 0, rng.getrandbits(16))
        self.xen.set_cpu_policy(self.domid, CpuPolicy(cpuid=cpuid, msrs=msrs))

    def _context(self) -> bytes:
        """Xen's save order: every kind in typecode order, per-vcpu kinds once per vcpu (CPU only for the
        vcpus that are up), optional kinds only when in use."""
        rng, spec = self.rng, self.spec
        online = [0] + sorted(rng.sample(range(1, spec.vcpus), spec.online - 1))
        header = hvm_context.ContextHeader(hvm_context.HVM_FILE_MAGIC, hvm_context.HVM_FILE_VERSION,
                                           rng.getrandbits(48), 0x906EA, self.tsc.khz)
        out = [hvm_context.encode_header(header)]
        for code, kind in sorted(hvm_context.SAVE_KINDS.items()):
            if kind.name.startswith("VIRIDIAN") and not self.viridian:
                continue
            instances = range(spec.vcpus) if kind.per_vcpu else range(2 if kind.name == "PIC" else 1)
            for instance in instances:
                if code == hvm_context.CODE_CPU and instance not in online:
                    continue
                body = self._context_body(code, kind, instance)
                if body is not None:
                    out.append(hvm_context.encode_record(code, instance, body))
        out.append(hvm_context.encode_record(hvm_context.CODE_END, 0, b""))
        return b"".join(out)

    def _context_body(self, code: int, kind: hvm_context.SaveKind, instance: int) -> bytes | None:
        rng = self.rng
        if code == hvm_context.CODE_CPU_XSAVE:  # xfeature_mask, xcr0, xcr0_accum, then the XSAVE area
            return struct.pack("<QQQ", 0x7, 0x7, 0x7) + rng.randbytes(512 + 64 + 256)
        if code == hvm_context.CODE_CPU_MSR:  # count, reserved, then {index, reserved, value}; absent if none
            if rng.random() < 0.5:
                return None
            return struct.pack("<II", 1, 0) + struct.pack("<IIQ", 0xC000_0103, 0, instance)
        return rng.randbytes(kind.size)

    def _emulator(self) -> EmulatorState:
        qemu = b"QEVM" + struct.pack(">I", 3) + self.rng.randbytes(16 << 10)
        vram = PhysmapRange(phys_offset=0xF000_0000, start_addr=0xF000_0000 - (8 << 20) * self.rng.randrange(1, 3),
                            size=8 << 20, name=b"vga.vram")
        return EmulatorState(context=qemu, physmap=(vram,))
