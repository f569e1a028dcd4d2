"""The legacy (v1) live save engine: Xen 4.5's xc_domain_save with the live flag (spec legacy-v1-stream 2.5).

    result = save_pv_legacy_live(hv, domid, sink, toolstack_width=64, suspend=callback,
                                 clock=clock, guest_runs=step, on_round=report)

Stream: p2m_size, the extended-info block and the P2M frame list, then page batches of iterations
1 .. n-1 while the guest runs (each iteration scans pfns in ascending order and sends the pages dirtied
since the previous one, so a pfn may appear many times), then, once the saver decides to stop, the
suspend, TSC_INFO and the batches of the last iteration, then VCPU_INFO, TOOLSTACK, LAST_CHECKPOINT, the
terminator and the PV tail as in a non-live save. The last occurrence of a pfn wins.

The loop, as 4.5 ran it:

* log-dirty on, then a CLEAN to start tracking from now; iteration 1 has every pfn to send;
* in every iteration but the last, Xen's bitmap is PEEKed before each batch and pages already dirtied
  again are skipped (they are in the next iteration anyway);
* a pfn not in the pseudo-physical map (ballooned out) is not sent but remembered ("to_fix"): the last
  iteration sends it if it is mapped again by then, otherwise it is listed in the tail's unmapped pfns;
* a pagetable entry naming a frame outside the guest sends frame 0 while live (the page is dirtied again
  when the guest fixes the entry), and is fatal in the last iteration;
* stop after `max_iters` (29) iterations, or when an iteration sent and skipped fewer than 50 pages, or
  when more than `max_factor` (3) times p2m_size pages were sent in total.

`clock.now()` times iterations; `guest_runs(nbytes)` is called after every batch while the guest is live.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from xenstream.hv import abi
from xenstream.hv.guestview import GuestStateError, PvGuestView, hypervisor_call, shadow_off_afterwards
from xenstream.hv.interface import Hypervisor, HypervisorError
from xenstream.hv.lazylog import get_logger
from xenstream.legacy import constants as c
from xenstream.legacy import events as ev
from xenstream.legacy.save import TOOLSTACK_WIDTHS, LegacySaveError, _LegacyPvSaver
from xenstream.legacy.writer import LegacyWriter

log = get_logger(__name__)

MAX_ITERS = 29
MAX_FACTOR = 3
STOP_BELOW = 50


@attrs.frozen
class LegacyIteration:
    """One iteration: `sent` pages that went out, `skipped` dirty pages left for the next iteration,
    `fix_later` pfns not in the pseudo-physical map; the last iteration has `live` False."""

    number: int
    live: bool
    sent: int
    skipped: int
    fix_later: int
    bytes: int
    seconds: float

    def as_dict(self) -> dict:
        return attrs.asdict(self)


@attrs.frozen
class LegacyLiveSaveResult:
    toolstack_width: int
    guest_width: int
    p2m_size: int
    iterations: tuple[LegacyIteration, ...]
    unmapped_pfns: int
    bytes_written: int
    seconds: float

    @property
    def final_pages(self) -> int:
        return self.iterations[-1].sent

    @property
    def total_pages(self) -> int:
        return sum(i.sent for i in self.iterations)

    def as_dict(self) -> dict:
        return {"policy": "xen-4.5", "p2m_size": self.p2m_size,
                "live_rounds": sum(i.live for i in self.iterations), "final_pages": self.final_pages,
                "total_pages": self.total_pages,
                "traffic_multiple": round(self.total_pages / self.p2m_size, 4) if self.p2m_size else 0.0,
                "unmapped_pfns": self.unmapped_pfns, "bytes": self.bytes_written, "seconds": self.seconds,
                "rounds": [i.as_dict() for i in self.iterations]}


class _CountingSink:
    def __init__(self, sink) -> None:
        self.sink = sink
        self.position = 0

    def write(self, data) -> int:
        self.sink.write(data)
        self.position += memoryview(data).nbytes
        return memoryview(data).nbytes


def _set(bits: bytearray, pfn: int) -> None:
    bits[pfn >> 3] |= 1 << (pfn & 7)


def _clear(bits: bytearray, pfn: int) -> None:
    bits[pfn >> 3] &= ~(1 << (pfn & 7)) & 0xFF


def _test(bits: bytes | bytearray, pfn: int) -> bool:
    return bool(bits[pfn >> 3] >> (pfn & 7) & 1)


class _LegacyLiveSaver(_LegacyPvSaver):
    live = True

    def __init__(self, hv: Hypervisor, domid: int, writer: LegacyWriter, sink: _CountingSink, toolstack_width: int,
                 suspend: Callable[[], bool], refuse_msrs: bool, clock, guest_runs, on_round) -> None:
        super().__init__(hv, domid, writer, toolstack_width, suspend, refuse_msrs)
        self.sink = sink
        self.clock = clock
        self.guest_runs = guest_runs
        self.on_round = on_round
        self.iterations: list[LegacyIteration] = []

    def run(self) -> LegacyLiveSaveResult:
        hv, domid = self.hv, self.domid
        started = self.clock.now() if self.clock else 0.0
        try:
            view = PvGuestView.open(hv, domid)
        except GuestStateError as exc:
            raise LegacySaveError(str(exc)) from exc
        p2m_size = self._p2m_size(view)
        self._write_head(view, p2m_size)
        self.p2m_size = p2m_size
        nbytes = (p2m_size + 7) >> 3
        to_send = bytearray(b"\xff" * nbytes)
        to_skip = bytearray(nbytes)
        to_fix = bytearray(nbytes)
        try:
            hv.logdirty_enable(domid)
            hv.logdirty_clean(domid, to_skip, p2m_size)  # 4.5's analysis phase: start tracking from now
        except HypervisorError as exc:
            raise LegacySaveError(f"cannot enable log-dirty mode: {exc}") from exc
        self.m2p_mfn0 = hv.compat_m2p_first_mfn() if self.width == 32 and view.levels == 3 else None
        total_sent = 0
        last_iter = False
        while True:
            sent, skipped = self._iteration(view, to_send, to_skip, to_fix, last_iter)
            total_sent += sent
            if last_iter:
                break
            if len(self.iterations) >= MAX_ITERS or sent + skipped < STOP_BELOW or total_sent > p2m_size * MAX_FACTOR:
                last_iter = True
                if not self.suspend():
                    raise LegacySaveError("the suspend callback failed")
                if not view.refresh_info().suspended:
                    raise LegacySaveError(f"domain {domid} is not shut down for suspend")
                tsc = hypervisor_call("TSC info", hv.get_tsc_info, domid)
                self.writer.write(ev.TscInfo(tsc_mode=tsc.mode, elapsed_nsec=tsc.nsec, gtsc_khz=tsc.khz,
                                             incarnation=tsc.incarnation))
            try:
                hv.logdirty_clean(domid, to_send, p2m_size)
            except HypervisorError as exc:
                raise LegacySaveError(f"log-dirty CLEAN failed: {exc}") from exc
        unmapped = [pfn for pfn, mfn in enumerate(view.gfns(0, p2m_size)) if mfn == abi.INVALID_MFN]
        self._write_tail(view, self._online_vcpus(view), unmapped)
        return LegacyLiveSaveResult(toolstack_width=self.width, guest_width=view.width, p2m_size=p2m_size,
                                    iterations=tuple(self.iterations), unmapped_pfns=len(unmapped),
                                    bytes_written=self.sink.position,
                                    seconds=(self.clock.now() - started) if self.clock else 0.0)

    def _iteration(self, view: PvGuestView, to_send: bytearray, to_skip: bytearray, to_fix: bytearray,
                   last_iter: bool) -> tuple[int, int]:
        hv, domid, p2m_size = self.hv, self.domid, self.p2m_size
        started = self.clock.now() if self.clock else 0.0
        position = self.sink.position
        self.live = not last_iter
        pages_before = self.pages
        sent = skipped = fix_later = 0
        pfn = 0
        while pfn < p2m_size:
            if not last_iter:
                try:
                    hv.logdirty_peek(domid, to_skip, p2m_size)
                except HypervisorError as exc:
                    raise LegacySaveError(f"log-dirty PEEK failed: {exc}") from exc
            batch = []
            while pfn < p2m_size and len(batch) < c.MAX_BATCH_SIZE:
                n = pfn
                pfn += 1
                wanted = _test(to_send, n)
                if not last_iter and wanted and _test(to_skip, n):
                    skipped += 1
                    continue
                if not (wanted or (last_iter and _test(to_fix, n))):
                    continue
                mfn = view.p2m[n]
                if mfn == abi.INVALID_MFN:
                    _set(to_fix, n)
                    fix_later += 1
                    continue
                _clear(to_fix, n)
                batch.append((n, mfn))
            if batch:
                record_start = self.sink.position
                self._send_batch(view, batch, self.m2p_mfn0)
                sent += len(batch)
                if not last_iter and self.guest_runs is not None:
                    self.guest_runs(self.sink.position - record_start)
        report = LegacyIteration(number=len(self.iterations) + 1, live=not last_iter, sent=self.pages - pages_before,
                                 skipped=skipped, fix_later=fix_later, bytes=self.sink.position - position,
                                 seconds=(self.clock.now() - started) if self.clock else 0.0)
        self.iterations.append(report)
        log.info("legacy live save iteration", **report.as_dict())
        if self.on_round is not None:
            self.on_round(report)
        return sent, skipped


def save_pv_legacy_live(hv: Hypervisor, domid: int, sink, *, toolstack_width: int = 64, suspend: Callable[[], bool],
                        clock=None, guest_runs: Callable[[int], None] | None = None,
                        on_round: Callable[[LegacyIteration], None] | None = None,
                        refuse_msrs: bool = False) -> LegacyLiveSaveResult:
    """Live-save PV domain `domid` as a v1 stream to `sink` (see the module doc); log-dirty off afterwards."""
    if toolstack_width not in TOOLSTACK_WIDTHS:
        raise ValueError(f"toolstack width must be 32 or 64, not {toolstack_width}")
    counting = _CountingSink(sink)
    writer = LegacyWriter(counting, width=toolstack_width)
    saver = _LegacyLiveSaver(hv, domid, writer, counting, toolstack_width, suspend, refuse_msrs, clock, guest_runs,
                             on_round)
    with shadow_off_afterwards(hv, domid, log, "shadow off failed during legacy live save cleanup"):
        return saver.run()
