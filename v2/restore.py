"""The native v2 restore engine for PV guests (spec save-restore-engines 5.1-5.9, 5.11).

Sans-IO like the reader underneath it: the driver feeds bytes, the engine applies records as they
complete, and `finish()` (after the input ended) runs the stream completion of spec 5.8::

    restorer = PvRestorer(hv, domid, store_evtchn=1, console_evtchn=2)
    for chunk in chunks:
        restorer.feed(chunk)
    result = restorer.finish()

or, reading an fd itself (PAGE_DATA payloads then go from the fd straight into the guest's frames
with readv; only pagetables pass through a scratch page to be localised)::

    result = PvRestorer(hv, domid, payload="passthrough").run_fd(fd)

The domain must exist (spec 5.1: created by the toolstack, PV, no memory yet, enough vcpus and
max_pages). `restore_new_domain` is that toolstack step around the engine: it creates the domain and
destroys it again if anything fails, so a half-built domain is never left behind.

Every inconsistency of spec 5.11 raises a v2 `StreamError` (`MalformedStream`, `UnsupportedStream`,
`TruncatedStream`) carrying the offset of the record at fault (for a bad page, of its PAGE_DATA record);
hypervisor refusals during completion are reported the same way at the offset of END. Beyond Xen, as
spec 10.3 recommends: PAGE_DATA before X86_PV_P2M_FRAMES, a PTE naming a pfn above max_pfn, and an
X86_PV_P2M_FRAMES end pfn beyond what the domain can hold are errors too.
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
import struct
import sys
from array import array
from collections.abc import Callable, Iterable
from typing import Protocol

import attrs

from xenstream.hv import abi, kernels
from xenstream.hv.interface import CpuPolicy, Hypervisor, HypervisorError, TscInfo, VcpuContext, XsaveState
from xenstream.hv.lazylog import get_logger
from xenstream.hv.pagetables import P2MView, TranslationError, TranslationTables
from xenstream.hv.u64runs import consecutive, is_consecutive
from xenstream.v2 import constants as C
from xenstream.v2 import positional_fill
from xenstream.v2.errors import MalformedStream, TruncatedStream, UnsupportedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, Header, LibxcRecord, LibxlRecord, PagePayload, SkippedRecord
from xenstream.v2.reader import V2Reader
from xenstream.v2.records import DomainHeader, ImageHeader, libxc_record_name

log = get_logger(__name__)

INVALID = abi.INVALID_MFN
_NEEDS_RAM = frozenset({t for t in abi.KNOWN_PAGETYPES if abi.pagetype_has_data(t)} | {abi.PAGETYPE_XALLOC})
# L1..L4 with the pin bit (XTAB, BROKEN, XALLOC share that bit but have no table level).
_PINNED_TYPE = re.compile(rb"[\x09-\x0c]")
_MARKED = re.compile(rb"\x01+")
_TABLE_TYPES = frozenset(t for t in range(16) if abi.pagetable_level(t))
_TABLE_TYPE = re.compile(b"[" + b"".join(re.escape(bytes([t])) for t in sorted(_TABLE_TYPES)) + b"]")
_DATALESS_TYPE = re.compile(b"[" + b"".join(re.escape(bytes([t])) for t in sorted(abi.PAGETYPES_WITHOUT_DATA)) + b"]")
# Holes a P2M may have above the domain's memory limit: bounds the tables X86_PV_P2M_FRAMES sizes.
P2M_HOLE_ALLOWANCE = 1 << 18
_GRANT_ENTRY = struct.Struct("<HHI")
_VALID_PV_INFO = {(abi.WIDTH_32, 3), (abi.WIDTH_64, 4)}
_INVALID_EXTENT = array("Q", [INVALID]) * abi.SUPERPAGE_FRAMES
_TOP_BYTE = 7 if sys.byteorder == "little" else 0  # of a u64 in memory
_DENSE_MISSING = 16  # forward references naming at least 1/16 of all pfns are marked in an all-pfn window


@attrs.frozen
class RestoreResult:
    domid: int
    width: int
    levels: int
    max_pfn: int
    store_mfn: int
    console_mfn: int
    start_info_pfn: int
    p2m: array  # the new pfn -> mfn table (u64, INVALID where unpopulated)
    p2m_pfns: tuple[int, ...]
    pages_written: int
    pages_populated: int
    verify_mismatches: int  # pages after a VERIFY record that differed from what had been restored


@attrs.frozen
class _Pending:
    """The data pages of a PAGE_DATA record awaiting their payload, and the guest frames they go to."""

    pfns: tuple | list
    types: bytes
    runs: list  # MappedRun over indices into pfns
    starts: list[int]  # each run's first index, for bisect
    span: tuple[int, int] = (0, 0)  # lowest and highest pfn


_NO_PENDING = _Pending((), b"", [], [])


@attrs.define
class _PayloadSink:
    """Passthrough mode: where the rest of the pending PAGE_DATA payload goes, as `_targets` gave it, and
    how far it has been filled (segments[index] at byte `within` is next)."""

    segments: list
    scratch: list
    first: int
    count: int
    index: int = 0
    within: int = 0


@attrs.define
class _VcpuState:
    basic: bytes | None = None
    extended: bytes | None = None
    xsave: bytes | None = None
    msrs: bytes | None = None


class _Fail(Exception):
    """Internal: an inconsistency found while applying one record; re-raised with the record's offset."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _Fail(message)


def _p2m_as_u32(p2m: array) -> array:
    """A 32-bit guest's P2M entries: INVALID as INVALID_MFN_32, others as they are (each < 2**32). By
    byte columns (little-endian): an entry's high half must be 0, or all ones with the low half too."""
    if sys.byteorder != "little":
        return array("I", (abi.INVALID_MFN_32 if m == INVALID else m for m in p2m))
    raw = memoryview(p2m).cast("B")
    low, high = bytearray(4 * len(p2m)), bytearray(4 * len(p2m))
    for b in range(4):
        low[b::4] = raw[b::8]
        high[b::4] = raw[4 + b::8]
    highs = array("I", high)
    all_ones = highs.count(0xFFFFFFFF)
    if highs.count(0) + all_ones != len(p2m) or all_ones != p2m.count(INVALID):
        raise _Fail("a P2M entry of the 32-bit guest is beyond 32 bits")
    return array("I", low)


