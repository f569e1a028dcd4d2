"""The legacy (v1) save engine for HVM guests: what Xen 4.5's xc_domain_save plus libxl wrote, non-live.

    result = save_hvm_legacy(hv, domid, sink, toolstack_width=64, suspend=callback, emulator=state)

writes (spec legacy-v1-stream 2.5, 4): p2m_size (max_gpfn + 1, no extended info, no P2M frame list),
TSC_INFO, one pass of page batches over gfns 0..p2m_size-1 in 1024-aligned batches (the pages raw; a
hole is a bare XTAB entry, and a batch of nothing but holes is not written), VCPU_INFO, the HVM param
chunks of the non-zero params in 4.5's order (-14, -3, -15, -16, -17, -4, -8, -10, -11, -19, -20; -21
only with ``x87_fip_width_chunk=True``, as 4.5.4 and later stable releases wrote it), libxl's TOOLSTACK
blob with the device model's physmap entries, LAST_CHECKPOINT, the body terminator, the HVM tail
(ioreq, buffered-ioreq and xenstore pfns, the HVM context) and the libxl device-model record
"DeviceModelRecord0002" carrying qemu's state.

Params the v1 format has no chunk for (VM86_TSS_SIZED beyond the 128-byte size 4.5 assumed, MCA_CAP,
and X87_FIP_WIDTH unless asked for) are not carried, as with a real 4.5 saver.

Failures raise `LegacySaveError`; nothing after the failure is written.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Callable

import attrs

from xenstream.hv import abi, hvm_params
from xenstream.hv.emulator import EmulatorState
from xenstream.hv.guestview import hypervisor_call
from xenstream.hv.interface import Hypervisor
from xenstream.hv.lazylog import get_logger
from xenstream.legacy import constants as c
from xenstream.legacy import events as ev
from xenstream.legacy.save import LegacySaveError, LegacySaver, legacy_writer
from xenstream.legacy.writer import LegacyWriter

log = get_logger(__name__)

# 4.5's order of the HVM param chunks (xc_domain_save.c), each written only when its param is non-zero.
PARAM_CHUNK_ORDER = (
    c.CHUNK_HVM_GENERATION_ID_ADDR, c.CHUNK_HVM_IDENT_PT, c.CHUNK_HVM_PAGING_RING_PFN, c.CHUNK_HVM_ACCESS_RING_PFN,
    c.CHUNK_HVM_SHARING_RING_PFN, c.CHUNK_HVM_VM86_TSS, c.CHUNK_HVM_CONSOLE_PFN, c.CHUNK_HVM_ACPI_IOPORTS_LOCATION,
    c.CHUNK_HVM_VIRIDIAN, c.CHUNK_HVM_IOREQ_SERVER_PFN, c.CHUNK_HVM_NR_IOREQ_SERVER_PAGES,
)
_ENTRY_FORMAT = {32: "I", 64: "Q"}
_PHYSMAP_ENTRY = struct.Struct("<QQQI")
_PHYSMAP_GAP = {32: b"", 64: bytes(4)}  # the 64-bit struct's padding after the name (spec 8)
_XTAB = abi.pfinfo_from_pagetype(abi.PAGETYPE_XTAB)
_BROKEN = abi.pfinfo_from_pagetype(abi.PAGETYPE_BROKEN)
_NOTAB = abi.pfinfo_from_pagetype(abi.PAGETYPE_NOTAB)


@attrs.frozen
class LegacyHvmSaveResult:
    toolstack_width: int
    p2m_size: int
    pages_written: int
    param_chunks: int


def libxl_toolstack_blob(emulator: EmulatorState, width: int) -> bytes:
    """libxl's v1 TOOLSTACK blob: version 1, the physmap entries, each name NUL-terminated (spec 8)."""
    out = [struct.pack("<II", 1, len(emulator.physmap))]
    for entry in emulator.physmap:
        name = entry.name + b"\0"
        out.append(_PHYSMAP_ENTRY.pack(entry.phys_offset, entry.start_addr, entry.size, len(name)) + name
                   + _PHYSMAP_GAP[width])
    return b"".join(out)


