"""The native v2 restore engine for HVM guests (spec save-restore-engines 6.3), sans-IO like the PV one::

    restorer = HvmRestorer(hv, domid, store_evtchn=1, console_evtchn=2)
    for chunk in chunks:
        restorer.feed(chunk)
    result = restorer.finish()

It takes a bare libxc stream, a libxl stream or an xl save file. PAGE_DATA pages are copied raw into
freshly populated gfns (2 MiB extents for whole aligned runs); X86_TSC_INFO is applied at once, the CPU
policy at STATIC_DATA_END, HVM_PARAMS as they arrive (the store, ioreq and buffered-ioreq pages
cleared, the console page cleared and marked disconnected), and at the libxc END the event-channel
params, then the stashed HVM_CONTEXT (after the params, whatever the record order), then the grant
table. The libxl layer's emulator records are not the hypervisor's: the engine hands them back in the
result (EMULATOR_CONTEXT's blob, EMULATOR_XENSTORE_DATA's keys), as libxl receives them.

Every inconsistency raises a v2 `StreamError` at the offset of the record at fault; a context the
hypervisor refuses is reported at the libxc END. `restore_hvm_new_domain` creates the domain and
destroys it again if anything fails.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable

import attrs

from xenstream.hv import abi, composite, hvm_params
from xenstream.hv.interface import CpuPolicy, HypervisorError, TscInfo
from xenstream.hv.lazylog import get_logger
from xenstream.hv.u64runs import is_consecutive
from xenstream.v2 import constants as C
from xenstream.v2 import positional_fill
from xenstream.v2.errors import MalformedStream, TruncatedStream, UnsupportedStream
from xenstream.v2.events import NEED_DATA, EndOfStream, Header, LibxcRecord, LibxlRecord, PagePayload, SkippedRecord
from xenstream.v2.records import DomainHeader, ImageHeader, libxc_record_name
from xenstream.v2.restore import EngineRestorer, ToolstackHypervisor, restore_into_new_domain, scatter_copy

log = get_logger(__name__)

_NEEDS_RAM = frozenset({t for t in abi.KNOWN_PAGETYPES if abi.pagetype_has_data(t)} | {abi.PAGETYPE_XALLOC})
_FLAG = b"\x01"
_NEEDS_RAM_FLAGS = bytes(int(t in _NEEDS_RAM) for t in range(256))  # translate tables over PAGE_DATA's type bytes
_DATALESS_FLAGS = bytes(int(t in abi.PAGETYPES_WITHOUT_DATA) for t in range(256))
_CHUNK_SHIFT = abi.SUPERPAGE_ORDER  # populated-gfn tracking per 2 MiB extent (see _Populated)
_CHUNK = 1 << _CHUNK_SHIFT
_CHUNK_MASK = _CHUNK - 1
_SPAN = abi.SUPERPAGE_FRAMES


@attrs.frozen
class HvmRestoreResult:
    domid: int
    store_gfn: int
    console_gfn: int
    params: tuple[tuple[int, int], ...]  # as set from HVM_PARAMS, in stream order
    context: bytes
    pages_written: int
    pages_populated: int
    emulator_id: int | None = None
    emulator_context: bytes | None = None  # EMULATOR_CONTEXT's blob (libxl input)
    xenstore: tuple[tuple[bytes, bytes], ...] = ()  # EMULATOR_XENSTORE_DATA's keys and values


class _Fail(Exception):
    """Internal: an inconsistency found while applying one record; re-raised with the record's offset."""


class _Populated:
    """Which gfns have been populated: one byte per gfn, in chunks of one 2 MiB extent allocated on first
    touch. Gfns come from the stream unchecked (HVM has no pfn limit to hold them to), so the cost must
    follow what is populated, not how far apart it is: about 0.6 KiB per populated gfn for the most
    scattered stream (each populate is bounded by the domain's max_pages), one byte per gfn for RAM."""

    def __init__(self) -> None:
        self._chunks: dict[int, bytearray] = {}

    def __contains__(self, gfn: int) -> bool:
        chunk = self._chunks.get(gfn >> _CHUNK_SHIFT)
        return chunk is not None and bool(chunk[gfn & _CHUNK_MASK])

    def run_missing(self, first: int, count: int) -> bool:
        """True when none of first..first+count-1 is populated."""
        for chunk_index, low, high in _chunk_pieces(first, count):
            chunk = self._chunks.get(chunk_index)
            if chunk is not None and chunk.count(0, low, high) != high - low:
                return False
        return True

    def mark(self, gfns) -> None:
        for gfn in gfns:
            self._chunk(gfn >> _CHUNK_SHIFT)[gfn & _CHUNK_MASK] = 1

    def mark_run(self, first: int, count: int) -> None:
        for chunk_index, low, high in _chunk_pieces(first, count):
            self._chunk(chunk_index)[low:high] = b"\x01" * (high - low)

    def _chunk(self, index: int) -> bytearray:
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = bytearray(_CHUNK)
        return chunk


