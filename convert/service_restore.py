"""The `restore:sim` destination: each stream is restored, as it flows, into a new PV domain of a
simulated Xen host owned by the service (one host per listener).

The v2 restore engine is sans-IO: every buffer the conversion gives out is fed to it at once, so the
restore advances with the stream and backpressure works as for a socket. The engines and the simulator
are not written for concurrent callers, so each call into them holds the host's lock; streams to the
same host interleave record by record. A restored domain is reported and then destroyed, so that the
service's memory does not grow with every migration it completes; a failed restore destroys its
half-built domain at once.

Streams are restored by the checkpoint-aware engine (v2/checkpoint.py), which takes plain streams as
they are: a checkpointed (Remus) stream whose source broke off restores the last complete checkpoint
(failover), reported in the log, as a Remus secondary would resume the guest.
"""

from __future__ import annotations

import threading

import structlog

from xenstream.hv import abi
from xenstream.hv.sim.xen import SimXen
from xenstream.v2.checkpoint import CheckpointRestorer
from xenstream.v2.errors import StreamError

MAX_VCPUS = abi.XEN_LEGACY_MAX_VCPUS


class SimulatedHost:
    def __init__(self, frames: int):
        self.frames = frames
        self.xen = SimXen(capacity_frames=frames)
        self.lock = threading.Lock()


class RestoreSink:
    SPLICES = False  # the engine reads every payload byte

    def __init__(self, host: SimulatedHost, connection: int):
        self._host = host
        with host.lock:
            self._domid = host.xen.create_domain(max_vcpus=MAX_VCPUS, max_pages=host.frames)
            try:
                self._restorer = CheckpointRestorer(host.xen, self._domid, store_evtchn=1, console_evtchn=2)
            except BaseException:
                host.xen.destroy_domain(self._domid)
                raise
        self.description = f"simulated domain {self._domid}"
        self._log = structlog.get_logger("xenstream.serve").bind(conn=connection, domain=self._domid)

    def write(self, buffers: list) -> None:
        with self._host.lock:
            for buffer in buffers:
                if len(buffer):  # an empty feed would mean the end of input
                    self._restorer.feed(buffer)

    def commit(self) -> str:
        with self._host.lock:
            try:
                outcome = self._restorer.finish()
            finally:
                self._release()
        return self._describe(outcome)

    def abort(self) -> None:
        """A checkpointed stream broke off: restore its last complete checkpoint, if there is one."""
        with self._host.lock:
            if self._domid is None:  # commit failed and released it
                return
            try:
                if self._restorer.checkpoints:
                    outcome = self._restorer.finish()
                    self._log.warning("restored from the last complete checkpoint", checkpoints=outcome.checkpoints,
                                      reason=outcome.reason, restored=self._describe(outcome))
            except StreamError as exc:
                self._log.warning("failover restore failed", error=exc.message, offset=exc.offset)
            finally:
                self._restorer.close()
                self._release()

    def _describe(self, outcome) -> str:
        result = outcome.result
        checkpoints = f", {outcome.checkpoints} checkpoints" if outcome.checkpoints else ""
        return (f"{self.description}: pv{8 * result.width}, p2m_size {result.max_pfn + 1:#x}, "
                f"{result.pages_populated} pages populated, {result.pages_written} written{checkpoints}")

    def interrupt(self) -> None:
        """Restoring never blocks on a peer; the worker notices the abort at its next read."""

    def _release(self) -> None:
        if self._domid is not None:
            self._host.xen.destroy_domain(self._domid)
            self._domid = None