class _LegacyHvmSaver(LegacySaver):
    def __init__(self, hv: Hypervisor, domid: int, writer: LegacyWriter, width: int, suspend: Callable[[], bool],
                 emulator: Callable[[], EmulatorState], x87_fip_width_chunk: bool) -> None:
        super().__init__(hv, domid, writer, width, suspend)
        self.emulator = emulator
        self.chunks = PARAM_CHUNK_ORDER + ((c.CHUNK_HVM_X87_FIP_WIDTH,) if x87_fip_width_chunk else ())

    def run(self) -> LegacyHvmSaveResult:
        hv, domid, write = self.hv, self.domid, self.writer.write
        info = hypervisor_call("domain info", hv.get_domain_info, domid)
        if not info.is_hvm:
            raise LegacySaveError(f"domain {domid} is PV; this engine saves HVM guests")
        self._call_suspend()
        if not hypervisor_call("domain info", hv.get_domain_info, domid).suspended:
            raise LegacySaveError(f"domain {domid} is not shut down for suspend")
        p2m_size = hypervisor_call("maximum gpfn", hv.get_max_gpfn, domid) + 1
        if p2m_size > c.MAX_P2M_SIZE:
            raise LegacySaveError(f"p2m_size {p2m_size:#x} does not fit the 28-bit pfn field")
        write(ev.P2mSize(p2m_size))
        tsc = hypervisor_call("TSC info", hv.get_tsc_info, domid)
        write(ev.TscInfo(tsc_mode=tsc.mode, elapsed_nsec=tsc.nsec, gtsc_khz=tsc.khz, incarnation=tsc.incarnation))
        for first in range(0, p2m_size, c.MAX_BATCH_SIZE):
            self._send_batch(first, min(c.MAX_BATCH_SIZE, p2m_size - first))

        words = info.max_vcpu_id // 64 + 1
        vcpumap = [0] * words
        for vcpu in range(info.max_vcpu_id + 1):
            if vcpu == 0 or hypervisor_call(f"vcpu{vcpu} info", hv.get_vcpu_online, domid, vcpu):
                vcpumap[vcpu // 64] |= 1 << (vcpu % 64)
        write(ev.VcpuInfo(max_vcpu_id=info.max_vcpu_id, vcpumap=tuple(vcpumap)))
        written = 0
        for chunk_id in self.chunks:
            index = c.HVM_PARAM_CHUNKS[chunk_id]
            value = hypervisor_call(f"HVM param {hvm_params.name(index)}", hv.get_hvm_param, domid, index)
            if value:
                write(ev.HvmParam(chunk_id=chunk_id, value=value))
                written += 1
        state = self.emulator()
        write(ev.Toolstack(data=libxl_toolstack_blob(state, self.width)))
        write(ev.LastCheckpoint())
        write(ev.EndOfBody())
        magic = [hypervisor_call(f"HVM param {hvm_params.name(i)}", hv.get_hvm_param, domid, i)
                 for i in (hvm_params.IOREQ_PFN, hvm_params.BUFIOREQ_PFN, hvm_params.STORE_PFN)]
        write(ev.HvmMagicPfns(*magic))
        write(ev.HvmContext(data=bytes(hypervisor_call("HVM context", hv.get_hvm_context, domid))))
        write(ev.DeviceModelRecord0002(length=len(state.context)))
        write(ev.DeviceModelData(data=state.context))
        return LegacyHvmSaveResult(toolstack_width=self.width, p2m_size=p2m_size, pages_written=self.pages,
                                   param_chunks=written)

    def _send_batch(self, first: int, count: int) -> None:
        hv, domid = self.hv, self.domid
        gfns = range(first, first + count)
        codes = hypervisor_call("page-type query", hv.get_page_types, domid, gfns)
        present = set(codes)
        if present <= {_XTAB}:
            return  # 4.5 drops a batch with no valid page
        if present == {_NOTAB}:
            entries = array.array(_ENTRY_FORMAT[self.width], gfns)
            pages = hypervisor_call("map page batch", hv.map_foreign, domid, gfns)
        else:
            entries = array.array(_ENTRY_FORMAT[self.width])
            data_gfns = []
            for gfn, code in zip(gfns, codes):
                if code == _XTAB:
                    entries.append(c.XTAB_ENTRY)
                elif code == _BROKEN:
                    entries.append(code | gfn)
                elif code == _NOTAB:
                    entries.append(gfn)
                    data_gfns.append(gfn)
                else:
                    raise LegacySaveError(f"page type {code:#x} for gfn {gfn:#x} in an HVM guest")
            pages = hypervisor_call("map page batch", hv.map_foreign, domid, data_gfns) if data_gfns else []
        if None in pages:
            raise LegacySaveError(f"cannot map a page of the batch at gfn {first:#x}")
        self.writer.write(ev.PageBatch(entries=entries, payload=memoryview(b"".join(pages))))
        self.pages += len(pages)


def save_hvm_legacy(hv: Hypervisor, domid: int, sink, *, toolstack_width: int = 64, suspend: Callable[[], bool],
                    emulator: Callable[[], EmulatorState], x87_fip_width_chunk: bool = False) -> LegacyHvmSaveResult:
    """Save HVM domain `domid` as a non-live v1 stream written to `sink` (anything with write());
    `emulator()` gives the device model's state once the guest is saved."""
    writer = legacy_writer(sink, toolstack_width)
    return _LegacyHvmSaver(hv, domid, writer, toolstack_width, suspend, emulator, x87_fip_width_chunk).run()
