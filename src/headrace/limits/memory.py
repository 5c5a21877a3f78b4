"""The in-process limiter: exact for one gateway process; the embedded default and the test fake.

The algorithm is :mod:`headrace.limits.redis`'s, on the injected ``clock`` (seconds;
``time.monotonic`` by default) instead of Redis's, so tests can move time by hand:

* ``RATE`` — a level and when it was last written; it drains at ``limit / window_s`` units per
  second. A missing counter is an empty one, so a settlement on a drained counter still
  charges a positive delta. A counter with ``limit <= 0`` holds nothing; a settlement without
  the demand's ``limit`` cannot drain, so it leaves the counter alone (value 0).
* ``CONCURRENCY`` — lease id → expiry; a lease takes one slot per counter, expired leases are
  gone. A refusal's ``retry_after_s`` is when the oldest lease expires. Leases are also kept
  in a heap by expiry, so that expiring them costs O(log n), not a scan of every lease held.
* ``BUDGET`` — a value that starts at ``seed`` and expires ``window_s`` after creation. A
  refusal's ``retry_after_s`` is that expiry. Settling a missing counter is skipped (value 0).

A call names each counter at most once. Nothing here awaits, so :meth:`MemoryLimiter.acquire`
is atomic within the event loop. An admission only asks each counter whether the demand fits;
how long a refused demand would wait, and the states as they stood, are worked out for
refusals alone. Drained, expired and empty entries are swept once per minute
of clock time.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from headrace.limits.base import CounterState, Decision, Demand, LimitKind, Settlement

EPSILON = 1e-9
"""Levels are floats: a demand within this many units of fitting fits (as in the Redis Lua)."""

_SWEEP_S = 60.0  # clock seconds between sweeps of dead entries

# Every request runs the rate counters' arithmetic several times, so it spells ``max(a, b)``
# as ``b if b > a else a`` (the same value, NaN included): a call of the builtin costs about
# seven times as much.


@dataclass(frozen=True, slots=True)
class _Look:
    """A counter as it stands, and whether a demand fits in it."""

    fits: bool
    wait_s: float  # until it would fit (inf: never); meaningless when it fits
    state: CounterState


class _Counters(Protocol):
    def fits(self, demand: Demand, now: float) -> bool: ...
    def look(self, demand: Demand, now: float) -> _Look: ...
    def take(self, demand: Demand, lease: str, now: float) -> CounterState: ...
    def settle(self, settlement: Settlement, lease: str, now: float) -> int: ...
    def sweep(self, now: float) -> None: ...


@dataclass(slots=True)
class _Bucket:
    level: float  # units held at `at`
    at: float
    empty_at: float  # when it will have drained to 0


class _Rates:
    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def fits(self, demand: Demand, now: float) -> bool:
        level = self._level(demand.key, demand.limit, demand.window_s, now)
        return level + demand.amount - demand.limit <= EPSILON

    def look(self, demand: Demand, now: float) -> _Look:
        level = self._level(demand.key, demand.limit, demand.window_s, now)
        over = level + demand.amount - demand.limit
        state = _rate_state(demand.key, demand.limit, demand.window_s, level)
        return _Look(over <= EPSILON, _drain_s(over, demand.limit, demand.window_s), state)

    def take(self, demand: Demand, lease: str, now: float) -> CounterState:
        key, limit = demand.key, demand.limit
        level = self._level(key, limit, demand.window_s, now) + demand.amount
        reset = self._store(key, level, limit, demand.window_s, now)
        remaining = math.floor(limit - level + EPSILON)
        return CounterState(key, limit, remaining if remaining > 0 else 0, reset)

    def settle(self, settlement: Settlement, lease: str, now: float) -> int:
        s = settlement
        if s.limit <= 0:  # no limit to drain by (a Settlement built without one): leave it
            return 0
        level = self._level(s.key, s.limit, s.window_s, now) + s.delta
        level = level if level > 0.0 else 0.0
        self._store(s.key, level, s.limit, s.window_s, now)
        value = math.ceil(level - EPSILON)
        return value if value > 0 else 0

    def sweep(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.empty_at <= now]:
            del self._buckets[key]

    def _level(self, key: str, limit: int, window_s: float, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None or limit <= 0:
            return 0.0
        elapsed = now - bucket.at
        level = bucket.level - (elapsed if elapsed > 0.0 else 0.0) * limit / _window(window_s)
        return level if level > 0.0 else 0.0

    def _store(self, key: str, level: float, limit: int, window_s: float, now: float) -> float:
        """Write ``level`` as of ``now``; return the seconds it takes to drain (0: empty)."""
        if level <= 0 or limit <= 0:
            self._buckets.pop(key, None)
            return 0.0
        drain = level * _window(window_s) / limit
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = _Bucket(level, now, now + drain)
        else:
            bucket.level, bucket.at, bucket.empty_at = level, now, now + drain
        return drain


@dataclass(slots=True)
class _Held:
    """One CONCURRENCY counter's live leases.

    Two heaps over ``expiry``: ``first`` by expiry (the next to expire), ``last`` by expiry
    negated (the last to expire, for the counter's reset time). Both keep entries of leases
    released or taken again since; an entry counts only while ``expiry`` still agrees with it.
    """

    expiry: dict[str, float]  # lease -> when it expires
    first: list[tuple[float, str]]
    last: list[tuple[float, str]]

    def add(self, lease: str, expires: float) -> None:
        self.expiry[lease] = expires
        heapq.heappush(self.first, (expires, lease))
        heapq.heappush(self.last, (-expires, lease))
        self._compact()

    def remove(self, lease: str) -> None:
        self.expiry.pop(lease, None)
        self._compact()

    def _compact(self) -> None:
        """Rebuild the heaps once they are mostly stale entries (amortised O(1) per lease)."""
        expiry = self.expiry
        if len(self.first) > 2 * len(expiry) + 16 or len(self.last) > 2 * len(expiry) + 16:
            self.first = [(at, name) for name, at in expiry.items()]
            self.last = [(-at, name) for name, at in expiry.items()]
            heapq.heapify(self.first)
            heapq.heapify(self.last)

    def expire(self, now: float) -> None:
        first, expiry = self.first, self.expiry
        while first and first[0][0] <= now:
            at, lease = heapq.heappop(first)
            if expiry.get(lease) == at:
                del expiry[lease]

    def earliest(self) -> float:
        """The next expiry; only while a lease is held."""
        first, expiry = self.first, self.expiry
        while expiry.get(first[0][1]) != first[0][0]:
            heapq.heappop(first)
        return first[0][0]

    def latest(self) -> float:
        """The last expiry; only while a lease is held."""
        last, expiry = self.last, self.expiry
        while expiry.get(last[0][1]) != -last[0][0]:
            heapq.heappop(last)
        return -last[0][0]


class _Leases:
    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}  # counter -> its leases

    def fits(self, demand: Demand, now: float) -> bool:
        held = self._live(demand.key, now)
        return (len(held.expiry) if held else 0) < demand.limit

    def look(self, demand: Demand, now: float) -> _Look:
        held = self._live(demand.key, now)
        if held is None:
            return _Look(demand.limit > 0, math.inf, self._state(demand, None, now))
        state = self._state(demand, held, now)
        return _Look(len(held.expiry) < demand.limit, held.earliest() - now, state)

    def take(self, demand: Demand, lease: str, now: float) -> CounterState:
        held = self._live(demand.key, now)
        if held is None:
            held = self._held[demand.key] = _Held({}, [], [])
        held.add(lease, now + demand.window_s)
        return self._state(demand, held, now)

    def settle(self, settlement: Settlement, lease: str, now: float) -> int:
        held = self._live(settlement.key, now)
        if held is None:
            return 0
        held.remove(lease)
        if not held.expiry:
            del self._held[settlement.key]
        return len(held.expiry)

    def sweep(self, now: float) -> None:
        for key in list(self._held):
            self._live(key, now)

    def _live(self, key: str, now: float) -> _Held | None:
        """The counter's leases after dropping the expired ones; None when none is left."""
        held = self._held.get(key)
        if held is None:
            return None
        held.expire(now)
        if not held.expiry:
            del self._held[key]
            return None
        return held

    @staticmethod
    def _state(demand: Demand, held: _Held | None, now: float) -> CounterState:
        if held is None:
            return CounterState(demand.key, demand.limit, max(0, demand.limit), 0.0)
        remaining = demand.limit - len(held.expiry)
        remaining = remaining if remaining > 0 else 0
        return CounterState(demand.key, demand.limit, remaining, held.latest() - now)


@dataclass(slots=True)
class _Counter:
    value: int
    expires_at: float


class _Budgets:
    def __init__(self) -> None:
        self._counters: dict[str, _Counter] = {}

    def fits(self, demand: Demand, now: float) -> bool:
        counter = self._live(demand.key, now)
        value = demand.seed if counter is None else counter.value
        return value + demand.amount <= demand.limit

    def look(self, demand: Demand, now: float) -> _Look:
        counter = self._live(demand.key, now)
        if counter is None:  # created at the seed if the demand is taken
            value, ttl = demand.seed, demand.window_s
        else:
            value, ttl = counter.value, counter.expires_at - now
        remaining = max(0, demand.limit - value)
        state = CounterState(demand.key, demand.limit, remaining, ttl)
        return _Look(value + demand.amount <= demand.limit, ttl, state)

    def take(self, demand: Demand, lease: str, now: float) -> CounterState:
        counter = self._live(demand.key, now)
        if counter is None:
            counter = self._counters[demand.key] = _Counter(demand.seed, now + demand.window_s)
        counter.value += demand.amount
        remaining = demand.limit - counter.value
        remaining = remaining if remaining > 0 else 0
        return CounterState(demand.key, demand.limit, remaining, counter.expires_at - now)

    def settle(self, settlement: Settlement, lease: str, now: float) -> int:
        counter = self._live(settlement.key, now)
        if counter is None:
            return 0
        value = counter.value + settlement.delta
        counter.value = value if value > 0 else 0
        return counter.value

    def sweep(self, now: float) -> None:
        for key in list(self._counters):
            self._live(key, now)

    def _live(self, key: str, now: float) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is not None and counter.expires_at <= now:
            del self._counters[key]
            return None
        return counter


class MemoryLimiter:
    """The :class:`~headrace.limits.base.Limiter` in one process's memory (see the module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counters: Mapping[LimitKind, _Counters] = {
            LimitKind.RATE: _Rates(),
            LimitKind.CONCURRENCY: _Leases(),
            LimitKind.BUDGET: _Budgets(),
        }
        self._flags: dict[str, float] = {}  # flag -> expiry
        self._swept_at = clock()

    async def start(self) -> None:
        pass

    async def acquire(self, demands: Sequence[Demand], lease: str) -> Decision:
        now = self._now()
        counters = self._counters
        for index, demand in enumerate(demands):
            if demand.amount > demand.limit or not counters[demand.kind].fits(demand, now):
                return self._refusal(demands, index, now)
        return Decision(True, tuple([counters[d.kind].take(d, lease, now) for d in demands]))

    def _refusal(self, demands: Sequence[Demand], index: int, now: float) -> Decision:
        """Demand ``index`` is the first that does not fit: every state as it stands."""
        looks = [self._counters[d.kind].look(d, now) for d in demands]
        demand = demands[index]
        wait = math.inf if demand.amount > demand.limit else looks[index].wait_s
        return Decision(False, tuple(look.state for look in looks), index, wait)

    def settle(
        self, settlements: Sequence[Settlement], lease: str
    ) -> asyncio.Future[tuple[int, ...]]:
        now = self._now()
        done: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        counters = self._counters
        done.set_result(tuple([counters[s.kind].settle(s, lease, now) for s in settlements]))
        return done

    async def first_time(self, flag: str, ttl_s: float) -> bool:
        now = self._now()
        if self._flags.get(flag, -math.inf) > now:
            return False
        self._flags[flag] = now + ttl_s
        return True

    async def check(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def _now(self) -> float:
        now = self._clock()
        if now - self._swept_at >= _SWEEP_S:
            self._swept_at = now
            for counters in self._counters.values():
                counters.sweep(now)
            self._flags = {flag: expiry for flag, expiry in self._flags.items() if expiry > now}
        return now


def _window(window_s: float) -> float:
    return 1e-6 if window_s < 1e-6 else window_s  # as Redis's whole microseconds, at least 1


def _drain_s(level: float, limit: int, window_s: float) -> float:
    """Seconds for ``level`` units to drain at ``limit / window_s`` per second."""
    return level * _window(window_s) / limit if limit > 0 else 0.0


def _rate_state(key: str, limit: int, window_s: float, level: float) -> CounterState:
    remaining = max(0, math.floor(limit - level + EPSILON))
    return CounterState(key, limit, remaining, max(0.0, _drain_s(level, limit, window_s)))
