"""The native v2 live save engine for PV guests (spec save-restore-engines 4.1-4.4, 4.6, 4.7).

    result = save_pv_live(hv, domid, writer, suspend=callback, policy=XenPolicy(),
                          clock=clock, guest_runs=step, on_round=report)

Record order (spec 4.6): headers, X86_PV_INFO, CPU policy, STATIC_DATA_END, X86_PV_P2M_FRAMES, PAGE_DATA
of round 1 (every pfn), of rounds 2..k (pfns dirtied meanwhile), then after `suspend()` the final pass
(dirty + deferred pfns), X86_TSC_INFO, SHARED_INFO, the vcpu records and END. A pfn may appear many
times; nothing in the stream marks rounds.

* Log-dirty is switched on before round 1 (retried once after shadow-off, as Xen does) and off at the end
  whatever happens.
* The loop follows Xen's `send_memory_live`: the policy is asked before each round with the dirty count
  and after it with -1; Xen's own policy (`xenstream.v2.policy.XenPolicy`) gives Xen's behaviour exactly.
* A pfn whose P2M entry is INVALID (ballooned out) when its batch is built, or whose pagetable does not
  normalise because an entry is in flux, goes out as XTAB and is remembered as *deferred*: the final pass
  sends it again (spec 4.4, 3.4-3.5). A linear P2M whose generation changes while live aborts the save.
* Checkpointed (Remus) streams with `checkpoint=`: after the first checkpoint's tail come a CHECKPOINT
  record (and with `libxl=True` a libxl CHECKPOINT_END); then `checkpoint(n)` runs (the toolstack resumes
  the guest and waits for the next interval) and, while it returns True, the next checkpoint is only
  suspend + CLEAN + the dirty pages + the tail. As in Xen today, no END is written: the stream stops.

`clock.now()` (seconds) times the rounds; `guest_runs(nbytes)` is called after every PAGE_DATA record
with its size, while the guest is live, so a simulated guest runs in step with the migration.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

import attrs

from xenstream.hv import abi, kernels
from xenstream.hv.guestview import GuestStateError, PvGuestView, hypervisor_call, shadow_off_afterwards
from xenstream.hv.interface import Hypervisor, HypervisorError
from xenstream.hv.lazylog import get_logger
from xenstream.hv.pagetables import NORMALISE_BAD_MFN, NORMALISE_OK
from xenstream.v2 import constants as C
from xenstream.v2.libxl_records import CheckpointEnd, LibxcContext, LibxlEnd, LibxlHeader
from xenstream.v2.policy import ABORT, CONTINUE, DECISION_NAMES, STOP_NOW, PrecopyStats, RoundHistory, XenPolicy
from xenstream.v2.records import (
    Checkpoint,
    DomainHeader,
    End,
    ImageHeader,
    SharedInfo,
    StaticDataEnd,
    X86PvInfo,
    X86PvP2mFrames,
    X86TscInfo,
)
from xenstream.v2.save import (
    _DATALESS_CODES,
    _KNOWN_CODES,
    _TABLE_CODES,
    STREAM_VERSION,
    SaveError,
    _first_bad_entry,
    page_data_head_codes,
    page_data_head_of,
    policy_records,
    vcpu_records,
    writev_all,
)
from xenstream.v2.writer import V2Writer, encode_record

log = get_logger(__name__)

_DATALESS_OR_TABLE_CODES = _DATALESS_CODES | _TABLE_CODES
_XTAB = abi.PFINFO_XTAB >> abi.PFINFO_LTAB_SHIFT
_SET_BITS = [tuple(b for b in range(8) if byte >> b & 1) for byte in range(256)]


class _NoClock:
    def now(self) -> float:
        return 0.0


@attrs.frozen
class RoundReport:
    """One pass over memory: `number` from 1; `live` False for the final (stop-and-copy) pass.

    `dirty`: pages Xen reported for this round (round 1: every pfn); `sent`: pages whose contents went
    out; `entries`: PAGE_DATA entries (also XTAB and other types without data); `skipped`: dirty pages not sent because the guest had dirtied
    them again (ours only); `deferred`: pfns sent as XTAB to be retried; `decision`: the policy's
    answer before the round.
    """

    number: int
    live: bool
    dirty: int
    sent: int
    entries: int
    skipped: int
    deferred: int
    bytes: int
    seconds: float
    decision: str

    def as_dict(self) -> dict:
        return attrs.asdict(self)


@attrs.frozen
class LiveSaveResult:
    policy: str
    p2m_size: int
    rounds: tuple[RoundReport, ...]
    checkpoints: int
    bytes_written: int
    seconds: float

    @property
    def live_rounds(self) -> int:
        return sum(r.live for r in self.rounds)

    @property
    def final_pages(self) -> int:
        """Pages of the first stop-and-copy pass: what the guest's downtime is spent on."""
        return next(r.sent for r in self.rounds if not r.live)

    @property
    def total_pages(self) -> int:
        return sum(r.sent for r in self.rounds)

    def as_dict(self) -> dict:
        return {"policy": self.policy, "p2m_size": self.p2m_size, "live_rounds": self.live_rounds,
                "final_pages": self.final_pages, "total_pages": self.total_pages,
                "traffic_multiple": round(self.total_pages / self.p2m_size, 4) if self.p2m_size else 0.0,
                "checkpoints": self.checkpoints, "bytes": self.bytes_written, "seconds": self.seconds,
                "rounds": [r.as_dict() for r in self.rounds]}


