"""What a v1 stream holds, summarised from its events: the data model behind `xenstream inspect` for v1.

`inspect_fd(fd, width=None, guest=None, xl=None, head=b"")` parses a whole stream (page data passed over, never
kept) and returns a `V1Report`; `V1Report.to_dict()` is the JSON form, `V1Report.lines()` the text form.
A stream error ends the report early: it keeps what was seen and records the error (`error`,
`error_offset`); `ok` is False then.
"""

from __future__ import annotations

import os
from collections import Counter

import attrs

from xenstream.hv.abi import pagetype_name
from xenstream.legacy import constants as c
from xenstream.legacy import events as ev
from xenstream.legacy.errors import StreamError
from xenstream.legacy.parser import DONE, NEED_DATA, LegacyParser

READ_SIZE = 1 << 20
_TYPE_BYTES = {name: nibble for nibble, name in ((n, pagetype_name(n)) for n in range(16))}


@attrs.define
class CheckpointSummary:
    index: int
    start_offset: int
    batches: int = 0
    page_entries: int = 0
    data_pages: int = 0
    compressed: bool = False
    compressed_bytes: int = 0
    last: bool = False
    end_offset: int | None = None
    tail_vcpus: list[int] = attrs.Factory(list)


@attrs.define
class V1Report:
    variant: dict = attrs.Factory(dict)
    evidence: list[dict] = attrs.Factory(list)
    wrapper: dict | None = None
    p2m_size: int | None = None
    p2m_frames: int | None = None
    extended_info: list[dict] = attrs.Factory(list)
    pages_by_type: Counter = attrs.Factory(Counter)
    chunks: Counter = attrs.Factory(Counter)
    checkpoints: list[CheckpointSummary] = attrs.Factory(list)
    vcpus: dict = attrs.Factory(dict)
    tsc: dict | None = None
    hvm_params: dict = attrs.Factory(dict)
    toolstack: dict | None = None
    tmem: dict = attrs.Factory(lambda: {"pools": 0, "pages": 0, "invalidations": 0})
    tail: dict = attrs.Factory(dict)
    end: dict | None = None
    trailing_bytes: int = 0
    go_message: bool = False
    error: str | None = None
    error_offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def checkpointed(self) -> str:
        """Whether the stream is a Remus one (spec 10.4): decided by the chunks or the checkpoint count."""
        if self.chunks["ENABLE_COMPRESSION"] or len(self.checkpoints) > 1:
            return "yes"
        if self.chunks["LAST_CHECKPOINT"]:
            return "no"
        return "unknown"

    def to_dict(self) -> dict:
        data = attrs.asdict(self, recurse=True)
        data["pages_by_type"] = dict(sorted(self.pages_by_type.items(), key=lambda item: _TYPE_BYTES[item[0]]))
        data["chunks"] = dict(sorted(self.chunks.items()))
        data["ok"] = self.ok
        data["checkpointed"] = self.checkpointed
        return {"format": "v1", **data}

    def lines(self) -> list[str]:
        out = []
        variant = self.variant
        if variant:
            guest = variant["guest"].upper()
            if variant.get("guest_width"):
                guest += f" {variant['guest_width'] * 8}-bit guest, {variant['pt_levels']}-level paging"
            out.append(
                f"legacy v1 stream: {guest}, {variant['width']}-bit toolstack, wrapper {variant['wrapper']}"
            )
            out.extend(f"  {e['what']}: {e['value']} ({e['source']}: {e['reason']})" for e in self.evidence)
        if self.wrapper:
            out.append("wrapper: " + ", ".join(f"{k} {v}" for k, v in self.wrapper.items()))
        if self.p2m_size is not None:
            frames = f", {self.p2m_frames} p2m frames" if self.p2m_frames is not None else ""
            out.append(f"p2m_size {self.p2m_size:#x}{frames}")
        if self.extended_info:
            out.append("extended info: " + ", ".join(f"{b['id']} ({b['size']} bytes)" for b in self.extended_info))
        if self.pages_by_type:
            out.append("page entries by type: " + ", ".join(f"{k} {v}" for k, v in self.to_dict()["pages_by_type"].items()))
        if self.chunks:
            out.append("chunks: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.chunks.items())))
        if self.checkpoints:
            out.append(f"checkpointed: {self.checkpointed}" + (
                " (one checkpoint, no LAST_CHECKPOINT: a Remus stream cut short, or a Xen 4.0 saver)"
                if self.checkpointed == "unknown" else ""))
        for cp in self.checkpoints:
            state = "complete" if cp.end_offset is not None else "incomplete"
            form = ", compressed" if cp.compressed else ""
            last = ", LAST_CHECKPOINT" if cp.last else ""
            out.append(
                f"checkpoint {cp.index} @{cp.start_offset:#x}: {cp.batches} batches, {cp.page_entries} entries, "
                f"{cp.data_pages} data pages{form}{last}, {state}"
                + (f", tail vcpus {cp.tail_vcpus}" if cp.tail_vcpus else "")
            )
        if self.vcpus:
            out.append(f"vcpus: max id {self.vcpus['max_vcpu_id']}, online {self.vcpus['online']}")
        if self.tsc:
            out.append("tsc: " + ", ".join(f"{k} {v}" for k, v in self.tsc.items()))
        if self.hvm_params:
            out.append("hvm params: " + ", ".join(f"{k} {v:#x}" for k, v in self.hvm_params.items()))
        if self.toolstack:
            out.append(f"toolstack: {self.toolstack}")
        if any(self.tmem.values()):
            out.append("tmem: " + ", ".join(f"{k} {v}" for k, v in self.tmem.items()))
        if self.tail:
            out.append("last tail: " + ", ".join(f"{k} {v}" for k, v in self.tail.items()))
        if self.end:
            out.append("end: " + ", ".join(f"{k} {v}" for k, v in self.end.items()))
        if self.go_message or self.trailing_bytes:
            out.append(f"after the end: go message {self.go_message}, {self.trailing_bytes} trailing bytes")
        if self.error:
            out.append(f"ERROR at offset {self.error_offset:#x}: {self.error}")
        return out


class _Collector:
    """Folds events into a V1Report; one handler per event type."""

    def __init__(self) -> None:
        self.report = V1Report()
        self._checkpoint: CheckpointSummary | None = None
        self._handlers = {
            ev.Detected: self._detected,
            ev.XlHeader: self._xl_header,
            ev.XendHeader: lambda e: self._wrapper("xend", config_bytes=len(e.config)),
            ev.LibvirtHeader: lambda e: self._wrapper("libvirt", version=e.version, xml_bytes=len(e.xml)),
            ev.XenopsHeader: lambda e: self._wrapper("xenops"),
            ev.P2mSize: self._p2m_size,
            ev.ExtendedInfo: self._extended_info,
            ev.P2mFrames: self._p2m_frames,
            ev.PageBatch: self._page_batch,
            ev.CompressedData: self._compressed_data,
            ev.EnableVerifyMode: self._chunk("ENABLE_VERIFY_MODE"),
            ev.VcpuInfo: self._vcpu_info,
            ev.HvmParam: self._hvm_param,
            ev.TscInfo: self._tsc_info,
            ev.LastCheckpoint: self._last_checkpoint,
            ev.EnableCompression: self._chunk("ENABLE_COMPRESSION"),
            ev.Toolstack: self._toolstack,
            ev.TmemHeader: self._chunk("TMEM"),
            ev.TmemPool: lambda e: self._tmem("pools"),
            ev.TmemPage: lambda e: self._tmem("pages"),
            ev.TmemExtraStart: self._chunk("TMEM_EXTRA"),
            ev.TmemInvalidation: lambda e: self._tmem("invalidations"),
            ev.EndOfBody: lambda e: self._current(e.offset),
            ev.UnmappedPfns: self._unmapped,
            ev.VcpuBasic: self._vcpu_record("basic"),
            ev.VcpuExtended: self._vcpu_record("extended"),
            ev.VcpuXsave: self._vcpu_record("xsave"),
            ev.SharedInfo: lambda e: self.report.tail.__setitem__("shared_info_bytes", len(e.data)),
            ev.HvmMagicPfns: self._hvm_magic,
            ev.HvmContext: lambda e: self.report.tail.__setitem__("hvm_context_bytes", len(e.data)),
            ev.DeviceModelRecord0002: self._device_model,
            ev.RemusDeviceModelState: self._device_model,
            ev.QemuDeviceModelRecord: self._device_model,
            ev.XenopsQemuRecord: self._device_model,
            ev.DeviceModelEnd: lambda e: self.report.tail.__setitem__("device_model_bytes", e.length),
            ev.CheckpointEnd: self._checkpoint_end,
            ev.EndOfStream: self._end_of_stream,
            ev.XlGoMessage: lambda e: setattr(self.report, "go_message", True),
            ev.TrailingData: self._trailing,
        }

    def handle(self, event: ev.Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _current(self, offset: int) -> CheckpointSummary:
        if self._checkpoint is None:
            self._checkpoint = CheckpointSummary(len(self.report.checkpoints) + 1, offset)
            self.report.checkpoints.append(self._checkpoint)
        return self._checkpoint

    def _chunk(self, name: str):
        def count(event) -> None:
            self._current(event.offset)
            self.report.chunks[name] += 1

        return count

    def _detected(self, event: ev.Detected) -> None:
        self.report.variant = {
            "wrapper": event.wrapper, "width": event.width, "guest": event.guest,
            "guest_width": event.guest_width, "pt_levels": event.pt_levels,
        }
        self.report.evidence = [attrs.asdict(e) for e in event.evidence]

    def _wrapper(self, kind: str, **details) -> None:
        self.report.wrapper = {"kind": kind, **details}

    def _xl_header(self, event: ev.XlHeader) -> None:
        config = event.config
        self._wrapper(
            "xl", mandatory_flags=event.mandatory_flags, config_bytes=None if config is None else len(config),
            config_json=event.config_is_json,
        )

    def _p2m_size(self, event: ev.P2mSize) -> None:
        self.report.p2m_size = event.p2m_size

    def _extended_info(self, event: ev.ExtendedInfo) -> None:
        self.report.extended_info = [
            {"id": block.block_id.decode("latin-1"), "size": len(block.data)} for block in event.blocks
        ]

    def _p2m_frames(self, event: ev.P2mFrames) -> None:
        self.report.p2m_frames = len(event.frames)

    def _page_batch(self, event: ev.PageBatch) -> None:
        checkpoint = self._current(event.offset)
        checkpoint.batches += 1
        checkpoint.page_entries += event.count
        checkpoint.data_pages += event.data_pages
        checkpoint.compressed = checkpoint.compressed or event.compressed
        self.report.pages_by_type.update(pagetype_name(entry >> c.TYPE_SHIFT) for entry in event.entries)

    def _compressed_data(self, event: ev.CompressedData) -> None:
        self._chunk("COMPRESSED_DATA")(event)
        self._checkpoint.compressed_bytes += len(event.data)

    def _vcpu_info(self, event: ev.VcpuInfo) -> None:
        self._chunk("VCPU_INFO")(event)
        self.report.vcpus = {"max_vcpu_id": event.max_vcpu_id, "online": list(event.online)}

    def _hvm_param(self, event: ev.HvmParam) -> None:
        self._chunk(event.name)(event)
        self.report.hvm_params[event.name] = event.value

    def _tsc_info(self, event: ev.TscInfo) -> None:
        self._chunk("TSC_INFO")(event)
        self.report.tsc = attrs.asdict(event)
        del self.report.tsc["offset"]

    def _last_checkpoint(self, event: ev.LastCheckpoint) -> None:
        self._chunk("LAST_CHECKPOINT")(event)
        self._checkpoint.last = True

    def _toolstack(self, event: ev.Toolstack) -> None:
        self._chunk("TOOLSTACK")(event)
        summary = {"bytes": len(event.data), "libxl": event.libxl is not None}
        if event.libxl is not None:
            summary["layout_width"] = event.libxl.width
            summary["physmap"] = [
                {
                    "phys_offset": hex(entry.phys_offset), "start_addr": hex(entry.start_addr),
                    "size": hex(entry.size),
                    "name": None if entry.name is None else entry.name.rstrip(b"\0").decode("latin-1"),
                }
                for entry in event.libxl.entries
            ]
        self.report.toolstack = summary

    def _tmem(self, what: str) -> None:
        self.report.tmem[what] += 1

    def _unmapped(self, event: ev.UnmappedPfns) -> None:
        self.report.tail = {"unmapped_pfns": len(event.pfns), "vcpu_records": {}}

    def _vcpu_record(self, part: str):
        def record(event) -> None:
            self.report.tail["vcpu_records"].setdefault(event.vcpu_id, {})[part] = len(event.data)
            if part == "basic":
                self._checkpoint.tail_vcpus.append(event.vcpu_id)

        return record

    def _hvm_magic(self, event: ev.HvmMagicPfns) -> None:
        self.report.tail = {
            "ioreq_pfn": hex(event.ioreq_pfn), "bufioreq_pfn": hex(event.bufioreq_pfn),
            "store_pfn": hex(event.store_pfn),
        }

    def _device_model(self, event: ev.DeviceModelRecord) -> None:
        self.report.tail["device_model"] = type(event).__name__

    def _checkpoint_end(self, event: ev.CheckpointEnd) -> None:
        self._current(event.offset).end_offset = event.offset
        self._checkpoint = None

    def _end_of_stream(self, event: ev.EndOfStream) -> None:
        self.report.end = {
            "reason": event.reason, "complete_checkpoints": event.checkpoints,
            "last_checkpoint_complete": event.last_checkpoint_complete, "offset": event.offset,
        }
        if event.discarded_offset is not None:
            self.report.end["discarded_offset"] = event.discarded_offset

    def _trailing(self, event: ev.TrailingData) -> None:
        self.report.trailing_bytes += len(event.data)


def inspect_fd(
    fd: int, width: int | None = None, guest: str | None = None, xl: bool | None = None, head: bytes = b""
) -> V1Report:
    """Read a whole v1 stream from fd and summarise it; page data is read past, not kept.

    ``head``: the stream's first bytes when the caller already read them from fd.
    """
    parser = LegacyParser(width, guest, xl, passthrough=True)
    if head:
        parser.feed(head)
    collector = _Collector()
    try:
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                parser.feed(os.read(fd, READ_SIZE))
            elif event is DONE:
                break
            else:
                collector.handle(event)
    except StreamError as error:
        collector.report.error = error.message
        collector.report.error_offset = error.offset
    return collector.report


def inspect_events(events) -> V1Report:
    collector = _Collector()
    for event in events:
        collector.handle(event)
    return collector.report
