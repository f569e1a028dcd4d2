"""Legacy v1 events -> v2 writer calls: the converter's brain, with no I/O of its own.

The output is byte for byte what Xen's ``convert-legacy-stream`` writes on every input it converts
correctly; where Xen's converter fails or is wrong, this one follows the 4.5 restorer instead.

Mapping (one handler per event type, dispatched by table):

=========================  ===================================================================
v1 element                 v2 output
=========================  ===================================================================
xl header                  libxl format: the same header with mandatory flag STREAMV2 added;
                           libxc format: dropped (xl cannot read a bare libxc stream). Xen's
                           converter reads it only with ``-x`` and then always fails under
                           Python 3 (bytes compared with a str magic); ours detects it
xend, libvirt, xenopsd     not carried over (v2 has no place for them); Xen's converter
headers                    takes their first bytes for p2m_size
p2m_size                   libxl format: libxl header (options LEGACY), LIBXC_CONTEXT; then the
                           image header (version 3, little endian) and the domain header (PV 1 /
                           HVM 2, page shift 12, xen_major 0 = converted, xen_minor 1 = the
                           converter's version); HVM: STATIC_DATA_END right away
extended info              X86_PV_INFO for the "vcpu" block (guest width, levels), then
                           STATIC_DATA_END; unknown blocks are skipped like the restorer does
                           (Xen's converter rejects them)
p2m frame list             X86_PV_P2M_FRAMES(0, p2m_size - 1, frames widened to u64)
page batch                 PAGE_DATA: entries equal to 0xF0000000 dropped, type nibble moved to
                           bits 60-63, payload moved unchanged; LPINTAB without a level (0x8)
                           becomes NOTAB as the restorer reads it; an all-XTAB batch is dropped
                           (Xen writes an invalid empty PAGE_DATA)
TSC_INFO                   X86_TSC_INFO(mode, khz, nsec, incarnation) where it occurs
VCPU_INFO                  nothing; the parser reads the tail with its map
HVM parameter chunks       collected; one HVM_PARAMS at the end of the body (-21 maps to 36,
                           which Xen's converter rejects); in a PV stream: MalformedStream
TOOLSTACK                  libxl format: EMULATOR_XENSTORE_DATA after the libxc END with the
                           physmap keys; nameless entries give no "name" key (Xen rejects them)
ENABLE_VERIFY_MODE,        nothing
LAST_CHECKPOINT,
ENABLE_COMPRESSION,
COMPRESSED_DATA
decoded compressed pages   ordinary PAGE_DATA content (Xen's converter: "todo")
TMEM, TMEM_EXTRA           refused (UnsupportedStream naming the chunk) unless drop_tmem
PV tail                    per VCPU X86_PV_VCPU_BASIC / _EXTENDED / _XSAVE (without the 16-byte
                           mask/size header), SHARED_INFO, END; the unmapped list is dropped
HVM tail                   HVM_PARAMS(IOREQ_PFN, BUFIOREQ_PFN, STORE_PFN), HVM_CONTEXT, END
device-model record        libxl format: EMULATOR_CONTEXT(id 0, index 0); libxc format: the
                           record as "DeviceModelRecord0002" + u32 length + state after the END
                           unless skip_qemu; all three signatures are accepted (Xen: only 0002)
end of stream              libxl format: libxl END
=========================  ===================================================================

Checkpointed (Remus) v1 streams. Checkpoint 1 streams straight through, as Xen's converter does.
Its closing records are held back until it is known whether another checkpoint follows (the
end of input, or LAST_CHECKPOINT in it). A v1 checkpoint 2 or later is provisional until it is
complete, so its pages are journalled in the spool, not written.

* default: the output is the state of the last complete checkpoint, as the 4.5 restorer commits
  it. Each complete later checkpoint is folded into the spool's per-pfn state (latest content
  wins, bounded by the guest's size); at the end the spooled pages follow checkpoint 1's as more
  PAGE_DATA (v2 restore: the last copy of a pfn wins), then the closing records of the last
  complete checkpoint. An incomplete final checkpoint is dropped, as the restorer drops it.
* ``checkpoints``: a v2 checkpointed stream. Every complete checkpoint ends with its closing
  records and CHECKPOINT (libxl: emulator records and CHECKPOINT_END); later checkpoints are
  written when complete, each with the stream's X86_TSC_INFO again (v1 sends it once); the end of
  input closes with END (libxl: END). LAST_CHECKPOINT turns the closing CHECKPOINT into END.
* ``streaming_remus`` (the service, which cannot spool): the form is chosen when it is known. A
  stream with no checkpoint 2 gives the default output, one whose checkpoint 2 begins gives the
  ``checkpoints`` output (checkpoint 1's closing records, held until then, go out with CHECKPOINT),
  both byte for byte. A later checkpoint's PAGE_DATA records leave as soon as all their pages have
  arrived instead of at the checkpoint's end: the same records in the same order, with at most one
  record's pages held (the spool then only needs a journal that forgets what was sent, and
  ``appended``). An incomplete final checkpoint has then already sent some of its records; a
  checkpoint-aware receiver drops them with the checkpoint, and the driver must not send END then.
"""

