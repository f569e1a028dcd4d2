"""What a v2 stream holds, summarised from reader events: the data model behind `xenstream inspect` for v2.

    inspect_fd(fd, head=b"", colo=False, collapse=True) -> V2Report   # reads fd to its end; `head` = bytes
                                                                    # of the stream already read from fd
    inspect_events(events, collapse=True) -> V2Report                # from events of a V2Reader
    report.to_dict()  (JSON form)   report.lines()  (text form)   report.ok

Page payloads are passed over, never kept. Consecutive PAGE_DATA records are collapsed into runs
(``PageRun``) unless ``collapse=False``. A stream error ends the report early: it keeps what was seen and records
the error (``error``, ``error_offset``); ``ok`` is False then.
"""

from __future__ import annotations

import os
import struct
from collections import Counter

import attrs

from xenstream.hv.abi import pagetype_name
from xenstream.v2 import constants as C
from xenstream.v2 import libxl_records as L
from xenstream.v2 import records as R
from xenstream.v2.errors import StreamError
from xenstream.v2.events import NEED_DATA, EndOfStream, Header, LibxcRecord, LibxlRecord, SkippedRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.xl_header import XlHeader

READ_SIZE = 1 << 20
_HVM_SAVE_CODE_CPU = 2


@attrs.define
class RecordLine:
    offset: int
    layer: str
    type: int
    name: str
    length: int
    detail: str = ""


@attrs.define
class PageRun:
    """Consecutive PAGE_DATA records."""

    offset: int
    records: int = 0
    bytes: int = 0  # sum of the records' body lengths
    entries: int = 0
    pages: int = 0
    first_pfn: int | None = None
    last_pfn: int | None = None


@attrs.define
class V2Report:
    headers: dict = attrs.Factory(dict)
    records: list = attrs.Factory(list)  # RecordLine or PageRun, in stream order
    record_counts: Counter = attrs.Factory(Counter)
    pages_by_type: Counter = attrs.Factory(Counter)
    page_data_records: int = 0
    data_pages: int = 0
    pfn_min: int | None = None
    pfn_max: int | None = None
    pv_info: dict | None = None
    p2m: list = attrs.Factory(list)
    vcpus: dict = attrs.Factory(dict)
    tsc: dict | None = None
    hvm_params: dict = attrs.Factory(dict)
    hvm_context: dict | None = None
    policies: dict = attrs.Factory(dict)
    emulator: list = attrs.Factory(list)
    checkpoints: list = attrs.Factory(list)
    skipped_optional: list = attrs.Factory(list)
    end: dict | None = None
    trailing_bytes: int = 0
    error: str | None = None
    error_offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        data = attrs.asdict(self, recurse=True)
        data["records"] = [{"kind": type(r).__name__, **attrs.asdict(r)} for r in self.records]
        data["record_counts"] = dict(sorted(self.record_counts.items()))
        data["pages_by_type"] = {pagetype_name(t): n for t, n in sorted(self.pages_by_type.items())}
        data["vcpus"] = {str(k): v for k, v in sorted(self.vcpus.items())}
        data["hvm_params"] = {f"{k}": v for k, v in sorted(self.hvm_params.items())}
        data["ok"] = self.ok
        return {"format": "v2", **data}

    def lines(self) -> list[str]:
        out = [f"{name}: {_describe(value)}" for name, value in self.headers.items()]
        out.append("records:")
        for entry in self.records:
            if isinstance(entry, PageRun):
                label = "PAGE_DATA" if entry.records == 1 else f"PAGE_DATA x{entry.records}"
                pfns = f"pfns {entry.first_pfn:#x}..{entry.last_pfn:#x}" if entry.first_pfn is not None else "no pfns"
                out.append(
                    f"  {entry.offset:#010x}  libxc {label:<26} {entry.bytes:>10} bytes  "
                    f"{entry.entries} entries, {entry.pages} pages, {pfns}"
                )
            else:
                detail = f"  {entry.detail}" if entry.detail else ""
                out.append(f"  {entry.offset:#010x}  {entry.layer:<5} {entry.name:<26} {entry.length:>10} bytes{detail}")
        if self.page_data_records:
            types = ", ".join(f"{pagetype_name(t)} {n}" for t, n in sorted(self.pages_by_type.items()))
            out.append(
                f"pages: {self.page_data_records} PAGE_DATA records, {sum(self.pages_by_type.values())} entries "
                f"({types}), {self.data_pages} with data; pfn range {self.pfn_min:#x}..{self.pfn_max:#x}"
            )
        if self.pv_info:
            out.append(f"pv: guest width {self.pv_info['guest_width']}, {self.pv_info['pt_levels']}-level paging")
        for p2m in self.p2m:
            out.append(f"p2m frames: pfns {p2m['start_pfn']:#x}..{p2m['end_pfn']:#x} in {p2m['frames']} frames")
        if self.vcpus:
            out.append(f"vcpus: {len(self.vcpus)}")
            for vcpu, kinds in sorted(self.vcpus.items()):
                out.append(f"  vcpu {vcpu}: " + ", ".join(f"{k} {v} bytes" for k, v in kinds.items()))
        if self.hvm_context:
            entries = self.hvm_context["entries"]
            out.append(f"vcpus: {entries['cpus']} (CPU entries of the HVM context)")
            out.append(f"hvm context: {self.hvm_context['length']} bytes, {entries['entries']} save entries")
        if self.hvm_params:
            out.append("hvm params: " + ", ".join(f"{_hvm_param_name(k)} {v:#x}" for k, v in sorted(self.hvm_params.items())))
        if self.tsc:
            out.append("tsc: " + _describe(self.tsc))
        if self.policies:
            out.append("policies: " + _describe(self.policies))
        for emulator in self.emulator:
            out.append("emulator: " + _describe(emulator))
        if self.checkpoints:
            out.append(f"checkpoints: {len(self.checkpoints)} (CHECKPOINT at " + ", ".join(f"{c:#x}" for c in self.checkpoints) + ")")
        for skipped in self.skipped_optional:
            out.append(f"skipped optional record: type {skipped['type']:#x} at {skipped['offset']:#x}, {skipped['length']} bytes")
        if self.end:
            state = "complete" if self.end["complete"] else "stopped at a checkpoint boundary (no END)"
            out.append(f"end: {state} at {self.end['offset']:#x}, {self.trailing_bytes} trailing bytes")
        if self.error:
            out.append(f"ERROR at offset {self.error_offset:#x}: {self.error}")
        return out


