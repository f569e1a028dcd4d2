"""Guest workloads that dirty memory while the guest is being migrated, and the clocks that pace them.

A workload is a seeded stream of guest actions (writes, pagetable edits, type changes) issued through
the simulated guest's own hypercalls, so log-dirty sees every one of them. It is *stepped by a clock*:
`run_until(t)` performs every action due up to time `t` (seconds since the workload started) at its
rate, so the same seed and the same clock readings give the same writes. The migration engines move
the clock:

* `LinkClock` is virtual: time advances by bytes sent / link rate (and by explicit `elapse` calls), so a
  test's schedule of writes is a pure function of the seed and the bytes on the wire.
* `WallClock` reads the monotonic clock (demos: the guest runs while real bytes flow).

    workload = parse_workload("hotset:pages=2048,rate=20000", guest, seed=7)
    clock = LinkClock(bytes_per_second=125e6)
    ... engine sends a batch of n bytes ...
    clock.transmitted(n); workload.run_until(clock.now())

Kinds (spec string `KIND[:key=value,...]`, rates in actions per second; every kind but idle also takes
`limit=N`, a cap on the actions of the whole run, 0 = none):

* `idle` - nothing.
* `uniform:rate=R` - 8-byte writes to data pages chosen uniformly.
* `hotset:pages=H,rate=R,cold=C` - a writable working set of H data pages rewritten at R writes/s, the
  rest of memory written at C writes/s (Clark et al., NSDI 2005: servers rewrite a small set constantly).
* `scan:rate=R` - writes sweeping the data pages in ascending order, wrapping around.
* `ptchurn:rate=R,pool=P` - pagetable activity: accessed-bit updates of direct-map PTEs through
  mmu_update and, every fourth action, one of P spare pages changing type (data page -> pinned L1
  table mapping a few data pages read-only, and back).
"""

from __future__ import annotations

import random
import time

import attrs

from xenstream.hv import abi
from xenstream.hv.sim.guest import PvGuest

# Never let one `run_until` call loop without bound (a clock jump, a huge rate).
MAX_ACTIONS_PER_STEP = 1 << 20
_TABLE_MAP_FLAGS = abi.PTE_PRESENT | abi.PTE_ACCESSED | abi.PTE_NX  # read-only data mapping in an L1


class WorkloadError(ValueError):
    pass


class LinkClock:
    """Virtual time: advanced by the bytes a migration puts on its link and by explicit pauses."""

    def __init__(self, bytes_per_second: float = 125e6) -> None:
        if bytes_per_second <= 0:
            raise WorkloadError("link rate must be positive")
        self.bytes_per_second = bytes_per_second
        self._seconds = 0.0

    def now(self) -> float:
        return self._seconds

    def transmitted(self, nbytes: int) -> None:
        self._seconds += nbytes / self.bytes_per_second

    def elapse(self, seconds: float) -> None:
        self._seconds += seconds