from __future__ import annotations

import array
import enum
import struct
from typing import Protocol

import attrs

from xenstream.hv import v1batch
from xenstream.hv.abi import PAGE_SIZE, PAGETYPE_LPINTAB, pagetype_has_data
from xenstream.hv.lazylog import get_logger
from xenstream.legacy import constants as lc
from xenstream.legacy import events as ev
from xenstream.legacy.errors import MalformedStream, UnsupportedStream
from xenstream.v2 import constants as C
from xenstream.v2 import libxl_records as xl_rec
from xenstream.v2 import records as rec
from xenstream.v2.writer import V2Writer, encode
from xenstream.v2.xl_header import XlHeader

log = get_logger(__name__)

CONVERTER_VERSION = 1  # xen_minor of a converted stream: the converter's version, as Xen's writes it
FORMATS = ("libxc", "libxl")
# libxl for an xl save file (xl needs a libxl stream behind its header) and for HVM (only libxl carries
# the device-model state inside the stream), else libxc.
AUTO_FORMAT = "auto"
_GUEST_TYPES = {"pv": C.DOMAIN_TYPE_X86_PV, "hvm": C.DOMAIN_TYPE_X86_HVM}
_HVM_PARAM_STORE_PFN = 1
_HVM_PARAM_IOREQ_PFN = 5
_HVM_PARAM_BUFIOREQ_PFN = 6
_DM_LENGTH = struct.Struct("<I")
_EMULATOR_HEADER_SIZE = 8  # EMULATOR_CONTEXT body: u32 emulator id, u32 index, then the state


class Payload(enum.Enum):
    """Where the payload bytes announced by a PageBatch go; the pipeline moves them there."""

    NOWHERE = "nowhere"  # no payload follows (or the event carried it and it has been routed)
    OUTPUT = "output"  # straight to the output, right after the PAGE_DATA head just written
    JOURNAL = "journal"  # to the spool's journal of the provisional checkpoint


@attrs.frozen
class ConvertOptions:
    fmt: str = "libxc"
    skip_qemu: bool = False
    checkpoints: bool = False
    drop_tmem: bool = False
    streaming_remus: bool = False  # checkpoints form once checkpoint 2 begins, nothing spooled

    def __attrs_post_init__(self):
        if self.fmt not in (*FORMATS, AUTO_FORMAT):
            raise ValueError(f"format must be one of {FORMATS} or {AUTO_FORMAT!r}")
        if self.streaming_remus and self.checkpoints:
            raise ValueError("streaming_remus chooses the checkpoints form itself")