def _chunk_pieces(first: int, count: int):
    """(chunk index, low, high) for each chunk that gfns first..first+count-1 touch."""
    gfn, end = first, first + count
    while gfn < end:
        low = gfn & _CHUNK_MASK
        high = min(_CHUNK, low + (end - gfn))
        yield gfn >> _CHUNK_SHIFT, low, high
        gfn += high - low


class HvmRestorer(EngineRestorer):
    expect_hvm = True

    def __init__(self, hv, domid: int, **options) -> None:
        super().__init__(hv, domid, **options)
        self._policy = [b"", b""]
        self._context: bytes | None = None
        self._params: list[tuple[int, int]] = []
        self._store_gfn = 0
        self._console_gfn = 0
        self._populated = _Populated()
        self._targets: list[memoryview] = []  # the pending PAGE_DATA payload's guest memory, one view per run
        self._target_index = 0  # where the next payload byte goes: targets[index][within]
        self._target_within = 0
        self._payload_left = 0  # payload bytes of the pending PAGE_DATA not received yet
        self._span = (0, 0)  # lowest and highest gfn of the pending payload
        self._libxc_done = False
        self._emulator_id: int | None = None
        self._emulator_context: bytes | None = None
        self._xenstore: tuple[tuple[bytes, bytes], ...] = ()

    # ------------------------------------------------------------------ driving

    def _drain(self) -> bool:
        reader = self._reader
        while not self._ended:
            if self._passthrough and reader.payload_remaining:
                return False
            event = reader.next_event()
            if event is NEED_DATA:
                return False
            if self._positional is not None and not positional_fill.is_page_data(event):
                self._positional.wait()  # what follows may read or rewrite guest memory the workers fill
            self._offset = event.offset
            _EVENTS[type(event)](self, event)
        return True

    def finish(self) -> HvmRestoreResult:
        """After the input ended: the stream must have been complete; returns what was restored."""
        if not self._ended:
            self.feed(b"")
        if not self._libxc_done:
            raise TruncatedStream("stream ended without an END record", self._reader.offset)
        self._targets = []
        return HvmRestoreResult(
            domid=self.domid, store_gfn=self._store_gfn, console_gfn=self._console_gfn, params=tuple(self._params),
            context=self._context or b"", pages_written=self.pages_written, pages_populated=self.pages_populated,
            emulator_id=self._emulator_id, emulator_context=self._emulator_context, xenstore=self._xenstore)

    def close(self) -> None:
        self._targets = []

    # ------------------------------------------------------------------ events

    def _event_header(self, event: Header) -> None:
        header = event.header
        if isinstance(header, ImageHeader):
            self._version = header.version
        elif isinstance(header, DomainHeader) and header.guest_type != C.DOMAIN_TYPE_X86_HVM:
            raise UnsupportedStream(f"stream is {C.DOMAIN_TYPE_NAMES.get(header.guest_type, header.guest_type)}, "
                                    f"domain {self.domid} is HVM", event.offset)

    def _event_end(self, event: EndOfStream) -> None:
        if not event.complete:
            raise TruncatedStream("stream ended without an END record", event.offset)
        self._ended = True

    def _event_skipped(self, event) -> None:
        pass

    def _event_record(self, event: LibxcRecord) -> None:
        if self._libxc_done:
            raise MalformedStream(f"{libxc_record_name(event.type)} record after END", event.offset)
        handler = _HANDLERS.get(event.type)
        if handler is None:
            raise MalformedStream(f"{libxc_record_name(event.type)} record is not valid in an HVM stream", event.offset)
        try:
            handler(self, event.body)
        except _Fail as exc:
            raise MalformedStream(f"{libxc_record_name(event.type)}: {exc}", event.offset) from None

    def _event_libxl(self, event: LibxlRecord) -> None:
        handler = _LIBXL_HANDLERS.get(event.type)
        if handler is not None:
            handler(self, event)

    # ------------------------------------------------------------------ libxc records

    def _static_data_end_record(self, body) -> None:
        if self._static_data_end:
            raise _Fail("STATIC_DATA_END already received")
        self._static_data_end = True
        cpuid, msrs = self._policy
        if cpuid or msrs:
            self._call("set CPU policy", self.hv.set_cpu_policy, self.domid, CpuPolicy(cpuid, msrs))

    def _policy_record(self, slot: int, body) -> None:
        if self._static_data_end:
            log.warning("CPU policy record after STATIC_DATA_END is never applied", offset=self._offset)
        self._policy[slot] = body.pack()

    def _page_data(self, body) -> None:
        if self._payload_left:
            raise _Fail("previous PAGE_DATA payload incomplete")
        self._page_record_offset = self._offset
        self._infer_static_data_end()
        if not self._static_data_end:
            raise _Fail("received before STATIC_DATA_END")
        pfns, types = body.pfns, body.types
        first = pfns[0]
        self._targets, self._target_index, self._target_within = [], 0, 0
        if _FLAG not in types.translate(_NEEDS_RAM_FLAGS):  # a hole: nothing to allocate or receive
            return
        if _FLAG not in types.translate(_DATALESS_FLAGS) and is_consecutive(pfns, first):
            self._populate_run(first, len(pfns))
            data_pfns = range(first, first + len(pfns))
        else:
            self._populate([p for p, t in zip(pfns, types) if t in _NEEDS_RAM])
            data_pfns = [p for p, t in zip(pfns, types) if abi.pagetype_has_data(t)]
            if not data_pfns:
                return
        runs = self._call("map page batch", self.hv.map_foreign_runs, self.domid, data_pfns, True)
        if sum(run.count for run in runs) != len(data_pfns):
            covered = {k for run in runs for k in range(run.first, run.first + run.count)}
            missing = next(k for k in range(len(data_pfns)) if k not in covered)
            raise _Fail(f"cannot map gfn {data_pfns[missing]:#x} writable")
        self._targets = [run.view for run in runs]
        self._payload_left = len(data_pfns) * abi.PAGE_SIZE
        self._span = (data_pfns[0], data_pfns[-1]) if isinstance(data_pfns, range) else (min(data_pfns), max(data_pfns))

    def _populate_run(self, first: int, count: int) -> None:
        if self._populated.run_missing(first, count):
            head = min(count, -first % _SPAN)
            extents = list(range(first + head, first + count - _SPAN + 1, _SPAN))
            tail_start = extents[-1] + _SPAN if extents else first + head
            singles = list(range(first, first + head)) + list(range(tail_start, first + count))
            self._allocate(extents, singles)
            self._populated.mark_run(first, count)
            return
        self._populate(list(range(first, first + count)))

    def _populate(self, gfns) -> None:
        """Populate the gfns not populated yet: a 2 MiB extent for each aligned block they fill completely."""
        missing = list(dict.fromkeys(g for g in gfns if g not in self._populated))
        if not missing:
            return
        per_block = Counter(g // _SPAN for g in missing)
        full = {block for block, n in per_block.items() if n == _SPAN}
        self._allocate(sorted(block * _SPAN for block in full), [g for g in missing if g // _SPAN not in full])
        self._populated.mark(missing)

    def _allocate(self, extents: list[int], singles: list[int]) -> None:
        try:
            if extents:
                self.hv.populate_physmap(self.domid, extents, abi.SUPERPAGE_ORDER)
            if singles:
                self.hv.populate_physmap(self.domid, singles, 0)
        except HypervisorError as exc:
            raise _Fail(f"cannot populate {len(extents) * _SPAN + len(singles)} gfns: {exc}") from None
        self.pages_populated += len(extents) * _SPAN + len(singles)

    def _page_payload(self, event: PagePayload) -> None:
        """Views mode: whole pages of the pending payload, copied (or, verifying, compared) into guest memory."""
        data = event.data
        if self._verify:
            self._compare(data)
        else:
            self._copy_in(data)
            self.pages_written += len(data) >> 12
        self._payload_left -= len(data)

    def _copy_in(self, piece: memoryview) -> None:
        """Payload bytes into the targets from the cursor on, one copy per run they touch."""
        self._target_index, self._target_within = scatter_copy(piece, self._targets, self._target_index,
                                                               self._target_within)

    def _compare(self, pages: memoryview) -> None:
        """Verify mode: whole payload pages against the guest's pages from the (page-aligned) cursor on."""
        targets, index, within = self._targets, self._target_index, self._target_within
        for k in range(0, len(pages), abi.PAGE_SIZE):
            target = targets[index]
            if pages[k:k + abi.PAGE_SIZE] != target[within:within + abi.PAGE_SIZE]:
                self.verify_mismatches += 1
                log.warning("verify: page differs", offset=self._page_record_offset)
            within += abi.PAGE_SIZE
            if within == len(target):
                index, within = index + 1, 0
        self._target_index, self._target_within = index, within

    def _receive_payload(self, fd: int) -> None:
        """Passthrough: the rest of the pending payload, what the reader buffered of it then the fd, into the
        guest's memory with one iovec per run (verifying: into scratch memory, then compared page by page)."""
        reader = self._reader
        total = self._payload_left
        scratch = memoryview(bytearray(total)) if self._verify else None
        while reader.buffered and self._payload_left:
            piece = reader.take_payload()
            self._fill(piece, scratch, total)
        moved = 0
        while self._payload_left:
            if scratch is None:
                index, within = self._target_index, self._target_within
                vector = [self._targets[index][within:], *self._targets[index + 1:index + C.IOV_MAX]]
            else:
                vector = [scratch[total - self._payload_left:]]
            n = os.readv(fd, vector)
            if not n:
                reader.payload_consumed(moved)
                raise TruncatedStream(f"truncated PAGE_DATA payload: {self._payload_left} bytes missing",
                                      self._page_record_offset)
            moved += n
            if scratch is None:
                self._advance(n)
            else:
                self._payload_left -= n
        reader.payload_consumed(moved)
        if scratch is None:
            self.pages_written += total >> 12
        else:
            self._compare(scratch)

    def _submit_payload(self, fill: positional_fill.PositionalFill, position: int) -> int:
        """run_positional: the rest of the pending payload, at `position` of the file, to the fill's workers
        (verifying, read here and compared once every earlier payload is in place)."""
        if self._verify:
            fill.wait()
            os.lseek(fill.fd, position, os.SEEK_SET)
            self._receive_payload(fill.fd)
            return os.lseek(fill.fd, 0, os.SEEK_CUR) - position
        reader, total = self._reader, self._payload_left
        if reader.buffered:  # copied by this thread: no earlier copy of these pages may land after it
            fill.wait_for(self._span)
        while reader.buffered and self._payload_left:
            self._fill(reader.take_payload(), None, total)
        remaining = self._payload_left
        if remaining:
            index, within = self._target_index, self._target_within
            fill.submit([self._targets[index][within:], *self._targets[index + 1:]], position,
                        self._page_record_offset, self._span)
            reader.payload_consumed(remaining)
            self._advance(remaining)
        self.pages_written += total >> 12
        return remaining

    def _fill(self, piece: memoryview, scratch: memoryview | None, total: int) -> None:
        if scratch is None:
            self._copy_in(piece)
        else:
            done = total - self._payload_left
            scratch[done:done + len(piece)] = piece
        self._payload_left -= len(piece)

    def _advance(self, n: int) -> None:
        """Move the cursor over n bytes the kernel wrote into the targets."""
        self._payload_left -= n
        self._target_index, self._target_within = positional_fill.advance_cursor(
            self._targets, self._target_index, self._target_within, n)

    def _tsc_info(self, body) -> None:
        self._call("set TSC info", self.hv.set_tsc_info, self.domid,
                   TscInfo(mode=body.mode, khz=body.khz, nsec=body.nsec, incarnation=body.incarnation))

    def _hvm_context(self, body) -> None:
        self._context = body.data  # a later one replaces an earlier one; loaded at END

    def _hvm_params(self, body) -> None:
        for index, value in body.params:
            treatment = _PARAM_TREATMENT.get(index)
            if treatment is _DROP:
                continue
            if treatment is not None:
                treatment(self, value)
            self._call(f"set HVM param {hvm_params.name(index)}", self.hv.set_hvm_param, self.domid, index, value)
            self._params.append((index, value))

    def _clear(self, gfn: int) -> None:
        try:  # Xen does not check this result either (spec 6.3 step 5)
            composite.clear_page(self.hv, self.domid, gfn)
        except HypervisorError as exc:
            log.warning("cannot clear a special page", gfn=f"{gfn:#x}", error=str(exc))

    def _store_param(self, value: int) -> None:
        self._store_gfn = value
        self._clear(value)

    def _console_param(self, value: int) -> None:
        self._console_gfn = value
        try:
            composite.console_ring_init(self.hv, self.domid, value, clear=True)
        except HypervisorError as exc:
            log.warning("cannot initialise the console page", gfn=f"{value:#x}", error=str(exc))

    def _verify_record(self, body) -> None:
        self._verify = True

    def _checkpoint(self, body) -> None:
        raise _Fail("CHECKPOINT in a plain (not checkpointed) stream")

    def _end(self, body) -> None:
        if self._payload_left:
            raise _Fail("PAGE_DATA payload incomplete")
        if self._context is None:
            raise _Fail("stream has no HVM_CONTEXT record")
        for index, value in ((hvm_params.STORE_EVTCHN, self.store_evtchn),
                             (hvm_params.CONSOLE_EVTCHN, self.console_evtchn)):
            self._call(f"set HVM param {hvm_params.name(index)}", self.hv.set_hvm_param, self.domid, index, value)
        try:
            self.hv.set_hvm_context(self.domid, self._context)
        except HypervisorError as exc:
            raise _Fail(f"the hypervisor refused the HVM context: {exc}") from None
        try:
            composite.seed_grant_table(self.hv, self.domid, self._console_gfn, self._store_gfn,
                                       self.console_domid, self.store_domid)
        except HypervisorError as exc:
            raise _Fail(f"cannot seed the grant table: {exc}") from None
        self._libxc_done = True

    # ------------------------------------------------------------------ libxl records

    def _emulator_context_record(self, event: LibxlRecord) -> None:
        self._emulator_id = event.body.emulator_id
        self._emulator_context = event.body.data

    def _emulator_xenstore_record(self, event: LibxlRecord) -> None:
        try:
            pairs = event.body.pairs()
        except ValueError as exc:
            raise MalformedStream(f"EMULATOR_XENSTORE_DATA: {exc}", event.offset) from None
        for key, _ in pairs:
            if not key or key.startswith(b"/"):
                raise MalformedStream(f"EMULATOR_XENSTORE_DATA: bad key {key!r}", event.offset)
        self._xenstore = tuple(pairs)


_DROP = object()  # PAE_ENABLED: obsolete, discarded (spec 6.3)
_PARAM_TREATMENT: dict[int, object] = {
    hvm_params.STORE_PFN: HvmRestorer._store_param,
    hvm_params.CONSOLE_PFN: HvmRestorer._console_param,
    hvm_params.IOREQ_PFN: HvmRestorer._clear,
    hvm_params.BUFIOREQ_PFN: HvmRestorer._clear,
    hvm_params.PAE_ENABLED: _DROP,
}

_EVENTS: dict[type, Callable] = {
    PagePayload: HvmRestorer._page_payload,
    LibxcRecord: HvmRestorer._event_record,
    Header: HvmRestorer._event_header,
    EndOfStream: HvmRestorer._event_end,
    SkippedRecord: HvmRestorer._event_skipped,
    LibxlRecord: HvmRestorer._event_libxl,
}

_HANDLERS: dict[int, Callable] = {
    C.REC_END: HvmRestorer._end,
    C.REC_PAGE_DATA: HvmRestorer._page_data,
    C.REC_X86_TSC_INFO: HvmRestorer._tsc_info,
    C.REC_HVM_CONTEXT: HvmRestorer._hvm_context,
    C.REC_HVM_PARAMS: HvmRestorer._hvm_params,
    C.REC_VERIFY: HvmRestorer._verify_record,
    C.REC_STATIC_DATA_END: HvmRestorer._static_data_end_record,
    C.REC_X86_CPUID_POLICY: lambda self, body: self._policy_record(0, body),
    C.REC_X86_MSR_POLICY: lambda self, body: self._policy_record(1, body),
    C.REC_CHECKPOINT: HvmRestorer._checkpoint,
}

_LIBXL_HANDLERS: dict[int, Callable] = {
    C.LIBXL_REC_EMULATOR_CONTEXT: HvmRestorer._emulator_context_record,
    C.LIBXL_REC_EMULATOR_XENSTORE_DATA: HvmRestorer._emulator_xenstore_record,
}


def restore_hvm_new_domain(hv: ToolstackHypervisor, source: Iterable[bytes] | int, *, max_vcpus: int, max_pages: int,
                           initial: bytes = b"", store_evtchn: int = 1, console_evtchn: int = 2) -> HvmRestoreResult:
    """Create an HVM domain on `hv`, restore a stream into it, and destroy the domain again if the restore
    fails for any reason. `source` is an iterable of chunks, or a readable fd (payloads then move fd ->
    guest with readv; `initial` holds bytes already read from it)."""
    return restore_into_new_domain(hv, HvmRestorer, source, hvm=True, max_vcpus=max_vcpus, max_pages=max_pages,
                                   initial=initial, store_evtchn=store_evtchn, console_evtchn=console_evtchn)