class WallClock:
    """Real time since construction; `transmitted` is a no-op (the bytes took their real time)."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._start

    def transmitted(self, nbytes: int) -> None:
        pass

    def elapse(self, seconds: float) -> None:
        time.sleep(seconds)


class Workload:
    """Base: paces `_act()` at `rate` actions per second of clock time."""

    kind = "base"

    def __init__(self, guest: PvGuest, seed: int, rate: float, limit: int = 0) -> None:
        if rate < 0 or limit < 0:
            raise WorkloadError("rate and limit must not be negative")
        self.guest = guest
        self.rate = rate
        self.limit = limit
        self.rng = random.Random(f"workload:{self.kind}:{seed}")
        self.actions = 0
        self._data = guest.data_pfns()
        if not self._data and rate:
            raise WorkloadError("the guest has no data pages to write")

    def run_until(self, seconds: float) -> int:
        """Perform the actions due by `seconds`; returns how many were performed now."""
        due = min(int(self.rate * seconds) - self.actions, MAX_ACTIONS_PER_STEP)
        if self.limit:
            due = min(due, self.limit - self.actions)
        for _ in range(max(due, 0)):
            self._act()
        self.actions += max(due, 0)
        return max(due, 0)

    def _act(self) -> None:
        raise NotImplementedError

    def _scribble(self, pfn: int) -> None:
        rng = self.rng
        self.guest.write(pfn, rng.randrange(0, abi.PAGE_SIZE, 8), rng.randbytes(8))


class Idle(Workload):
    kind = "idle"

    def __init__(self, guest: PvGuest, seed: int) -> None:
        super().__init__(guest, seed, 0.0)

    def _act(self) -> None:  # never due: rate 0
        pass


class UniformWrites(Workload):
    kind = "uniform"

    def _act(self) -> None:
        self._scribble(self._data[self.rng.randrange(len(self._data))])


class HotSet(Workload):
    kind = "hotset"

    def __init__(self, guest: PvGuest, seed: int, rate: float, pages: int, cold: float, limit: int = 0) -> None:
        super().__init__(guest, seed, rate + cold, limit)
        if not 0 < pages <= len(self._data):
            raise WorkloadError(f"hot set of {pages} pages in a guest with {len(self._data)} data pages")
        chosen = set(self.rng.sample(range(len(self._data)), pages))
        self.hot = [pfn for i, pfn in enumerate(self._data) if i in chosen]
        self.cold = [pfn for i, pfn in enumerate(self._data) if i not in chosen] or self.hot
        self._hot_share = rate / (rate + cold) if rate + cold else 0.0

    def _act(self) -> None:
        pool = self.hot if self.rng.random() < self._hot_share else self.cold
        self._scribble(pool[self.rng.randrange(len(pool))])


class SequentialScan(Workload):
    kind = "scan"

    def __init__(self, guest: PvGuest, seed: int, rate: float, limit: int = 0) -> None:
        super().__init__(guest, seed, rate, limit)
        self._next = self.rng.randrange(len(self._data)) if self._data else 0

    def _act(self) -> None:
        self._scribble(self._data[self._next])
        self._next = (self._next + 1) % len(self._data)


class PagetableChurn(Workload):
    """Pagetable edits and pages changing type, the way a kernel forks and reaps address spaces."""

    kind = "ptchurn"

    def __init__(self, guest: PvGuest, seed: int, rate: float, pool: int, limit: int = 0) -> None:
        super().__init__(guest, seed, rate, limit)
        if not 0 < pool < len(self._data) // 2:
            raise WorkloadError(f"spare pool of {pool} pages in a guest with {len(self._data)} data pages")
        machine = guest.xen.machine
        # Only pages whose one writable mapping is the kernel's direct map can become tables.
        alone = [pfn for pfn in self._data if machine.tcount[machine.slot_of(guest.p2m(pfn))] == 1]
        if len(alone) < pool:
            raise WorkloadError(f"only {len(alone)} pages are mapped writable once; the pool needs {pool}")
        self.spare = self.rng.sample(alone, pool)
        spare = set(self.spare)
        self.targets = [pfn for pfn in self._data if pfn not in spare]
        self.tables: set[int] = set()

    def _act(self) -> None:
        rng = self.rng
        if rng.randrange(4):
            self._touch_pte(self.targets[rng.randrange(len(self.targets))])
            return
        pfn = self.spare[rng.randrange(len(self.spare))]
        if pfn in self.tables:
            self._to_data(pfn)
        else:
            self._to_table(pfn)

    def _touch_pte(self, pfn: int) -> None:
        table, index, pte = self.guest.direct_map_slot(pfn)
        if pte & abi.PTE_PRESENT:
            self.guest.xen.mmu_update(self.guest.domid, table, index, pte ^ abi.PTE_ACCESSED)

    def _to_table(self, pfn: int) -> None:
        guest, xen = self.guest, self.guest.xen
        page = bytearray(abi.PAGE_SIZE)
        for slot, target in zip(self.rng.sample(range(abi.PTES_PER_PAGE), 4), self.rng.sample(self.targets, 4)):
            page[slot * 8:slot * 8 + 8] = ((guest.p2m(target) << abi.PAGE_SHIFT) | _TABLE_MAP_FLAGS).to_bytes(8, "little")
        guest.write(pfn, 0, bytes(page))
        table, index, pte = guest.direct_map_slot(pfn)
        xen.mmu_update(guest.domid, table, index, pte & ~abi.PTE_RW)  # a table may not stay mapped writable
        xen.guest_pin(guest.domid, 1, guest.p2m(pfn))
        self.tables.add(pfn)

    def _to_data(self, pfn: int) -> None:
        guest, xen = self.guest, self.guest.xen
        xen.guest_unpin(guest.domid, guest.p2m(pfn))
        table, index, pte = guest.direct_map_slot(pfn)
        xen.mmu_update(guest.domid, table, index, pte | abi.PTE_RW)
        self.tables.discard(pfn)


@attrs.frozen
class _Kind:
    make: object  # (guest, seed, params) -> Workload
    defaults: dict


def _number(value: str, key: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise WorkloadError(f"{key}={value!r} is not a number") from None


KINDS: dict[str, _Kind] = {
    "idle": _Kind(lambda g, s, p: Idle(g, s), {}),
    "uniform": _Kind(lambda g, s, p: UniformWrites(g, s, p["rate"], int(p["limit"])), {"rate": 5000.0, "limit": 0.0}),
    "hotset": _Kind(lambda g, s, p: HotSet(g, s, p["rate"], int(p["pages"]), p["cold"], int(p["limit"])),
                    {"rate": 20000.0, "pages": 2048.0, "cold": 500.0, "limit": 0.0}),
    "scan": _Kind(lambda g, s, p: SequentialScan(g, s, p["rate"], int(p["limit"])), {"rate": 5000.0, "limit": 0.0}),
    "ptchurn": _Kind(lambda g, s, p: PagetableChurn(g, s, p["rate"], int(p["pool"]), int(p["limit"])),
                     {"rate": 2000.0, "pool": 64.0, "limit": 0.0}),
}


def check_workload(text: str) -> None:
    """Raise WorkloadError if `text` is not a valid workload spec (before any guest exists)."""
    _parse(text)


def parse_workload(text: str, guest: PvGuest, seed: int = 0) -> Workload:
    """`KIND[:key=value,...]` (see the module doc) -> a workload bound to `guest`."""
    kind, params = _parse(text)
    return kind.make(guest, seed, params)


def _parse(text: str) -> tuple[_Kind, dict]:
    kind_name, _, rest = text.partition(":")
    kind = KINDS.get(kind_name)
    if kind is None:
        raise WorkloadError(f"unknown workload {kind_name!r} (known: {', '.join(sorted(KINDS))})")
    params = dict(kind.defaults)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in params:
            raise WorkloadError(f"workload {kind_name} has no parameter {key!r} (known: {', '.join(params) or 'none'})")
        params[key] = _number(value, key)
    return kind, params