class Spool(Protocol):
    """Page storage for provisional checkpoints (implemented over temporary files by the pipeline).

    The journal holds the data pages of the checkpoint being read, appended in stream order; the
    state holds the latest content of every pfn of the complete later checkpoints. With
    streaming_remus only the journal is used, and it also tells how many bytes were `appended`
    since its reset (the sent ones may be forgotten).
    """

    def journal_append(self, data) -> None: ...

    def journal_reset(self) -> None: ...

    def store_from_journal(self, pfn: int, journal_offset: int) -> None: ...

    def send_journal(self, offset: int, length: int) -> None: ...

    def send_state(self, pfns: list[int]) -> None: ...


@attrs.define
class _Closing:
    """What a complete checkpoint still has to say, once it is known how the stream goes on."""

    libxc: list[bytes] = attrs.Factory(list)  # encoded records before END / CHECKPOINT
    libxl: list[bytes] = attrs.Factory(list)  # encoded libxl records after the libxc stream
    raw_device_model: bytes | None = None  # libxc format: the v1 record copied after END


@attrs.frozen
class Summary:
    checkpoints: int
    discarded_checkpoint_offset: int | None
    dropped_tmem_pages: int
    dropped_tmem_pools: int
    dropped_tmem_invalidations: int
    pages: int
    finished: bool