def set_pfns(bitmap: bytearray | bytes, limit: int) -> list[int]:
    """Ascending pfns whose bit is set, below `limit`."""
    out = [(i << 3) | b for i, byte in enumerate(bitmap) if byte for b in _SET_BITS[byte]]
    while out and out[-1] >= limit:
        out.pop()
    return out


def _or_into(target: bytearray, other: bytes | bytearray) -> None:
    merged = int.from_bytes(target, "little") | int.from_bytes(other, "little")
    target[:] = merged.to_bytes(len(target), "little")


class _LiveSaver:
    def __init__(self, hv: Hypervisor, domid: int, writer: V2Writer, suspend: Callable[[], bool], policy,
                 clock, guest_runs: Callable[[int], None] | None, on_round: Callable[[RoundReport], None] | None,
                 libxl: bool, checkpoint: Callable[[int], bool] | None, payload_fd: int | None) -> None:
        self.hv = hv
        self.payload_fd = payload_fd
        self.domid = domid
        self.writer = writer
        self.suspend = suspend
        self.policy = policy
        self.clock = clock or _NoClock()
        self.guest_runs = guest_runs
        self.on_round = on_round
        self.libxl = libxl
        self.checkpoint = checkpoint
        self.rounds: list[RoundReport] = []
        self._history: list[tuple[int, int, float]] = []
        self._bytes_sent = 0
        self._seconds_sending = 0.0

    # ------------------------------------------------------------------ top level

    def run(self) -> LiveSaveResult:
        started = self.clock.now()
        try:
            view = PvGuestView.open(self.hv, self.domid)
        except GuestStateError as exc:
            raise SaveError(str(exc), exc.errno) from exc
        self.view = view
        self.p2m_size = view.p2m_size
        nbytes = (self.p2m_size + 7) >> 3
        self.bitmap = bytearray(nbytes)
        self.deferred = bytearray(nbytes)
        self.peeked = bytearray(nbytes)
        self.generation = self._p2m_generation()
        log.info("live save setup", domid=self.domid, width=view.width, p2m_size=self.p2m_size,
                 policy=self.policy.name, p2m="linear" if view.linear_p2m else "tree")
        self._static_records()
        self._enable_logdirty()
        self._live_loop()
        checkpoints = 0
        while True:
            self._final_pass()
            self._tail()
            if self.checkpoint is None:
                self.writer.record(End())
                if self.libxl:
                    self.writer.libxl_record(LibxlEnd())
                break
            self.writer.record(Checkpoint())
            if self.libxl:
                self.writer.libxl_record(CheckpointEnd())
            checkpoints += 1
            self.writer.flush()
            if not self.checkpoint(checkpoints):
                break
        self.writer.flush()
        return LiveSaveResult(policy=self.policy.name, p2m_size=self.p2m_size, rounds=tuple(self.rounds),
                              checkpoints=checkpoints, bytes_written=self.writer.position,
                              seconds=self.clock.now() - started)

    def _static_records(self) -> None:
        view, writer = self.view, self.writer
        version = self.hv.get_xen_version()
        if self.libxl:
            writer.libxl_header(LibxlHeader())
            writer.libxl_record(LibxcContext())
        writer.image_header(ImageHeader(version=STREAM_VERSION))
        writer.domain_header(DomainHeader(guest_type=C.DOMAIN_TYPE_X86_PV, xen_major=version.major,
                                          xen_minor=version.minor))
        writer.record(X86PvInfo(guest_width=view.width, pt_levels=view.levels))
        for record_type, body in policy_records(self.hv, self.domid):
            writer.write(encode_record(record_type, body))
        writer.record(StaticDataEnd())
        writer.record(X86PvP2mFrames(start_pfn=0, end_pfn=view.max_pfn, frames=view.p2m_pfns))

    def _enable_logdirty(self) -> None:
        try:
            self.hv.logdirty_enable(self.domid)
        except HypervisorError:
            hypervisor_call("shadow off", self.hv.shadow_off, self.domid)
            try:
                self.hv.logdirty_enable(self.domid)
            except HypervisorError as exc:
                raise SaveError(f"cannot enable log-dirty mode: {exc}", exc.errno) from exc

    def _clean(self, final: bool) -> int:
        try:
            stats = self.hv.logdirty_clean(self.domid, self.bitmap, self.p2m_size, final)
        except HypervisorError as exc:
            raise SaveError(f"log-dirty CLEAN failed: {exc}", exc.errno) from exc
        if stats.pages != self.p2m_size:
            raise SaveError(f"log-dirty CLEAN reported {stats.pages} pages, expected {self.p2m_size}", errno.EINVAL)
        return stats.dirty_count

    # ------------------------------------------------------------------ live phase (spec 4.2)

    def _decide(self, stats: PrecopyStats) -> int:
        rate = self._bytes_sent / self._seconds_sending if self._seconds_sending > 0 else 0.0
        history = RoundHistory(rounds=tuple(self._history), p2m_size=self.p2m_size, bytes_per_second=rate)
        return self.policy.decide(stats, history)

    def _live_loop(self) -> None:
        self.bitmap[:] = b"\xff" * len(self.bitmap)
        stats = PrecopyStats(iteration=0, total_written=0, dirty_count=self.p2m_size)
        xen_dirty = self.p2m_size
        previous = bytearray(len(self.bitmap))
        self._history.append((xen_dirty, 0, 0.0))
        iteration = 0
        while True:
            decision = self._decide(stats)
            iteration += 1
            if decision in (ABORT, STOP_NOW) or xen_dirty == 0:
                if decision == STOP_NOW:  # this round's dirty pages are not sent live: the final pass takes them
                    _or_into(self.deferred, self.bitmap)
                self._report(iteration, True, xen_dirty, 0, 0, 0, 0, 0, 0.0, decision)
            else:
                self._send_round(iteration, True, xen_dirty, decision, previous)
            if decision != CONTINUE:
                break
            stats = PrecopyStats(iteration=iteration, total_written=stats.total_written + stats.dirty_count,
                                 dirty_count=-1)
            decision = self._decide(stats)
            if decision != CONTINUE:
                break
            previous[:] = self.bitmap
            xen_dirty = self._clean(final=False)
            self._history.append((xen_dirty, 0, 0.0))
            stats = attrs.evolve(stats, dirty_count=xen_dirty)
        if decision == ABORT:
            raise SaveError("the precopy policy aborted the migration", errno.ECANCELED)

    def _send_round(self, number: int, live: bool, dirty: int, decision: int, previous: bytearray) -> None:
        started, position = self.clock.now(), self.writer.position
        pfns = set_pfns(self.bitmap, self.p2m_size)
        if live and self.policy.hot_last:
            pfns = [p for p in pfns if not previous[p >> 3] >> (p & 7) & 1] + \
                   [p for p in pfns if previous[p >> 3] >> (p & 7) & 1]
        sent = entries = skipped = deferred = 0
        for first in range(0, len(pfns), abi.MAX_BATCH_SIZE):
            batch = pfns[first:first + abi.MAX_BATCH_SIZE]
            if live and self.policy.skip_redirtied:
                kept = self._not_redirtied(batch)
                skipped += len(batch) - len(kept)
                batch = kept
            if not batch:
                continue
            record_start = self.writer.position
            data_pages, retried = self._write_batch(batch)
            sent += data_pages
            entries += len(batch)
            deferred += retried
            if live and self.guest_runs is not None:
                self.guest_runs(self.writer.position - record_start)
        if live:
            self._check_generation()
        seconds = self.clock.now() - started
        nbytes = self.writer.position - position
        self._bytes_sent += nbytes
        self._seconds_sending += seconds
        if live:
            self._history[-1] = (dirty, sent, seconds)
        self._report(number, live, dirty, sent, entries, skipped, deferred, nbytes, seconds, decision)

    def _report(self, number: int, live: bool, dirty: int, sent: int, entries: int, skipped: int, deferred: int,
                nbytes: int, seconds: float, decision: int) -> None:
        report = RoundReport(number=number, live=live, dirty=dirty, sent=sent, entries=entries, skipped=skipped,
                             deferred=deferred,
                             bytes=nbytes, seconds=seconds, decision=DECISION_NAMES[decision] if live else "final")
        self.rounds.append(report)
        log.info("live save round", **report.as_dict())
        if self.on_round is not None:
            self.on_round(report)

    def _not_redirtied(self, batch: list[int]) -> list[int]:
        """The PEEK trick: drop pages the guest has dirtied again since this round's CLEAN."""
        try:
            self.hv.logdirty_peek(self.domid, self.peeked, self.p2m_size)
        except HypervisorError as exc:
            raise SaveError(f"log-dirty PEEK failed: {exc}", exc.errno) from exc
        peeked = self.peeked
        return [p for p in batch if not peeked[p >> 3] >> (p & 7) & 1]

    # ------------------------------------------------------------------ final pass and tail (4.3, 3.6-3.7)

    def _final_pass(self) -> None:
        if not self.suspend():
            raise SaveError("the suspend callback failed", errno.EINVAL)
        self._require_suspended()
        dirty = self._clean(final=True)
        _or_into(self.bitmap, self.deferred)
        self.deferred[:] = bytes(len(self.deferred))
        self._send_round(len(self.rounds) + 1, False, dirty, CONTINUE, bytearray(len(self.bitmap)))
        # Pages deferred during the final pass (ballooned out, or a pagetable naming a frame outside the
        # guest) went out as XTAB and are not retried (spec 4.3, 10.1).
        lost = set_pfns(self.deferred, self.p2m_size)
        if lost:
            log.info("final pass sent pages as XTAB", count=len(lost), first=f"{lost[0]:#x}")
        self.deferred[:] = bytes(len(self.deferred))
        self._require_suspended()

    def _require_suspended(self) -> None:
        if not self.view.refresh_info().suspended:
            raise SaveError(f"domain {self.domid} is not shut down for suspend", errno.EINVAL)

    def _tail(self) -> None:
        view, writer = self.view, self.writer
        tsc = hypervisor_call("get TSC info", self.hv.get_tsc_info, self.domid)
        writer.record(X86TscInfo(mode=tsc.mode, khz=tsc.khz, nsec=tsc.nsec, incarnation=tsc.incarnation))
        writer.record(SharedInfo(bytes(view.shared_info)))
        for vcpu_id in range(view.info.max_vcpu_id + 1):
            if hypervisor_call(f"get vcpu{vcpu_id} info", self.hv.get_vcpu_online, self.domid, vcpu_id):
                for record in vcpu_records(view, vcpu_id):
                    writer.record(record)

    # ------------------------------------------------------------------ one PAGE_DATA record (spec 3.4)

    def _write_batch(self, pfns: list[int]) -> tuple[int, int]:
        """Send `pfns` as one PAGE_DATA record; returns (pages with data, entries sent as XTAB to retry)."""
        view, hv, domid = self.view, self.hv, self.domid
        if pfns[-1] - pfns[0] + 1 == len(pfns):  # an ascending run: read the P2M a leaf at a time
            gfns = view.gfns(pfns[0], len(pfns))
        else:
            p2m = view.p2m
            gfns = [p2m[pfn] for pfn in pfns]
        codes = hypervisor_call(f"page-type query of {len(pfns)} pfns from {pfns[0]:#x}", hv.get_page_types, domid, gfns)
        unknown = set(codes) - _KNOWN_CODES
        if unknown:
            i = next(i for i, code in enumerate(codes) if code in unknown)
            raise SaveError(f"unknown page type {codes[i]:#x} for pfn {pfns[i]:#x}")
        if (abi.INVALID_MFN not in gfns and set(codes).isdisjoint(_DATALESS_OR_TABLE_CODES)
                and self._write_plain_batch(pfns, gfns, codes)):
            return len(pfns), 0
        types = [code >> abi.PFINFO_LTAB_SHIFT for code in codes]
        retry = [i for i, gfn in enumerate(gfns) if gfn == abi.INVALID_MFN]
        data_index = [i for i, code in enumerate(codes) if code not in _DATALESS_CODES]
        payloads: list = []
        if data_index:
            mapped = hypervisor_call("map page batch", hv.map_foreign, domid, [gfns[i] for i in data_index])
            if None in mapped:
                i = data_index[mapped.index(None)]
                raise SaveError(f"cannot map pfn {pfns[i]:#x} (mfn {gfns[i]:#x})", errno.EFAULT)
            payloads = list(mapped)
            tables = [k for k, i in enumerate(data_index) if codes[i] in _TABLE_CODES]
            if tables:
                retry += self._normalise(pfns, types, data_index, payloads, tables)
        for i in retry:
            pfn = pfns[i]
            self.deferred[pfn >> 3] |= 1 << (pfn & 7)
            types[i] = _XTAB
        if retry:
            payloads = [page for page in payloads if page is not None]
        self._emit(pfns, types, payloads)
        return len(payloads), len(retry)

    def _write_plain_batch(self, pfns: list[int], gfns, codes) -> bool:
        """The common batch, every entry a plain page with data: mapped as runs of frames and sent with no
        Python work per page. False (nothing written) if some frame does not map: the caller's per-page
        path then names it."""
        runs = hypervisor_call("map page batch", self.hv.map_foreign_runs, self.domid, gfns)
        if sum(run.count for run in runs) != len(gfns):
            return False
        payloads = [run.view for run in runs]
        if self.payload_fd is None:
            self.writer.page_data(pfns, [code >> abi.PFINFO_LTAB_SHIFT for code in codes], payloads)
        else:
            self._writev(page_data_head_codes(pfns, codes), payloads)
        return True

    def _emit(self, pfns: list[int], types: list[int], payloads: list) -> None:
        if self.payload_fd is None:
            self.writer.page_data(pfns, types, payloads)
        else:
            self._writev(page_data_head_of(pfns, types), payloads)

    def _writev(self, head: bytes, payloads: list) -> None:
        """Head and pages in one writev, the pages straight from guest memory."""
        total = len(head) + sum(len(buffer) for buffer in payloads)
        writev_all(self.payload_fd, [head, *payloads], total)
        self.writer.payload_written(total)

    def _normalise(self, pfns, types, data_index, payloads, tables: list[int]) -> list[int]:
        """Normalise the pagetable payloads in place; returns the batch indexes to defer (EAGAIN)."""
        view = self.view
        buffer = bytearray(len(tables) * abi.PAGE_SIZE)
        for n, k in enumerate(tables):
            buffer[n * abi.PAGE_SIZE:(n + 1) * abi.PAGE_SIZE] = payloads[k]
        levels = [types[data_index[k]] & 0x7 for k in tables]
        status = bytearray(len(tables))
        kernels.normalise_pages(view.tables, buffer, levels, status)
        out = memoryview(buffer)
        paused = view.info.paused
        retry = []
        for n, k in enumerate(tables):
            i = data_index[k]
            code = status[n]
            if code == NORMALISE_OK:
                payloads[k] = out[n * abi.PAGE_SIZE:(n + 1) * abi.PAGE_SIZE]
            elif code == NORMALISE_BAD_MFN and not paused:
                payloads[k] = None
                retry.append(i)
            else:
                raise SaveError(f"cannot normalise the L{levels[n]} pagetable at pfn {pfns[i]:#x}: "
                                f"{_first_bad_entry(view, levels[n], payloads[k])}", errno.ERANGE)
        return retry

    # ------------------------------------------------------------------ linear P2M generation (spec 4.4)

    def _p2m_generation(self) -> int | None:
        if not self.view.linear_p2m:
            return None
        layout = abi.SHARED_INFO_LAYOUTS[self.view.width]
        return struct.unpack_from(layout.word, self.view.shared_info, layout.p2m_generation)[0]

    def _check_generation(self) -> None:
        if self.generation is not None and self._p2m_generation() != self.generation:
            raise SaveError("the guest changed its linear P2M during live migration (p2m_generation moved)",
                            errno.EINVAL)


def save_pv_live(hv: Hypervisor, domid: int, writer: V2Writer, suspend: Callable[[], bool], *, policy=None,
                 clock=None, guest_runs: Callable[[int], None] | None = None,
                 on_round: Callable[[RoundReport], None] | None = None, libxl: bool = False,
                 checkpoint: Callable[[int], bool] | None = None, payload_fd: int | None = None) -> LiveSaveResult:
    """Live-migrate PV domain `domid` into `writer` (see the module doc); log-dirty is off afterwards.

    With `payload_fd` (the fd the writer writes to), page payloads go out with writev straight from
    guest memory instead of through the writer.
    """
    saver = _LiveSaver(hv, domid, writer, suspend, policy or XenPolicy(), clock, guest_runs, on_round, libxl,
                       checkpoint, payload_fd)
    with shadow_off_afterwards(hv, domid, log, "shadow off failed during live save cleanup"):
        return saver.run()
