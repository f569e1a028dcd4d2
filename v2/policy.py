"""Stop policies for the live pre-copy loop (spec save-restore-engines 4.2).

The live engine (`xenstream.v2.live`) asks its policy twice per round, the way Xen's
`send_memory_live` does: before sending a round (with the dirty count Xen reported for it) and after
sending it (dirty count -1, "unknown"). The answer is one of

* `CONTINUE` - go on;
* `STOP_AND_COPY` - Xen's meaning: the round about to be sent is still sent live, then the loop ends;
* `STOP_NOW` - ours only: end the loop *without* sending the round live (its pages go in the final
  pass; sending them live first would only resend what the guest dirties again);
* `ABORT` - fail the save.

`XenPolicy` is Xen's built-in policy, exactly: stop-and-copy when `0 <= dirty_count < 50` or when
`iteration >= 5`. `AdaptivePolicy` is ours; besides the decision it asks the engine to

* skip a page that is already dirty again when its batch is sent (the legacy engine's PEEK trick: it will
  be resent in the next round anyway),
* send pages dirty in the previous round too (the recurrently written "hot" set) last in each round, so
  the time they have to get dirty again before the suspend is as short as possible,

and it stops on convergence instead of a fixed round count: it keeps iterating while a round shrinks the
dirty set by at least `shrink` (up to `max_iterations` rounds and `max_traffic` times the guest's pages),
never stops before Xen would on a workload that keeps converging, stops when the dirty set is under
Xen's 50-page threshold, and, with a downtime budget, as soon as the pages left would go out in the
final pass within it at the link rate measured so far.
"""

from __future__ import annotations

import attrs

CONTINUE = 0
STOP_AND_COPY = 1
STOP_NOW = 2
ABORT = 3
DECISION_NAMES = {CONTINUE: "continue", STOP_AND_COPY: "stop-and-copy", STOP_NOW: "stop-now", ABORT: "abort"}

XEN_MAX_ITERATIONS = 5
XEN_DIRTY_THRESHOLD = 50


@attrs.frozen
class PrecopyStats:
    """What Xen's policy hook gets: `dirty_count` -1 means unknown (right after a round was sent)."""

    iteration: int
    total_written: int
    dirty_count: int


@attrs.frozen
class RoundHistory:
    """What ours also looks at: per completed round, (pages Xen reported dirty for it, pages sent,
    seconds it took); `p2m_size` pages in the guest; bytes per second measured on the stream."""

    rounds: tuple[tuple[int, int, float], ...]
    p2m_size: int
    bytes_per_second: float


class XenPolicy:
    name = "xen"
    skip_redirtied = False
    hot_last = False

    def decide(self, stats: PrecopyStats, history: RoundHistory) -> int:
        if 0 <= stats.dirty_count < XEN_DIRTY_THRESHOLD or stats.iteration >= XEN_MAX_ITERATIONS:
            return STOP_AND_COPY
        return CONTINUE


@attrs.define
class AdaptivePolicy:
    name = "adaptive"
    skip_redirtied = True
    hot_last = True

    downtime_budget: float | None = None  # seconds; None: stop on convergence only
    shrink: float = 0.8  # a round must leave at most this share of the previous dirty set to go on
    max_iterations: int = 30
    max_traffic: float = 3.0  # pages sent, as a multiple of the guest's pages

    def decide(self, stats: PrecopyStats, history: RoundHistory) -> int:
        if stats.total_written >= self.max_traffic * history.p2m_size or stats.iteration >= self.max_iterations:
            return STOP_AND_COPY if stats.dirty_count >= 0 else STOP_NOW
        if stats.dirty_count < 0:
            return CONTINUE
        dirty = stats.dirty_count
        if dirty < XEN_DIRTY_THRESHOLD:
            return STOP_AND_COPY
        if self.downtime_budget is not None and history.bytes_per_second > 0:
            if dirty * 4096 / history.bytes_per_second <= self.downtime_budget:
                return STOP_NOW
        if stats.iteration < XEN_MAX_ITERATIONS or len(history.rounds) < 2:
            return CONTINUE
        previous = history.rounds[-2][0]
        if previous > 0 and dirty <= self.shrink * previous:
            return CONTINUE
        return STOP_AND_COPY


POLICIES = {"xen": XenPolicy, "adaptive": AdaptivePolicy}


def make_policy(name: str, downtime_budget: float | None = None):
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")
    if name == "adaptive":
        return AdaptivePolicy(downtime_budget=downtime_budget)
    return XenPolicy()