def _has_invalid(p2m: array, low: int, high: int) -> bool:
    """Whether p2m[low:high] holds INVALID, by its entries' top bytes at C speed (array.count makes an int
    per entry): only INVALID has 0xff there, every mfn being below 2**52 (x86 physical addresses)."""
    return b"\xff" in memoryview(p2m)[low:high].cast("B")[_TOP_BYTE::8].tobytes()


class EngineRestorer:
    """What the PV and HVM restorers share: the domain and its rings' event channels, the stream reader,
    the driving (feed / run_fd), hypervisor calls that fail as stream errors at the record being applied,
    and the per-stream state every engine keeps. `expect_hvm` is the domain kind the engine restores."""

    expect_hvm = False

    def __init__(self, hv: Hypervisor, domid: int, *, store_evtchn: int = 0, console_evtchn: int = 0,
                 store_domid: int = 0, console_domid: int = 0, strict: bool = False, payload: str = "views") -> None:
        self.hv = hv
        self.domid = domid
        self.store_evtchn = store_evtchn
        self.console_evtchn = console_evtchn
        self.store_domid = store_domid
        self.console_domid = console_domid
        self._reader = V2Reader(layer="auto", payload=payload, strict=strict)
        self._passthrough = payload == "passthrough"
        self._offset = 0
        self._ended = False
        self._version = 0
        self._static_data_end = False
        self._verify = False
        self._positional: positional_fill.PositionalFill | None = None  # payload readers while run_fd reads a file
        self._page_record_offset = 0
        self.pages_written = 0
        self.pages_populated = 0
        self.verify_mismatches = 0
        self._info = self._call("get domain info", hv.get_domain_info, domid)
        if self._info.is_hvm != self.expect_hvm:
            kind, wanted = ("HVM", "PV") if self._info.is_hvm else ("PV", "HVM")
            raise UnsupportedStream(f"domain {domid} is {kind}; this engine restores {wanted} streams", 0)

    def feed(self, data) -> None:
        """Feed stream bytes (b"" = end of input) and apply every record they complete (in passthrough
        mode payload bytes fed here are copied into the guest's frames as they come)."""
        self._reader.feed(data)
        self._drain()

    def run_fd(self, fd: int, initial: bytes = b""):
        """Read the whole stream from `fd` (after `initial`, bytes already read from it) and finish.

        Passthrough mode: PAGE_DATA payloads go from the fd straight into the guest's frames (by worker
        threads for a regular file, see positional_fill), the rest through the reader."""
        positional_fill.run_fd(self, fd, initial)
        return self.finish()

    def _call(self, what: str, call, *args):
        try:
            return call(*args)
        except HypervisorError as exc:
            raise MalformedStream(f"{what} refused by the hypervisor: {exc}", self._offset) from exc

    def _infer_static_data_end(self) -> None:
        if self._version == 2 and not self._static_data_end:
            self._static_data_end = True
            log.info("v2 stream: STATIC_DATA_END inferred; CPUID and MSR policy missing")