class Transformer:
    """Feed legacy events in stream order with `handle`; a PageBatch returns where its payload goes."""

    def __init__(self, writer: V2Writer, options: ConvertOptions = ConvertOptions(), spool_factory=None,
                 before_end=None):
        """before_end: called just before the libxc END is written; raising there keeps END out."""
        self.writer = writer
        self._before_end = before_end
        self.options = options
        self._libxl = options.fmt == "libxl"
        self._spool_factory = spool_factory
        self._spool: Spool | None = None
        self._guest: str | None = None
        self._p2m_size = 0
        self._checkpoint = 1
        self._destination = Payload.NOWHERE
        self._hvm_params: list[tuple[int, int]] = []
        self._xenstore = b""
        self._tail: list[bytes] = []
        self._device_model: bytearray | None = None
        self._device_model_signature = b""
        self._held: _Closing | None = None
        self._tsc: rec.X86TscInfo | None = None
        # The provisional checkpoint's entries as v2 pfn words, in stream order (8 bytes each: a checkpoint
        # may dirty the whole guest); its data pages are journalled in the same order.
        self._journal = array.array("Q")
        self._journal_sent = 0  # journal bytes already written out (streaming_remus)
        self._every_checkpoint = options.checkpoints  # the checkpoints form (streaming_remus: from checkpoint 2)
        self._checkpoint_2_pending = False  # streaming_remus: checkpoint 1 closed, its closing held
        # Per-pfn type of the spooled state (0 = not spooled, else type + 1), in windows of _STATE_SCAN pfns
        # allocated when first touched: memory follows the pages spooled, not the highest pfn (one hostile
        # page at pfn 0x0FFFFFFE cost 256 MiB and a 6 s scan).
        self._state_types: dict[int, bytearray] = {}
        self._tmem_pages = 0
        self._tmem_pools = 0
        self._tmem_invalidations = 0
        self._pages = 0
        self._discarded_offset: int | None = None
        self.finished = False

    # ------------------------------------------------------------------ driver interface

    def handle(self, event: ev.Event) -> Payload:
        if self.finished:
            return Payload.NOWHERE
        if self._checkpoint_2_pending and type(event) not in _AFTER_THE_LAST_CHECKPOINT:
            self._begin_checkpoint_2()
        return self._HANDLERS[type(event)](self, event) or Payload.NOWHERE

    def summary(self) -> Summary:
        return Summary(
            checkpoints=self._checkpoint - 1,
            discarded_checkpoint_offset=self._discarded_offset,
            dropped_tmem_pages=self._tmem_pages,
            dropped_tmem_pools=self._tmem_pools,
            dropped_tmem_invalidations=self._tmem_invalidations,
            pages=self._pages,
            finished=self.finished,
        )

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            if self._spool_factory is None:
                raise UnsupportedStream("a checkpointed stream needs a page spool and none was provided")
            self._spool = self._spool_factory()
        return self._spool

    # ------------------------------------------------------------------ wrappers and headers

    def _xl_header(self, event: ev.XlHeader) -> None:
        if self.options.fmt == AUTO_FORMAT:
            self._libxl = True
        if not self._libxl:
            # xl reads what follows its header as a legacy stream unless STREAMV2 is set, and with it as
            # a libxl stream: a bare libxc stream behind it is unreadable either way.
            log.info("xl header dropped: only a libxl stream can follow it", offset=event.offset)
            return
        self.writer.xl_header(XlHeader(mandatory_flags=event.mandatory_flags | C.XL_FLAG_STREAMV2,
                                       optional_flags=event.optional_flags, optional_data=event.optional_data))

    def _foreign_wrapper(self, event: ev.Event) -> None:
        log.info("wrapper not carried over into the v2 output", wrapper=type(event).__name__)

    def _detected(self, event: ev.Detected) -> None:
        self._guest = event.guest
        for evidence in event.evidence:
            log.info("stream variant", what=evidence.what, value=evidence.value, source=evidence.source,
                     reason=evidence.reason)
        if self.options.fmt == AUTO_FORMAT and event.guest == "hvm":
            self._libxl = True

    def _p2m_size_event(self, event: ev.P2mSize) -> None:
        self._p2m_size = event.p2m_size
        if self._libxl:
            self.writer.libxl_header(xl_rec.LibxlHeader(options=C.LIBXL_OPTION_LEGACY))
            self.writer.libxl_record(xl_rec.LibxcContext())
        self.writer.image_header(rec.ImageHeader(version=3))
        self.writer.domain_header(rec.DomainHeader(guest_type=_GUEST_TYPES[self._guest], xen_major=0,
                                                   xen_minor=CONVERTER_VERSION))
        if self._guest == "hvm":
            self.writer.record(rec.StaticDataEnd())

    def _extended_info(self, event: ev.ExtendedInfo) -> None:
        for block in event.blocks:
            if block.block_id == lc.EXT_BLOCK_VCPU:
                width, levels = lc.GUEST_BY_VCPU_CONTEXT_SIZE[len(block.data)]
                self.writer.record(rec.X86PvInfo(guest_width=width, pt_levels=levels))
            elif block.block_id not in (lc.EXT_BLOCK_EXTV, lc.EXT_BLOCK_XCNT):
                log.warning("unknown extended-info block skipped", block=block.block_id, offset=event.offset)
        self.writer.record(rec.StaticDataEnd())

    def _p2m_frames(self, event: ev.P2mFrames) -> None:
        self.writer.record(rec.X86PvP2mFrames(start_pfn=0, end_pfn=self._p2m_size - 1, frames=event.frames))

    # ------------------------------------------------------------------ pages

    def _page_batch(self, event: ev.PageBatch) -> Payload:
        words = _v2_pfn_words(event.entries, event.offset)
        if event.compressed:  # Format B: the pages come as DecodedPages
            self._journal.frombytes(words)
            return Payload.NOWHERE
        self._pages += event.data_pages
        if self._checkpoint == 1:
            if words:
                # What v2.writer.encode_page_data_header gives for these pfns and types (the tests hold it
                # to that), without its per-entry validation: the parser has checked every entry already.
                length = 8 + len(words) + event.data_pages * PAGE_SIZE
                self.writer.write(_PAGE_DATA_HEAD.pack(C.REC_PAGE_DATA, length, len(words) // 8, 0), words)
            self._destination = Payload.OUTPUT
        else:
            self._journal.frombytes(words)
            self._destination = Payload.JOURNAL
        if event.payload is not None:
            self._page_data(ev.PageData(data=event.payload))
            return Payload.NOWHERE
        return self._destination if event.payload_length else Payload.NOWHERE

    def _page_data(self, event: ev.PageData) -> None:
        if self._destination is Payload.OUTPUT:
            self.writer.write(event.data)
        else:
            self.spool.journal_append(event.data)
            self._send_filled_records()

    def _decoded_pages(self, event: ev.DecodedPages) -> None:
        self._pages += len(event.entries)
        self.spool.journal_append(event.payload)
        self._send_filled_records()

    # ------------------------------------------------------------------ chunks

    def _ignored(self, event: ev.Event) -> None:
        pass

    def _hvm_param(self, event: ev.HvmParam) -> None:
        if self._guest != "hvm":
            raise MalformedStream(f"HVM parameter chunk {event.name} in a PV stream", event.offset)
        self._hvm_params.append((event.param_index, event.value))

    def _tsc_info(self, event: ev.TscInfo) -> None:
        self._tsc = rec.X86TscInfo(mode=event.tsc_mode, khz=event.gtsc_khz, nsec=event.elapsed_nsec,
                                   incarnation=event.incarnation)
        if self._checkpoint == 1:
            self.writer.record(self._tsc)

    def _toolstack(self, event: ev.Toolstack) -> None:
        if not self._libxl or not event.data:
            return
        if event.libxl is None:
            raise MalformedStream("TOOLSTACK data is not libxl's physmap blob (version 1)", event.offset)
        self._xenstore = b"".join(_physmap_keys(entry) for entry in event.libxl.entries)

    def _tmem(self, event: ev.Event) -> None:
        if not self.options.drop_tmem:
            chunk = "TMEM_EXTRA (-6)" if isinstance(event, ev.TmemExtraStart) else "TMEM (-5)"
            raise UnsupportedStream(f"chunk {chunk}: v2 streams cannot carry tmem state (--drop-tmem converts without it)",
                                    event.offset)
        if isinstance(event, ev.TmemPool):
            self._tmem_pools += 1
        elif isinstance(event, ev.TmemPage):
            self._tmem_pages += 1
        elif isinstance(event, ev.TmemInvalidation):
            self._tmem_invalidations += 1

    def _end_of_body(self, event: ev.EndOfBody) -> None:
        self._tail = []
        if self._hvm_params:
            params = encode(rec.HvmParams(params=self._hvm_params))
            if self._checkpoint == 1:
                self.writer.write(params)
            else:
                self._tail.append(params)
            self._hvm_params = []

    # ------------------------------------------------------------------ tails

    def _vcpu_record(self, event) -> None:
        record_class = {ev.VcpuBasic: rec.X86PvVcpuBasic, ev.VcpuExtended: rec.X86PvVcpuExtended,
                        ev.VcpuXsave: rec.X86PvVcpuXsave}[type(event)]
        self._tail.append(encode(record_class(vcpu_id=event.vcpu_id, context=event.data)))

    def _shared_info(self, event: ev.SharedInfo) -> None:
        self._tail.append(encode(rec.SharedInfo(data=event.data)))

    def _hvm_magic_pfns(self, event: ev.HvmMagicPfns) -> None:
        self._tail.append(encode(rec.HvmParams(params=[
            (_HVM_PARAM_IOREQ_PFN, event.ioreq_pfn),
            (_HVM_PARAM_BUFIOREQ_PFN, event.bufioreq_pfn),
            (_HVM_PARAM_STORE_PFN, event.store_pfn),
        ])))

    def _hvm_context(self, event: ev.HvmContext) -> None:
        self._tail.append(encode(rec.HvmContext(data=event.data)))

    def _device_model_record(self, event: ev.DeviceModelRecord) -> None:
        keep = self._libxl or not self.options.skip_qemu
        self._device_model = bytearray() if keep else None
        self._device_model_signature = event.signature
        if event.length is not None:
            self._check_device_model_size(event.length, event.offset)

    def _device_model_data(self, event: ev.DeviceModelData) -> None:
        if self._device_model is not None:
            self._check_device_model_size(len(self._device_model) + len(event.data), event.offset)
            self._device_model += event.data

    def _check_device_model_size(self, size: int, offset: int) -> None:
        """libxl format: the state must fit one EMULATOR_CONTEXT record; refused before it is gathered."""
        limit = C.RECORD_LENGTH_MAX - _EMULATOR_HEADER_SIZE
        if self._libxl and size > limit:
            raise UnsupportedStream(f"device-model state of {size} bytes or more does not fit one v2 "
                                    f"EMULATOR_CONTEXT record ({limit} bytes at most)", offset)

    def _checkpoint_end(self, event: ev.CheckpointEnd) -> None:
        closing = _Closing(libxc=self._tail)
        if self._libxl and self._xenstore:
            closing.libxl.append(encode(xl_rec.EmulatorXenstoreData(
                emulator_id=C.EMULATOR_UNKNOWN, index=0, data=self._xenstore)))
        if self._device_model is not None:
            state = bytes(self._device_model)
            if self._libxl:
                closing.libxl.append(encode(xl_rec.EmulatorContext(emulator_id=C.EMULATOR_UNKNOWN, index=0, data=state)))
            else:
                closing.raw_device_model = lc.DM_SIG_LIBXL + _DM_LENGTH.pack(len(state)) + state
            if self._device_model_signature != lc.DM_SIG_LIBXL:
                log.info("device-model record converted", signature=self._device_model_signature.decode(), length=len(state))
        self._tail = []
        self._device_model = None
        later = self._checkpoint > 1
        self._checkpoint += 1
        if self._every_checkpoint:
            if later:
                self._write_journal()
                if self._tsc is not None:
                    self.writer.record(self._tsc)
            if event.last:  # nothing follows: the plain ending (_finish writes the closing records)
                self._finish(closing)
                return
            self.writer.write(*closing.libxc)
            self._close_checkpoint(closing)
            return
        if later:
            self._commit_journal()
        self._held = closing
        if event.last:
            self._finish_default()
        elif self.options.streaming_remus:
            self._checkpoint_2_pending = True

    def _close_checkpoint(self, closing: _Closing) -> None:
        """The checkpoints form's CHECKPOINT (libxl: its records and CHECKPOINT_END) after the libxc records."""
        self.writer.record(rec.Checkpoint())
        if self._libxl:
            self.writer.write(*closing.libxl)
            self.writer.libxl_record(xl_rec.CheckpointEnd())
        self._held = _Closing(raw_device_model=closing.raw_device_model)

    def _begin_checkpoint_2(self) -> None:
        """streaming_remus: a checkpoint 2 follows, so this is a Remus stream; checkpoint 1 closes as in
        the checkpoints form."""
        self._checkpoint_2_pending = False
        self._every_checkpoint = True
        self.writer.write(*self._held.libxc)
        self._close_checkpoint(self._held)

    def _end_of_stream(self, event: ev.EndOfStream) -> None:
        if not event.last_checkpoint_complete:
            self._discarded_offset = event.discarded_offset
            log.warning("incomplete final checkpoint dropped, as the restorer drops it",
                        checkpoint=self._checkpoint, offset=event.discarded_offset)
            self._reset_journal()
            if self._checkpoint_2_pending:  # the receiver keeps checkpoint 1: it must be closed as such
                self._begin_checkpoint_2()
        if self._held is None:
            raise MalformedStream("the stream ended before its first checkpoint was complete", event.offset)
        if self._every_checkpoint:
            self._finish(self._held)
        else:
            self._finish_default()

    # ------------------------------------------------------------------ spool

    def _commit_journal(self) -> None:
        """Fold the just-completed checkpoint into the spooled state."""
        types = self._state_types
        offset = 0
        for word in self._journal:
            pfn, page_type = word & C.PFN_MASK, word >> C.PFN_TYPE_SHIFT
            window = types.get(pfn // _STATE_SCAN)
            if window is None:
                window = types[pfn // _STATE_SCAN] = bytearray(_STATE_SCAN)
            window[pfn % _STATE_SCAN] = page_type + 1
            if pagetype_has_data(page_type):
                self.spool.store_from_journal(pfn, offset)
                offset += PAGE_SIZE
        self._reset_journal()

    def _write_journal(self, whole: bool = True) -> None:
        """Write the provisional checkpoint's pages as PAGE_DATA records of MAX_BATCH_SIZE entries (the
        last one shorter): all of them when it is complete (`whole`), else the full records whose pages
        have all arrived."""
        journal, start = self._journal, 0
        while start < len(journal):
            batch = journal[start : start + C.MAX_BATCH_SIZE]
            types = [w >> C.PFN_TYPE_SHIFT for w in batch]
            if not whole and (len(batch) < C.MAX_BATCH_SIZE or self.spool.appended <
                              self._journal_sent + PAGE_SIZE * sum(map(pagetype_has_data, types))):
                break
            length = self.writer.page_data_header([w & C.PFN_MASK for w in batch], types)
            if length:
                self.spool.send_journal(self._journal_sent, length)
                self.writer.payload_written(length)
                self._journal_sent += length
            start += len(batch)
        if whole:
            self._reset_journal()
        else:
            del journal[:start]

    def _send_filled_records(self) -> None:
        if self.options.streaming_remus and self._checkpoint > 1:
            self._write_journal(whole=False)

    def _reset_journal(self) -> None:
        self._journal = array.array("Q")
        self._journal_sent = 0
        if self._spool is not None:
            self._spool.journal_reset()

    def _write_state(self) -> None:
        """The spooled pages, ascending pfns, 1024 entries a record (a page table of the state at a time)."""
        types = self._state_types
        pfns: list[int] = []
        for index in sorted(types):
            base = index * _STATE_SCAN
            pfns.extend(base + i for i, t in enumerate(types[index]) if t)
            while len(pfns) >= C.MAX_BATCH_SIZE:
                self._write_state_batch(pfns[: C.MAX_BATCH_SIZE])
                del pfns[: C.MAX_BATCH_SIZE]
        if pfns:
            self._write_state_batch(pfns)

    def _write_state_batch(self, pfns: list[int]) -> None:
        page_types = [self._state_types[pfn // _STATE_SCAN][pfn % _STATE_SCAN] - 1 for pfn in pfns]
        length = self.writer.page_data_header(pfns, page_types)
        if length:
            self.spool.send_state([p for p, t in zip(pfns, page_types) if pagetype_has_data(t)])
            self.writer.payload_written(length)

    # ------------------------------------------------------------------ the end

    def _finish_default(self) -> None:
        self._write_state()
        self._finish(self._held)

    def _finish(self, closing: _Closing) -> None:
        self.writer.write(*closing.libxc)
        if self._before_end is not None:
            self._before_end()
        self.writer.record(rec.End())
        if self._libxl:
            self.writer.write(*closing.libxl)
            self.writer.libxl_record(xl_rec.LibxlEnd())
        elif closing.raw_device_model is not None:
            self.writer.write(closing.raw_device_model)
        self.finished = True
        if self._tmem_pools or self._tmem_pages or self._tmem_invalidations:
            log.warning("tmem state dropped", pools=self._tmem_pools, pages=self._tmem_pages,
                        invalidations=self._tmem_invalidations)

    _HANDLERS = {
        ev.XlHeader: _xl_header,
        ev.XendHeader: _foreign_wrapper,
        ev.LibvirtHeader: _foreign_wrapper,
        ev.XenopsHeader: _foreign_wrapper,
        ev.Detected: _detected,
        ev.P2mSize: _p2m_size_event,
        ev.ExtendedInfo: _extended_info,
        ev.P2mFrames: _p2m_frames,
        ev.PageBatch: _page_batch,
        ev.PageData: _page_data,
        ev.DecodedPages: _decoded_pages,
        ev.EnableVerifyMode: _ignored,
        ev.VcpuInfo: _ignored,
        ev.HvmParam: _hvm_param,
        ev.TscInfo: _tsc_info,
        ev.LastCheckpoint: _ignored,
        ev.EnableCompression: _ignored,
        ev.CompressedData: _ignored,
        ev.Toolstack: _toolstack,
        ev.TmemHeader: _tmem,
        ev.TmemPool: _tmem,
        ev.TmemPage: _tmem,
        ev.TmemPoolPagesEnd: _tmem,
        ev.TmemEnd: _tmem,
        ev.TmemExtraStart: _tmem,
        ev.TmemInvalidation: _tmem,
        ev.TmemExtraEnd: _tmem,
        ev.EndOfBody: _end_of_body,
        ev.UnmappedPfns: _ignored,
        ev.VcpuBasic: _vcpu_record,
        ev.VcpuExtended: _vcpu_record,
        ev.VcpuXsave: _vcpu_record,
        ev.SharedInfo: _shared_info,
        ev.HvmMagicPfns: _hvm_magic_pfns,
        ev.HvmContext: _hvm_context,
        ev.DeviceModelRecord0002: _device_model_record,
        ev.RemusDeviceModelState: _device_model_record,
        ev.QemuDeviceModelRecord: _device_model_record,
        ev.XenopsQemuRecord: _device_model_record,
        ev.DeviceModelData: _device_model_data,
        ev.DeviceModelEnd: _ignored,
        ev.CheckpointEnd: _checkpoint_end,
        ev.XlGoMessage: _ignored,
        ev.TrailingData: _ignored,
        ev.EndOfStream: _end_of_stream,
    }


# Events that may follow the last checkpoint: any other one after a checkpoint begins the next.
_AFTER_THE_LAST_CHECKPOINT = frozenset({ev.EndOfStream, ev.XlGoMessage, ev.TrailingData})

# Per byte of the top byte of a v1 pfn_type entry (little endian: bits 24-31): the PFN bits it keeps, and the
# v2 type nibble it gives in the top byte of the 64-bit word (LPINTAB without a level is read as NOTAB).
_PFN_PART = bytes(b & 0x0F for b in range(256))
_V2_TYPE_PART = bytes(0 if b >> 4 == PAGETYPE_LPINTAB else b & 0xF0 for b in range(256))
_PAGE_DATA_HEAD = struct.Struct("<IIII")  # record type, length, count, reserved
_STATE_SCAN = 1 << 16  # pfns of the spooled state looked at per step when writing it out


def _v2_pfn_words(entries, offset: int) -> bytearray:
    """The PAGE_DATA pfn words (little-endian u64) for a v1 batch: bare XTAB entries dropped, the type
    nibble moved from bits 28-31 to 60-63, LPINTAB alone read as NOTAB. Byte-slice operations only:
    this runs once per 4 MiB of pages on the converter's hot path (compiled in xenstream.hv.v1batch)."""
    words = v1batch.legacy_batch_words(entries, entries.itemsize)
    if words is not None:
        return words
    if lc.XTAB_ENTRY in entries:
        entries = array.array(entries.typecode, [entry for entry in entries if entry != lc.XTAB_ENTRY])
    raw = entries.tobytes()
    size = entries.itemsize
    words = bytearray(8 * len(entries))
    for byte in range(3):
        words[byte::8] = raw[byte::size]
    top = raw[3::size]
    words[3::8] = top.translate(_PFN_PART)
    if len(set(memoryview(words).cast("Q"))) != len(entries):  # type bits not set yet: PFNs alone
        raise MalformedStream("duplicate pfn in one page batch", offset)
    words[7::8] = top.translate(_V2_TYPE_PART)
    return words


def _physmap_keys(entry: ev.PhysmapEntry) -> bytes:
    """The xenstore keys libxl's v1 restorer wrote for one physmap entry, NUL-separated as Xen's converter packs them."""
    root = b"physmap/%x" % entry.phys_offset
    pairs = [(root + b"/start_addr", b"%x" % entry.start_addr), (root + b"/size", b"%x" % entry.size)]
    if entry.name is not None:
        name = entry.name[:-1] if entry.name.endswith(b"\0") else entry.name
        pairs.append((root + b"/name", name))
    return b"".join(key + b"\0" + value + b"\0" for key, value in pairs)