def _describe(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_describe(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    return str(value)


HVM_PARAM_NAMES = {
    1: "STORE_PFN", 2: "STORE_EVTCHN", 4: "PAE_ENABLED", 5: "IOREQ_PFN", 6: "BUFIOREQ_PFN", 9: "VIRIDIAN",
    12: "IDENT_PT", 17: "CONSOLE_PFN", 19: "ACPI_IOPORTS_LOCATION", 27: "PAGING_RING_PFN",
    28: "MONITOR_RING_PFN", 29: "SHARING_RING_PFN", 32: "IOREQ_SERVER_PFN", 33: "NR_IOREQ_SERVER_PAGES",
    34: "VM_GENERATION_ID_ADDR", 36: "X87_FIP_WIDTH", 37: "VM86_TSS_SIZED", 38: "MCA_CAP",
}


def _hvm_param_name(index: int) -> str:
    return HVM_PARAM_NAMES.get(index, str(index))


def _hvm_context_entries(blob: bytes) -> dict:
    """Count the save entries of an HVM context blob by type code; stops quietly at anything malformed."""
    counts: Counter = Counter()
    pos = 0
    while pos + 8 <= len(blob):
        code, _instance, length = struct.unpack_from("<HHI", blob, pos)
        counts[code] += 1
        pos += 8 + length
        if code == 0:
            break
    return {"entries": sum(counts.values()), "cpus": counts.get(_HVM_SAVE_CODE_CPU, 0)}


def _xl_header(header: XlHeader) -> dict:
    flags = [name for bit, name in ((C.XL_FLAG_JSON, "JSON"), (C.XL_FLAG_STREAMV2, "STREAMv2")) if header.mandatory_flags & bit]
    config = header.config
    return {
        "byteorder": "little" if header.byteorder == "<" else "big",
        "mandatory_flags": "|".join(flags) or "0",
        "optional_flags": header.optional_flags,
        "config_bytes": None if config is None else len(config),
    }


class _Collector:
    def __init__(self, collapse: bool = True):
        self.report = V2Report()
        self._collapse = collapse
        self._run: PageRun | None = None

    def handle(self, event) -> None:
        handler = self._HANDLERS.get(type(event))
        if handler:
            handler(self, event)

    # headers
    def _header(self, event: Header) -> None:
        header = event.header
        if isinstance(header, XlHeader):
            self.report.headers["xl header"] = {**_xl_header(header), "offset": event.offset}
        elif isinstance(header, L.LibxlHeader):
            self.report.headers["libxl header"] = {"version": C.LIBXL_VERSION, "legacy_converted": header.legacy, "offset": event.offset}
        elif isinstance(header, R.ImageHeader):
            self.report.headers["libxc image header"] = {"version": header.version, "endianness": "little", "offset": event.offset}
        elif isinstance(header, R.DomainHeader):
            saved_by = "converted from a legacy stream" if header.converted_from_legacy else f"Xen {header.xen_major}.{header.xen_minor}"
            self.report.headers["domain"] = {
                "guest": C.DOMAIN_TYPE_NAMES[header.guest_type],
                "page_shift": header.page_shift,
                "saved_by": saved_by,
            }

    # records
    def _libxl_record(self, event: LibxlRecord) -> None:
        self._run = None
        body = event.body
        self.report.record_counts[f"libxl {body.NAME}"] += 1
        detail = ""
        if isinstance(body, (L.EmulatorContext, L.EmulatorXenstoreData)):
            emulator = {
                "record": body.NAME,
                "emulator": C.EMULATOR_NAMES.get(body.emulator_id, str(body.emulator_id)),
                "index": body.index,
                "bytes": len(body.data),
            }
            if isinstance(body, L.EmulatorXenstoreData):
                try:
                    emulator["keys"] = len(body.pairs())
                except R.BodyError as exc:
                    emulator["keys"] = f"unreadable ({exc})"
            self.report.emulator.append(emulator)
            detail = f"{emulator['emulator']}, index {body.index}"
        elif isinstance(body, L.CheckpointState):
            detail = C.CHECKPOINT_STATE_NAMES.get(body.control_id, str(body.control_id))
        self.report.records.append(RecordLine(event.offset, "libxl", event.type, body.NAME, event.length, detail))

    def _libxc_record(self, event: LibxcRecord) -> None:
        body = event.body
        self.report.record_counts[body.NAME] += 1
        if isinstance(body, R.PageData):
            self._page_data(event, body)
            return
        self._run = None
        note = self._NOTES.get(type(body))
        detail = note(self, body) if note else ""
        if isinstance(body, R.Checkpoint):
            self.report.checkpoints.append(event.offset)
        self.report.records.append(RecordLine(event.offset, "libxc", event.type, body.NAME, event.length, detail or ""))

    def _page_data(self, event: LibxcRecord, body: R.PageData) -> None:
        report = self.report
        report.page_data_records += 1
        pages = body.page_count
        report.data_pages += pages
        for page_type in set(body.types):
            report.pages_by_type[page_type] += body.types.count(page_type)
        low, high = min(body.pfns), max(body.pfns)
        report.pfn_min = low if report.pfn_min is None else min(report.pfn_min, low)
        report.pfn_max = high if report.pfn_max is None else max(report.pfn_max, high)
        run = self._run if self._collapse else None
        if run is None:
            run = self._run = PageRun(offset=event.offset)
            report.records.append(run)
        run.records += 1
        run.bytes += event.length
        run.entries += body.count
        run.pages += pages
        run.first_pfn = low if run.first_pfn is None else min(run.first_pfn, low)
        run.last_pfn = high if run.last_pfn is None else max(run.last_pfn, high)

    def _skipped(self, event: SkippedRecord) -> None:
        self._run = None
        self.report.skipped_optional.append({"type": event.type, "offset": event.offset, "length": event.length})
        self.report.records.append(RecordLine(event.offset, "libxc", event.type, f"OPTIONAL({event.type:#x})", event.length, "skipped"))

    def _end(self, event: EndOfStream) -> None:
        self.report.end = {"complete": event.complete, "offset": event.offset, "checkpoints": event.checkpoints}

    # per-record notes for the record list, which also fill the report
    def _pv_info(self, body: R.X86PvInfo) -> str:
        self.report.pv_info = {"guest_width": body.guest_width, "pt_levels": body.pt_levels}
        return f"guest width {body.guest_width}, {body.pt_levels} levels"

    def _p2m(self, body: R.X86PvP2mFrames) -> str:
        self.report.p2m.append({"start_pfn": body.start_pfn, "end_pfn": body.end_pfn, "frames": len(body.frames)})
        return f"pfns {body.start_pfn:#x}..{body.end_pfn:#x}, {len(body.frames)} frames"

    def _vcpu(self, body) -> str:
        kind = body.NAME.removeprefix("X86_PV_VCPU_")
        self.report.vcpus.setdefault(body.vcpu_id, {})[kind] = len(body.context)
        return f"vcpu {body.vcpu_id}"

    def _tsc(self, body: R.X86TscInfo) -> str:
        self.report.tsc = {"mode": body.mode, "khz": body.khz, "nsec": body.nsec, "incarnation": body.incarnation}
        return f"mode {body.mode}, {body.khz} kHz"

    def _hvm_context(self, body: R.HvmContext) -> str:
        entries = _hvm_context_entries(body.data)
        self.report.hvm_context = {"length": len(body.data), "entries": entries}
        return f"{entries['entries']} entries, {entries['cpus']} CPU"

    def _hvm_params(self, body: R.HvmParams) -> str:
        self.report.hvm_params.update(dict(body.params))
        return f"{len(body.params)} params"

    def _cpuid(self, body: R.X86CpuidPolicy) -> str:
        self.report.policies["cpuid_leaves"] = len(body.leaves)
        return f"{len(body.leaves)} leaves"

    def _msr(self, body: R.X86MsrPolicy) -> str:
        self.report.policies["msrs"] = len(body.entries)
        return f"{len(body.entries)} MSRs"

    _NOTES = {
        R.X86PvInfo: _pv_info,
        R.X86PvP2mFrames: _p2m,
        R.X86PvVcpuBasic: _vcpu,
        R.X86PvVcpuExtended: _vcpu,
        R.X86PvVcpuXsave: _vcpu,
        R.X86PvVcpuMsrs: _vcpu,
        R.X86TscInfo: _tsc,
        R.HvmContext: _hvm_context,
        R.HvmParams: _hvm_params,
        R.X86CpuidPolicy: _cpuid,
        R.X86MsrPolicy: _msr,
    }

    _HANDLERS = {
        Header: _header,
        LibxlRecord: _libxl_record,
        LibxcRecord: _libxc_record,
        SkippedRecord: _skipped,
        EndOfStream: _end,
    }


def inspect_fd(fd: int, head: bytes = b"", colo: bool = False, collapse: bool = True) -> V2Report:
    """Read a whole v2 stream from fd (``head``: its first bytes, already read) and summarise it."""
    reader = V2Reader(payload="passthrough", colo=colo)
    collector = _Collector(collapse)
    if head:
        reader.feed(head)
    try:
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                reader.feed(os.read(fd, READ_SIZE))
                continue
            collector.handle(event)
            if isinstance(event, EndOfStream):
                break
            while reader.payload_remaining:
                reader.take_payload()
                if reader.payload_remaining:
                    if reader.at_eof:
                        reader.next_event()  # raises TruncatedStream
                    reader.feed(os.read(fd, READ_SIZE))
        while not reader.at_eof:
            reader.feed(os.read(fd, READ_SIZE))
        collector.report.trailing_bytes = reader.trailing_bytes
    except StreamError as error:
        collector.report.error = error.message
        collector.report.error_offset = error.offset
    return collector.report


def inspect_events(events, collapse: bool = True) -> V2Report:
    collector = _Collector(collapse)
    for event in events:
        collector.handle(event)
    return collector.report