class PvRestorer(EngineRestorer):
    def __init__(self, hv: Hypervisor, domid: int, **options) -> None:
        super().__init__(hv, domid, **options)
        self._done: RestoreResult | None = None
        info = self._info
        self._width = abi.WIDTH_FOR_ADDRESS_BITS[self._call("get address size", hv.get_address_size, domid)]
        self._levels = abi.LEVELS_FOR_WIDTH[self._width]
        self._max_mfn = hv.get_max_mfn()
        self._m2p = hv.m2p_view()

        self._pv_info = False
        self._max_pfn = -1  # no X86_PV_P2M_FRAMES yet
        self._p2m = array("Q")
        self._types = bytearray()
        self._p2m_pfns: list[int] = []
        self._policy_cpuid = b""
        self._policy_msrs = b""
        self._vcpus = [_VcpuState() for _ in range(info.max_vcpu_id + 1)]
        self._tables: TranslationTables | None = None
        # The data pages of the current PAGE_DATA awaiting their payload: parallel pfns, types, guest frames.
        self._pending = _NO_PENDING
        self._pending_next = 0
        self._scratch: memoryview | None = None
        self._sink: _PayloadSink | None = None

    # ------------------------------------------------------------------ driving

    @property
    def payload_remaining(self) -> int:
        """Passthrough mode: payload bytes of the pending PAGE_DATA record not received yet."""
        return self._reader.payload_remaining

    def feed_payload(self, data) -> None:
        """Passthrough mode: the next bytes of the pending PAGE_DATA payload (at most `payload_remaining`),
        copied straight into the guest's frames, without passing through the stream reader's buffer."""
        view = memoryview(data).cast("B")
        reader = self._reader
        if view.nbytes > reader.payload_remaining:
            raise ValueError(f"feed_payload() of {view.nbytes} bytes with {reader.payload_remaining} pending")
        if not view.nbytes:
            return
        self._sink_copy(view)
        reader.payload_consumed(view.nbytes)
        if not reader.payload_remaining:
            self._sink_complete()
            self._drain()

    def _submit_payload(self, fill: positional_fill.PositionalFill, position: int) -> int:
        """run_positional: the rest of the pending payload, at `position` of the file, to the fill's workers."""
        reader, sink = self._reader, self._payload_sink()
        remaining = reader.payload_remaining
        fill.submit([sink.segments[sink.index][sink.within:], *sink.segments[sink.index + 1:]], position,
                    self._page_record_offset, self._pending.span)
        reader.payload_consumed(remaining)
        if sink.scratch:
            fill.wait()  # pagetables are localised from the scratch pages
        self._sink_complete()
        return remaining

    def payload_targets(self, limit: int = C.IOV_MAX) -> list[memoryview]:
        """Passthrough mode, driven by feed(): up to `limit` writable buffers (guest frames, scratch pages for
        pagetables) where the next payload bytes of the pending PAGE_DATA record go, in order, for the
        driver to read into (then `payload_filled`); [] when no payload is pending."""
        reader = self._reader
        if not self._passthrough or not reader.payload_remaining or reader.buffered:
            return []
        sink = self._payload_sink()
        segments, index = sink.segments, sink.index
        return [segments[index][sink.within:], *segments[index + 1:index + limit]]

    def payload_filled(self, n: int) -> None:
        """Passthrough mode: the driver put the next `n` payload bytes into the buffers `payload_targets` gave."""
        reader = self._reader
        if n > reader.payload_remaining or self._sink is None:
            raise ValueError(f"payload_filled({n}) with {reader.payload_remaining} payload bytes pending")
        sink = self._sink
        sink.index, sink.within = positional_fill.advance_cursor(sink.segments, sink.index, sink.within, n)
        reader.payload_consumed(n)
        if not reader.payload_remaining:
            self._sink_complete()
            self._drain()

    def _drain(self) -> bool:
        """Apply every event available; True once the stream has ended."""
        reader = self._reader
        while not self._ended:
            if self._passthrough and reader.payload_remaining:
                if not reader.buffered:
                    return False
                if self._positional is not None:  # this thread writes these pages: no earlier copy may follow
                    self._positional.wait_for(self._pending.span)
                self._sink_copy(reader.take_payload())
                if not reader.payload_remaining:
                    self._sink_complete()
                continue
            event = reader.next_event()
            if event is NEED_DATA:
                return False
            if self._positional is not None and not positional_fill.is_page_data(event):
                self._positional.wait()  # what follows may read or rewrite guest memory the workers fill
            self._offset = event.offset
            _EVENTS[type(event)](self, event)
        return True

    def _event_record(self, event: LibxcRecord) -> None:
        self._apply(event)

    def _event_header(self, event: Header) -> None:
        self._header(event.header)

    def _event_end(self, event: EndOfStream) -> None:
        if not event.complete:
            raise TruncatedStream("stream ended without an END record", event.offset)
        self._ended = True

    def _event_skipped(self, event: SkippedRecord) -> None:
        pass

    def finish(self) -> RestoreResult:
        """After the input ended: the stream must have had its END; returns what was restored."""
        if self._done is None:
            self.feed(b"")
        if self._done is None:
            raise TruncatedStream("stream ended without an END record", self._reader.offset)
        self.close()
        return self._done

    def close(self) -> None:
        """Drop the translation tables and guest mappings now (their native views pin buffers)."""
        self._tables = None
        self._pending = _NO_PENDING
        self._sink = None

    def _apply(self, event: LibxcRecord) -> None:
        if self._done is not None:
            raise MalformedStream(f"record type {event.type:#x} after END", event.offset)
        handler = _HANDLERS.get(event.type)
        if handler is None:
            raise MalformedStream(f"{_name(event.type)} record is not valid in a PV stream", event.offset)
        try:
            handler(self, event.body)
        except _Fail as exc:
            raise MalformedStream(f"{_name(event.type)}: {exc}", event.offset) from None

    def _header(self, header) -> None:
        if isinstance(header, ImageHeader):
            self._version = header.version
        elif isinstance(header, DomainHeader):
            if header.guest_type != C.DOMAIN_TYPE_X86_PV:
                raise UnsupportedStream(
                    f"stream is {C.DOMAIN_TYPE_NAMES.get(header.guest_type)}, domain {self.domid} is PV", self._offset)

    # ------------------------------------------------------------------ static records

    def _pv_info_record(self, body) -> None:
        _require(not self._pv_info, "X86_PV_INFO already received")
        pair = (body.guest_width, body.pt_levels)
        _require(pair in _VALID_PV_INFO, f"invalid guest width/levels {pair}, expected (4, 3) or (8, 4)")
        if body.guest_width != self._width:
            self._call("set address size", self.hv.set_address_size, self.domid,
                       abi.ADDRESS_BITS_FOR_WIDTH[body.guest_width])
            width = abi.WIDTH_FOR_ADDRESS_BITS[self._call("get address size", self.hv.get_address_size, self.domid)]
            _require(width == body.guest_width, f"domain width {width} does not match the stream's {body.guest_width}")
            self._width, self._levels = width, abi.LEVELS_FOR_WIDTH[width]
        _require(self._levels == body.pt_levels, f"domain has {self._levels} levels, stream {body.pt_levels}")
        self._pv_info = True

    def _static_data_end_record(self, body) -> None:
        _require(not self._static_data_end, "STATIC_DATA_END already received")
        self._static_data_end = True
        if self._policy_cpuid or self._policy_msrs:
            self._call("set CPU policy", self.hv.set_cpu_policy, self.domid,
                       CpuPolicy(self._policy_cpuid, self._policy_msrs))
        missing = [name for name, blob in (("CPUID", self._policy_cpuid), ("MSR", self._policy_msrs)) if not blob]
        if missing:
            log.info("CPU policy missing from the stream", missing=missing)

    def _cpuid_policy(self, body) -> None:
        if self._static_data_end:
            log.warning("X86_CPUID_POLICY after STATIC_DATA_END is never applied", offset=self._offset)
        self._policy_cpuid = body.pack()

    def _msr_policy(self, body) -> None:
        if self._static_data_end:
            log.warning("X86_MSR_POLICY after STATIC_DATA_END is never applied", offset=self._offset)
        self._policy_msrs = body.pack()

    def _p2m_frames(self, body) -> None:
        self._infer_static_data_end()
        _require(self._static_data_end, "received before STATIC_DATA_END")
        _require(self._pv_info, "received before X86_PV_INFO")
        start, end = body.start_pfn, body.end_pfn
        _require(start <= end, f"start pfn {start:#x} > end pfn {end:#x}")
        fpp = abi.frames_per_page(self._width)
        expected = end // fpp - start // fpp + 1
        _require(len(body.frames) == expected,
                 f"{len(body.frames)} frames for pfns {start:#x}-{end:#x}, expected {expected}")
        limit = self._info.max_pages + P2M_HOLE_ALLOWANCE
        _require(end < limit, f"end pfn {end:#x} is beyond what domain {self.domid} can hold "
                              f"({self._info.max_pages} pages and {P2M_HOLE_ALLOWANCE} pfns of holes)")
        if end > self._max_pfn:
            self._expand(end)
        first = start // fpp
        self._p2m_pfns[first:first + expected] = list(body.frames)

    def _expand(self, max_pfn: int) -> None:
        self._tables = None  # its P2M view pins the array's buffer
        grow = max_pfn - self._max_pfn
        self._p2m.extend(array("Q", [INVALID]) * grow)
        self._types.extend(bytes(grow))
        frames = max_pfn // abi.frames_per_page(self._width) + 1
        self._p2m_pfns.extend([INVALID] * (frames - len(self._p2m_pfns)))
        self._max_pfn = max_pfn

    # ------------------------------------------------------------------ memory

    def _page_data(self, body) -> None:
        _require(not self._pending_remaining(), "previous PAGE_DATA payload incomplete")
        self._page_record_offset = self._offset
        self._infer_static_data_end()
        _require(self._static_data_end, "received before STATIC_DATA_END")
        _require(self._max_pfn >= 0, "received before X86_PV_P2M_FRAMES")
        pfns, types = body.pfns, bytes(body.types)  # (no copy of the reader's bytes)
        first = pfns[0]
        contiguous = is_consecutive(pfns if isinstance(pfns, array) and pfns.typecode == "Q" else array("Q", pfns), first)
        top = pfns[-1] if contiguous else max(pfns)
        _require(top <= self._max_pfn, f"pfn {top:#x} out of range (max_pfn {self._max_pfn:#x})")
        plain = not _DATALESS_TYPE.search(types)
        if contiguous and plain:  # the common case: one ascending run of pages that all carry data
            self._populate_run(first, len(pfns))
            self._types[first:first + len(pfns)] = types
            data_pfns, data_types = pfns, types
            mfns = self._p2m[first:first + len(pfns)]  # an array slice: the mapping takes it as it is
        else:
            self._populate([p for p, t in zip(pfns, types) if t in _NEEDS_RAM])
            for pfn, page_type in zip(pfns, types):
                self._types[pfn] = page_type
            data = [(p, t) for p, t in zip(pfns, types) if abi.pagetype_has_data(t)]
            data_pfns, data_types = [p for p, _ in data], bytes(t for _, t in data)
            mfns = [self._p2m[p] for p in data_pfns]
        self._pending = _NO_PENDING
        self._pending_next = 0
        if not data_pfns:
            return
        runs = self._call("map page batch", self.hv.map_foreign_runs, self.domid, mfns, True)
        if sum(run.count for run in runs) != len(mfns):
            covered = {k for run in runs for k in range(run.first, run.first + run.count)}
            bad = next(k for k in range(len(mfns)) if k not in covered)
            raise _Fail(f"cannot map pfn {data_pfns[bad]:#x} (mfn {mfns[bad]:#x}) writable")
        span = (first, top) if contiguous else (min(data_pfns), max(data_pfns))
        self._pending = _Pending(data_pfns, data_types, runs, [run.first for run in runs], span)

    def _pending_remaining(self) -> int:
        return len(self._pending.pfns) - self._pending_next

    def _frame(self, k: int) -> memoryview:
        """The guest frame of pending data page k."""
        pending = self._pending
        run = pending.runs[bisect.bisect_right(pending.starts, k) - 1]
        offset = k - run.first
        return run.view[offset << 12:(offset + 1) << 12]

    def _page_payload(self, event: PagePayload) -> None:
        """Views mode: whole pages of the pending PAGE_DATA payload, in the reader's buffer."""
        count = event.page_count
        first = self._pending_next
        segments, scratch = self._targets(first, count)
        data = event.data
        position = 0
        for segment in segments:
            segment[:] = data[position:position + len(segment)]
            position += len(segment)
        self._store(first, count, scratch)

    def _payload_sink(self) -> _PayloadSink:
        if self._sink is None:
            first = self._pending_next
            count = self._pending_remaining()
            segments, scratch = self._targets(first, count)
            self._sink = _PayloadSink(segments, scratch, first, count)
        return self._sink

    def _sink_copy(self, piece: memoryview) -> None:
        """Passthrough mode: payload bytes into the pending record's targets, in order."""
        sink = self._payload_sink()
        sink.index, sink.within = scatter_copy(piece, sink.segments, sink.index, sink.within)

    def _sink_complete(self) -> None:
        sink, self._sink = self._sink, None
        self._store(sink.first, sink.count, sink.scratch)

    def _receive_payload(self, fd: int) -> None:
        """Passthrough mode: the rest of the pending PAGE_DATA payload from the fd, read straight into its targets
        (what the reader had buffered of it is already there, see `_drain`)."""
        reader = self._reader
        sink = self._payload_sink()
        segments, index, within = sink.segments, sink.index, sink.within
        moved = 0
        while index < len(segments):
            vector = [segments[index][within:], *segments[index + 1:index + C.IOV_MAX]]
            n = os.readv(fd, vector)
            if not n:
                reader.payload_consumed(moved)
                missing = sum(len(v) for v in vector) + sum(len(v) for v in segments[index + C.IOV_MAX:])
                raise TruncatedStream(f"truncated PAGE_DATA payload: {missing} bytes missing",
                                      self._page_record_offset)
            moved += n
            index, within = positional_fill.advance_cursor(segments, index, within, n)
        reader.payload_consumed(moved)
        self._sink_complete()

    def _targets(self, first: int, count: int) -> tuple[list, list[tuple[int, int, int, int]]]:
        """Where pending pages first..first+count-1 are received, as buffers in payload order: runs of the
        guest's frames for plain pages, scratch pages for pagetables (localised before they go in) and
        for every page in verify mode. Returns (segments, scratch) with scratch entries (index in the
        pending batch, pfn, level, scratch slot)."""
        pending, end = self._pending, first + count
        types = pending.types
        if self._verify:
            chosen = list(range(first, end))
        elif not _TABLE_TYPE.search(types, first, end):
            chosen = []
        else:
            chosen = [match.start() for match in _TABLE_TYPE.finditer(types, first, end)]
        buffer = memoryview(bytearray(len(chosen) << 12))
        self._scratch = buffer
        scratch_slot = {k: n for n, k in enumerate(chosen)}
        entries = [(k, pending.pfns[k], types[k] & 0x7 if types[k] in _TABLE_TYPES else 0, n)
                   for k, n in scratch_slot.items()]
        segments = []
        for run in pending.runs[max(bisect.bisect_right(pending.starts, first) - 1, 0):]:
            a, b = max(run.first, first), min(run.first + run.count, end)
            if a >= end:
                break
            if a >= b:
                continue
            start = a  # first page of the run not yet in a segment
            for k in chosen[bisect.bisect_left(chosen, a):bisect.bisect_left(chosen, b)]:
                if k > start:
                    segments.append(run.view[(start - run.first) << 12:(k - run.first) << 12])
                n = scratch_slot[k]
                segments.append(buffer[n << 12:(n + 1) << 12])
                start = k + 1
            if start < b:
                segments.append(run.view[(start - run.first) << 12:(b - run.first) << 12])
        return segments, entries

    def _store(self, first: int, count: int, scratch: list[tuple[int, int, int, int]]) -> None:
        """Localise the scratch pagetables and move scratch pages into the guest (compare them in verify mode).

        Errors carry the offset of the PAGE_DATA record the pages belong to.
        """
        offset = self._page_record_offset
        buffer = self._scratch
        tables = [(n, pfn, level) for _, pfn, level, n in scratch if level]
        try:
            if tables:
                self._localise(buffer, tables)
        except _Fail as exc:
            raise MalformedStream(f"PAGE_DATA: {exc}", offset) from None
        for k, pfn, _, n in scratch:
            page, frame = buffer[n << 12:(n + 1) << 12], self._frame(k)
            if not self._verify:
                frame[:] = page
            elif page != frame:
                self.verify_mismatches += 1
                log.warning("verify: page differs", pfn=f"{pfn:#x}", offset=offset)
        if not self._verify:
            self.pages_written += count
        self._scratch = None
        self._pending_next = first + count
        if self._pending_next == len(self._pending.pfns):
            self._pending = _NO_PENDING
            self._pending_next = 0

    def _localise(self, buffer: memoryview, tables: list[tuple[int, int, int]]) -> None:
        """pfn -> mfn in place for the scratch pages `tables` (slot, pfn, level) (spec 5.7), populating
        forward references first."""
        # Slots ascend, so the last being len - 1 means the tables fill the scratch from slot 0 (all of it
        # outside verify mode): localised in place. A failed batch is never stored, partly localised or not.
        in_place = tables[-1][0] == len(tables) - 1
        if in_place:
            pages = buffer[:len(tables) << 12]
        else:
            pages = bytearray(len(tables) << 12)
            for i, (slot, _, _) in enumerate(tables):
                pages[i << 12:(i + 1) << 12] = buffer[slot << 12:(slot + 1) << 12]
        levels = [level for _, _, level in tables]
        missing = array("Q", [0]) * (abi.PTES_PER_PAGE * len(tables))
        while True:
            failure = None
            try:
                count = kernels.localise_pages(self._translation(), pages, levels, missing)
            except TranslationError as exc:
                # Raised outside the handler: the kernel's frames (holding native buffer views) must
                # die with the exception now, not ride along in a chain the GC frees in any order.
                failure = (exc.index, str(exc))
            if failure is not None:
                _, pfn, level = tables[failure[0]] if 0 <= failure[0] < len(tables) else (0, -1, 0)
                raise _Fail(f"L{level} pagetable at pfn {pfn:#x}, {failure[1]}")
            if not count:
                break
            found = missing[:count]
            if count * _DENSE_MISSING >= self._max_pfn:  # a window over every pfn costs less than min() and max()
                low, marks = 0, bytearray(self._max_pfn + 1)
            else:
                low = min(found)
                marks = bytearray(max(found) - low + 1)
            kernels.mark_pfns(found, low, marks)
            self._populate_marked(low, marks)
        if not in_place:
            for i, (slot, _, _) in enumerate(tables):
                buffer[slot << 12:(slot + 1) << 12] = pages[i << 12:(i + 1) << 12]

    def _translation(self) -> TranslationTables:
        if self._tables is None:
            self._tables = TranslationTables(levels=self._levels, m2p=self._m2p, max_mfn=self._max_mfn,
                                             p2m=P2MView.contiguous(self._p2m), max_pfn=self._max_pfn)
        return self._tables

    def _populate_run(self, first: int, count: int) -> None:
        """_populate for the ascending run first..first+count-1."""
        if _has_invalid(self._p2m, first, first + count):  # (forward references often populated it already)
            self._populate_marked(first, b"\1" * count)

    def _populate_marked(self, base: int, marks) -> None:
        """_populate for the ascending pfns base + i where marks[i] is 1, by runs found at C speed.

        For such a list, a complete 2 MiB aligned run of pfns still to populate (what _populate gives an
        order-9 extent) is an aligned block inside one marked run whose P2M entries are all INVALID; what
        is left goes to _populate as singles. No Python object per pfn unless a run is partly populated.
        """
        p2m = self._p2m
        extent = abi.SUPERPAGE_FRAMES
        singles: list[int] = []

        def leftovers(low: int, high: int) -> None:
            if low == high or not _has_invalid(p2m, low, high):
                return
            unpopulated = p2m[low:high].count(INVALID)
            if unpopulated == high - low:
                singles.extend(range(low, high))
            elif unpopulated:
                singles.extend(p for p in range(low, high) if p2m[p] == INVALID)

        for match in _MARKED.finditer(marks):
            low, high = base + match.start(), base + match.end()
            # (an array compare is one memcmp)
            blocks = [block for block in range(-(-low // extent) * extent, high - extent + 1, extent)
                      if p2m[block:block + extent] == _INVALID_EXTENT]
            done = low
            for block, first_mfn in zip(blocks, self._populate_extents(blocks)):
                if first_mfn is None:
                    continue  # the singles below pick it up
                leftovers(done, block)
                p2m[block:block + extent] = consecutive(first_mfn, extent)
                self.pages_populated += extent
                done = block + extent
            leftovers(done, high)
        if singles:
            self._populate(singles)

    def _populate_extents(self, blocks: list[int]) -> list:
        """Order-9 extents for the 2 MiB aligned pfns `blocks`: their first mfns, None where the hypervisor
        refused one. One call for them all (it allocates all or nothing), one per block if that fails."""
        if not blocks:
            return []
        try:
            return list(self.hv.populate_physmap(self.domid, blocks, abi.SUPERPAGE_ORDER))
        except HypervisorError:
            pass
        firsts = []
        for block in blocks:
            try:
                firsts.append(self.hv.populate_physmap(self.domid, [block], abi.SUPERPAGE_ORDER)[0])
            except HypervisorError:
                firsts.append(None)
        return firsts

    def _populate(self, pfns: list[int]) -> None:
        """Allocate frames for the pfns not populated yet (spec 5.6): 2 MiB extents for complete aligned runs."""
        p2m = self._p2m
        pending: list[int] = []
        run = 0
        prev = -2
        for pfn in pfns:
            if p2m[pfn] != INVALID:
                continue
            p2m[pfn] = 0  # claimed; the real mfn follows below
            pending.append(pfn)
            run = run + 1 if pfn == prev + 1 else 1
            prev = pfn
            if run >= abi.SUPERPAGE_FRAMES and pfn % abi.SUPERPAGE_FRAMES == abi.SUPERPAGE_FRAMES - 1:
                first = pfn - (abi.SUPERPAGE_FRAMES - 1)
                try:
                    base = self.hv.populate_physmap(self.domid, [first], abi.SUPERPAGE_ORDER)[0]
                except HypervisorError:
                    continue  # order 0 below picks them up
                p2m[first:pfn + 1] = consecutive(base, abi.SUPERPAGE_FRAMES)
                del pending[-abi.SUPERPAGE_FRAMES:]
                self.pages_populated += abi.SUPERPAGE_FRAMES
                run = 0
        if pending:
            try:
                mfns = self.hv.populate_physmap(self.domid, pending, 0)
            except HypervisorError as exc:
                for pfn in pending:
                    p2m[pfn] = INVALID
                raise _Fail(f"cannot populate {len(pending)} pfns from {pending[0]:#x}: {exc}") from None
            _require(len(mfns) == len(pending) and INVALID not in mfns, "populate returned too few frames")
            for pfn, mfn in zip(pending, mfns):
                p2m[pfn] = mfn
            self.pages_populated += len(pending)

    def _in_pseudophys(self, mfn: int) -> bool:
        if mfn > self._max_mfn or mfn >= len(self._m2p):
            return False
        pfn = self._m2p[mfn]
        return pfn <= self._max_pfn and self._p2m[pfn] == mfn

    def _verify_record(self, body) -> None:
        self._verify = True

    # ------------------------------------------------------------------ per-checkpoint state

    def _vcpu_record(self, kind: str, body) -> None:
        blob = body.context
        if not blob:
            log.info("skipping empty vcpu record", kind=kind, vcpu=body.vcpu_id, offset=self._offset)
            return
        _require(body.vcpu_id < len(self._vcpus),
                 f"vcpu {body.vcpu_id} out of range (domain has {len(self._vcpus)})")
        _require(self._pv_info, "received before X86_PV_INFO")
        accept, expectation = _VCPU_BLOB_RULES[kind]
        _require(accept(len(blob), self._width),
                 f"vcpu {body.vcpu_id} blob is {len(blob)} bytes, {expectation(self._width)}")
        setattr(self._vcpus[body.vcpu_id], kind, blob)


    def _shared_info(self, body) -> None:
        _require(self._pv_info, "received before X86_PV_INFO")
        layout = abi.SHARED_INFO_LAYOUTS[self._width]
        frame = self._call("map shared_info", self.hv.map_foreign, self.domid, [self._info.shared_info_frame], True)[0]
        _require(frame is not None, "cannot map the domain's shared_info frame")
        source = body.data
        vcpu_area = abi.XEN_LEGACY_MAX_VCPUS * abi.VCPU_INFO_SIZE
        frame[layout.vcpu_info:layout.vcpu_info + vcpu_area] = source[layout.vcpu_info:layout.vcpu_info + vcpu_area]
        frame[layout.arch:layout.arch_end] = source[layout.arch:layout.arch_end]
        struct.pack_into(layout.word, frame, layout.pfn_to_mfn_frame_list_list, 0)
        for vcpu in range(abi.XEN_LEGACY_MAX_VCPUS):
            struct.pack_into(layout.word, frame, vcpu * abi.VCPU_INFO_SIZE + layout.evtchn_pending_sel, 0)
        frame[layout.evtchn_pending:layout.evtchn_pending + layout.evtchn_bytes] = bytes(layout.evtchn_bytes)
        frame[layout.evtchn_mask:layout.evtchn_mask + layout.evtchn_bytes] = b"\xff" * layout.evtchn_bytes

    def _tsc_info(self, body) -> None:
        self._call("set TSC info", self.hv.set_tsc_info, self.domid,
                   TscInfo(mode=body.mode, khz=body.khz, nsec=body.nsec, incarnation=body.incarnation))

    def _checkpoint(self, body) -> None:
        raise _Fail("CHECKPOINT in a plain (not checkpointed) stream")

    # ------------------------------------------------------------------ completion (spec 5.8)

    def _end(self, body) -> None:
        _require(not self._pending_remaining(), "PAGE_DATA payload incomplete")
        _require(self._max_pfn >= 0, "stream has no X86_PV_P2M_FRAMES")
        _require(self._vcpus[0].basic is not None, "no X86_PV_VCPU_BASIC record for vcpu 0")
        start_info_pfn, store_mfn, console_mfn = -1, 0, 0
        for vcpu_id, state in enumerate(self._vcpus):
            if state.basic is not None:
                context = VcpuContext.unpack(state.basic, self._width)
                if vcpu_id == 0:
                    start_info_pfn = context.start_info
                    start_info_mfn, store_mfn, console_mfn = self._process_start_info(start_info_pfn)
                    context = attrs.evolve(context, start_info=start_info_mfn)
                context = self._localised_vcpu(vcpu_id, context)
                self._call(f"set vcpu{vcpu_id} context", self.hv.set_vcpu_context, self.domid, vcpu_id, context)
            if state.extended is not None:
                self._call(f"set vcpu{vcpu_id} extended context", self.hv.set_ext_vcpu_context, self.domid,
                           vcpu_id, state.extended)
            if state.xsave is not None:
                mask = int.from_bytes(state.xsave[8:16], "little")
                self._call(f"set vcpu{vcpu_id} xsave", self.hv.set_vcpu_xsave, self.domid, vcpu_id,
                           XsaveState(xfeature_mask=mask, data=state.xsave))
            if state.msrs is not None:
                self._call(f"set vcpu{vcpu_id} MSRs", self.hv.set_vcpu_msrs, self.domid, vcpu_id, state.msrs)
        self._pin_pagetables()
        self._write_guest_p2m()
        self._seed_grant_table(store_mfn, console_mfn)
        self._done = RestoreResult(
            domid=self.domid, width=self._width, levels=self._levels, max_pfn=self._max_pfn,
            store_mfn=store_mfn, console_mfn=console_mfn, start_info_pfn=start_info_pfn, p2m=self._p2m,
            p2m_pfns=tuple(self._p2m_pfns), pages_written=self.pages_written,
            pages_populated=self.pages_populated, verify_mismatches=self.verify_mismatches)

    def _mfn_for(self, pfn: int, what: str, want_type: int | None = abi.PAGETYPE_NOTAB) -> int:
        _require(pfn <= self._max_pfn, f"{what} pfn {pfn:#x} out of range (max_pfn {self._max_pfn:#x})")
        if want_type is not None:
            _require(self._types[pfn] == want_type,
                     f"{what} pfn {pfn:#x} has type {abi.pagetype_name(self._types[pfn])}, "
                     f"expected {abi.pagetype_name(want_type)}")
        mfn = self._p2m[pfn]
        _require(self._in_pseudophys(mfn), f"{what} pfn {pfn:#x} has no consistent frame (mfn {mfn:#x})")
        return mfn

    def _top_table_mfn(self, pfn: int, what: str) -> int:
        _require(pfn <= self._max_pfn, f"{what} pfn {pfn:#x} out of range (max_pfn {self._max_pfn:#x})")
        level = abi.pagetable_level(self._types[pfn])
        _require(level == self._levels, f"{what} pfn {pfn:#x} has type {abi.pagetype_name(self._types[pfn])}, "
                                        f"expected an L{self._levels} table")
        return self._mfn_for(pfn, what, None)

    def _process_start_info(self, pfn: int) -> tuple[int, int, int]:
        mfn = self._mfn_for(pfn, "start_info")
        layout = abi.START_INFO_LAYOUTS[self._width]
        page = self._call("map start_info", self.hv.map_foreign, self.domid, [mfn], True)[0]
        _require(page is not None, f"cannot map start_info (pfn {pfn:#x})")
        word = layout.word

        def ring(field: int, evtchn_field: int, evtchn: int, what: str) -> int:
            ring_pfn = struct.unpack_from(word, page, field)[0]
            _require(ring_pfn <= self._max_pfn, f"{what} pfn {ring_pfn:#x} out of range")
            ring_mfn = self._p2m[ring_pfn]
            _require(self._in_pseudophys(ring_mfn), f"{what} pfn {ring_pfn:#x} has no consistent frame")
            struct.pack_into(word, page, field, ring_mfn)
            struct.pack_into("<I", page, evtchn_field, evtchn)
            return ring_mfn

        store = ring(layout.store_mfn, layout.store_evtchn, self.store_evtchn, "xenstore ring")
        console = ring(layout.console_mfn, layout.console_evtchn, self.console_evtchn, "console ring")
        console_page = self._call("map console ring", self.hv.map_foreign, self.domid, [console], True)[0]
        _require(console_page is not None, "cannot map the console ring")
        console_page[abi.XENCONSOLE_CONNECTION_OFFSET] = abi.XENCONSOLE_DISCONNECTED
        struct.pack_into(word, page, layout.nr_pages, self._max_pfn + 1)
        struct.pack_into(word, page, layout.shared_info, self._info.shared_info_frame << abi.PAGE_SHIFT)
        struct.pack_into("<I", page, layout.flags, 0)
        return mfn, store, console

    def _localised_vcpu(self, vcpu_id: int, context: VcpuContext) -> VcpuContext:
        _require(context.gdt_ents <= abi.MAX_GDT_ENTS, f"vcpu{vcpu_id} gdt_ents {context.gdt_ents} too large")
        used = abi.gdt_frames_used(context.gdt_ents)
        gdt = tuple(self._mfn_for(pfn, f"vcpu{vcpu_id} GDT frame {i}") if i < used else pfn
                    for i, pfn in enumerate(context.gdt_frames))
        cr3_mfn = self._top_table_mfn(abi.mfn_from_cr3(context.cr3, self._width), f"vcpu{vcpu_id} cr3")
        cr1 = context.cr1
        if self._levels == 4 and cr1 & 1:
            cr1 = self._top_table_mfn(cr1 >> abi.PAGE_SHIFT, f"vcpu{vcpu_id} cr1") << abi.PAGE_SHIFT
        return attrs.evolve(context, flags=context.flags | abi.VGCF_ONLINE, gdt_frames=gdt,
                            cr3=abi.cr3_from_mfn(cr3_mfn, self._width), cr1=cr1)

    def _pin_pagetables(self) -> None:
        """Pin every table recorded as pinned, in pfn order, 1024 per call (spec 5.8 step 2)."""
        pinned = [m.start() for m in _PINNED_TYPE.finditer(self._types)]
        for start in range(0, len(pinned), abi.MAX_BATCH_SIZE):
            pfns = pinned[start:start + abi.MAX_BATCH_SIZE]
            self._pin([(self._types[pfn] & 0x7, self._p2m[pfn]) for pfn in pfns], pfns)

    def _pin(self, ops: list[tuple[int, int]], pfns: list[int]) -> None:
        try:
            self.hv.mmuext_pin(self.domid, ops)
        except HypervisorError as exc:
            where = f"L{ops[exc.index][0]} pagetable at pfn {pfns[exc.index]:#x}" if 0 <= exc.index < len(ops) else "pagetables"
            raise _Fail(f"cannot pin {where}: {exc}") from None

    def _write_guest_p2m(self) -> None:
        fpp = abi.frames_per_page(self._width)
        frames = self._max_pfn // fpp + 1
        mfns = [self._mfn_for(self._p2m_pfns[i], f"P2M frame {i}") for i in range(frames)]
        pages = self._call("map the guest P2M", self.hv.map_foreign, self.domid, mfns, True)
        words = self._p2m if self._width == abi.WIDTH_64 else _p2m_as_u32(self._p2m)
        raw = memoryview(words).cast("B")
        for i, page in enumerate(pages):
            _require(page is not None, f"cannot map P2M frame {i}")
            chunk = raw[i * abi.PAGE_SIZE:(i + 1) * abi.PAGE_SIZE]
            page[:len(chunk)] = chunk

    def _seed_grant_table(self, store_mfn: int, console_mfn: int) -> None:
        table = self._call("map grant table", self.hv.map_grant_frame, self.domid, 0)
        entry = _GRANT_ENTRY.size
        _GRANT_ENTRY.pack_into(table, abi.GNTTAB_RESERVED_CONSOLE * entry, abi.GTF_PERMIT_ACCESS,
                               self.console_domid, console_mfn & 0xFFFF_FFFF)
        _GRANT_ENTRY.pack_into(table, abi.GNTTAB_RESERVED_XENSTORE * entry, abi.GTF_PERMIT_ACCESS,
                               self.store_domid, store_mfn & 0xFFFF_FFFF)



# Size rule per vcpu blob kind (spec 3.5-3.8): (accept(size, width), what was expected).
_VCPU_BLOB_RULES: dict[str, tuple[Callable, Callable]] = {
    "basic": (lambda size, width: size == abi.VCPU_CONTEXT_SIZES[width],
              lambda width: f"expected {abi.VCPU_CONTEXT_SIZES[width]}"),
    "extended": (lambda size, width: size <= abi.EXT_VCPU_CONTEXT_MAX,
                 lambda width: f"expected at most {abi.EXT_VCPU_CONTEXT_MAX}"),
    "xsave": (lambda size, width: size >= abi.XSAVE_HEADER_SIZE,
              lambda width: f"expected at least {abi.XSAVE_HEADER_SIZE}"),
    "msrs": (lambda size, width: size % abi.MSR_ENTRY_SIZE == 0,
             lambda width: f"expected a multiple of {abi.MSR_ENTRY_SIZE}"),
}

_EVENTS: dict[type, Callable] = {
    PagePayload: PvRestorer._page_payload,
    LibxcRecord: PvRestorer._event_record,
    Header: PvRestorer._event_header,
    EndOfStream: PvRestorer._event_end,
    SkippedRecord: PvRestorer._event_skipped,
    # libxl/xl input: the libxl layer (LIBXC_CONTEXT, emulator records, END) is the toolstack's; the
    # engine restores the libxc stream inside it.
    LibxlRecord: PvRestorer._event_skipped,
}

_HANDLERS: dict[int, Callable] = {
    C.REC_END: PvRestorer._end,
    C.REC_PAGE_DATA: PvRestorer._page_data,
    C.REC_X86_PV_INFO: PvRestorer._pv_info_record,
    C.REC_X86_PV_P2M_FRAMES: PvRestorer._p2m_frames,
    C.REC_X86_PV_VCPU_BASIC: lambda self, body: self._vcpu_record("basic", body),
    C.REC_X86_PV_VCPU_EXTENDED: lambda self, body: self._vcpu_record("extended", body),
    C.REC_X86_PV_VCPU_XSAVE: lambda self, body: self._vcpu_record("xsave", body),
    C.REC_X86_PV_VCPU_MSRS: lambda self, body: self._vcpu_record("msrs", body),
    C.REC_SHARED_INFO: PvRestorer._shared_info,
    C.REC_X86_TSC_INFO: PvRestorer._tsc_info,
    C.REC_VERIFY: PvRestorer._verify_record,
    C.REC_STATIC_DATA_END: PvRestorer._static_data_end_record,
    C.REC_X86_CPUID_POLICY: PvRestorer._cpuid_policy,
    C.REC_X86_MSR_POLICY: PvRestorer._msr_policy,
    C.REC_CHECKPOINT: PvRestorer._checkpoint,
}

_name = libxc_record_name


class ToolstackHypervisor(Hypervisor, Protocol):
    """A hypervisor plus the toolstack operations around a restore (spec 7.8); `SimXen` is one."""

    def create_domain(self, max_vcpus: int = 1, max_pages: int = 0, hvm: bool = False) -> int: ...

    def destroy_domain(self, domid: int) -> None: ...


def scatter_copy(piece: memoryview, segments, index: int, within: int) -> tuple[int, int]:
    """Copy `piece` into consecutive writable `segments` from (index, within) on, one slice copy per
    segment it touches; returns the new (index, within)."""
    while piece:
        segment = segments[index]
        take = min(len(segment) - within, len(piece))
        segment[within:within + take] = piece[:take]
        piece = piece[take:]
        within += take
        if within == len(segment):
            index, within = index + 1, 0
    return index, within


def restore_new_domain(hv: ToolstackHypervisor, source: Iterable[bytes] | int, *, max_vcpus: int, max_pages: int, initial: bytes = b"",
                       store_evtchn: int = 1, console_evtchn: int = 2) -> RestoreResult:
    """Create a PV domain on `hv`, restore a stream into it, and destroy the domain again if the restore fails for any reason.

    `source` is an iterable of stream chunks, or a readable fd (payloads then move fd -> guest with readv;
    `initial` holds bytes already read from it).
    """
    return restore_into_new_domain(hv, PvRestorer, source, hvm=False, max_vcpus=max_vcpus, max_pages=max_pages,
                                   initial=initial, store_evtchn=store_evtchn, console_evtchn=console_evtchn)


def restore_into_new_domain(hv: ToolstackHypervisor, restorer_class, source: Iterable[bytes] | int, *, hvm: bool,
                            max_vcpus: int, max_pages: int, initial: bytes, store_evtchn: int, console_evtchn: int):
    """The create / restore / destroy-on-any-failure frame shared by the PV and HVM restorers."""
    domid = hv.create_domain(max_vcpus=max_vcpus, max_pages=max_pages, **({"hvm": True} if hvm else {}))
    restorer = None
    try:
        if isinstance(source, int):
            restorer = restorer_class(hv, domid, store_evtchn=store_evtchn, console_evtchn=console_evtchn,
                                      payload="passthrough")
            return restorer.run_fd(source, initial)
        restorer = restorer_class(hv, domid, store_evtchn=store_evtchn, console_evtchn=console_evtchn)
        for chunk in itertools.chain((initial,) if initial else (), source):
            restorer.feed(chunk)
        return restorer.finish()
    except BaseException:
        if restorer is not None:
            restorer.close()
        hv.destroy_domain(domid)
        raise
