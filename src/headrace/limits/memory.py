"""The in-process limiter: exact for one gateway process; the embedded default and the test fake.

The algorithm is :mod:`headrace.limits.redis`'s, on the injected ``clock`` (seconds;
``time.monotonic`` by default) instead of Redis's, so tests can move time by hand:

* ``RATE`` — a level and when it was last written; it drains at ``limit / window_s`` units per
  second. A missing counter is an empty one, so a settlement on a drained counter still
  charges a positive delta. A counter with ``limit <= 0`` holds nothing; a settlement without
  the demand's ``limit`` cannot drain, so it leaves the counter alone (value 0).
* ``CONCURRENCY`` — lease id → expiry; a lease takes one slot per counter, expired leases are
  gone. A refusal's ``retry_after_s`` is when the oldest lease expires.
* ``BUDGET`` — a value that starts at ``seed`` and expires ``window_s`` after creation. A
  refusal's ``retry_after_s`` is that expiry. Settling a missing counter is skipped (value 0).

A call names each counter at most once. Nothing here awaits, so :meth:`MemoryLimiter.acquire`
is atomic within the event loop. Drained, expired and empty entries are swept once per minute
of clock time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from headrace.limits.base import CounterState, Decision, Demand, LimitKind, Settlement

EPSILON = 1e-9
"""Levels are floats: a demand within this many units of fitting fits (as in the Redis Lua)."""

_SWEEP_S = 60.0  # clock seconds between sweeps of dead entries


@dataclass(frozen=True, slots=True)
class _Look:
    """A counter as it stands, and whether a demand fits in it."""

    fits: bool
    wait_s: float  # until it would fit (inf: never); meaningless when it fits
    state: CounterState


class _Counters(Protocol):
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

    def look(self, demand: Demand, now: float) -> _Look:
        level = self._level(demand.key, demand.limit, demand.window_s, now)
        over = level + demand.amount - demand.limit
        state = _rate_state(demand.key, demand.limit, demand.window_s, level)
        return _Look(over <= EPSILON, _drain_s(over, demand.limit, demand.window_s), state)

    def take(self, demand: Demand, lease: str, now: float) -> CounterState:
        level = self._level(demand.key, demand.limit, demand.window_s, now) + demand.amount
        self._store(demand.key, level, demand.limit, demand.window_s, now)
        return _rate_state(demand.key, demand.limit, demand.window_s, level)

    def settle(self, settlement: Settlement, lease: str, now: float) -> int:
        s = settlement
        if s.limit <= 0:  # no limit to drain by (a Settlement built without one): leave it
            return 0
        level = max(0.0, self._level(s.key, s.limit, s.window_s, now) + s.delta)
        self._store(s.key, level, s.limit, s.window_s, now)
        return max(0, math.ceil(level - EPSILON))

    def sweep(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.empty_at <= now]:
            del self._buckets[key]

    def _level(self, key: str, limit: int, window_s: float, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None or limit <= 0:
            return 0.0
        elapsed = max(0.0, now - bucket.at)
        return max(0.0, bucket.level - elapsed * limit / _window(window_s))

    def _store(self, key: str, level: float, limit: int, window_s: float, now: float) -> None:
        if level <= 0 or limit <= 0:
            self._buckets.pop(key, None)
        else:
            self._buckets[key] = _Bucket(level, now, now + _drain_s(level, limit, window_s))


class _Leases:
    def __init__(self) -> None:
        self._held: dict[str, dict[str, float]] = {}  # counter -> lease -> expiry

    def look(self, demand: Demand, now: float) -> _Look:
        held = self._live(demand.key, now)
        wait = min(held.values()) - now if held else math.inf
        return _Look(len(held) < demand.limit, wait, self._state(demand, held, now))

    def take(self, demand: Demand, lease: str, now: float) -> CounterState:
        held = self._held.setdefault(demand.key, {})
        held[lease] = now + demand.window_s
        return self._state(demand, held, now)

    def settle(self, settlement: Settlement, lease: str, now: float) -> int:
        held = self._live(settlement.key, now)
        held.pop(lease, None)
        if not held:
            self._held.pop(settlement.key, None)
        return len(held)

    def sweep(self, now: float) -> None:
        for key in list(self._held):
            if not self._live(key, now):
                del self._held[key]

    def _live(self, key: str, now: float) -> dict[str, float]:
        held = self._held.get(key, {})
        for lease in [lease for lease, expiry in held.items() if expiry <= now]:
            del held[lease]
        return held

    @staticmethod
    def _state(demand: Demand, held: dict[str, float], now: float) -> CounterState:
        reset = max(held.values()) - now if held else 0.0
        return CounterState(demand.key, demand.limit, max(0, demand.limit - len(held)), reset)


@dataclass(slots=True)
class _Counter:
    value: int
    expires_at: float


class _Budgets:
    def __init__(self) -> None:
        self._counters: dict[str, _Counter] = {}

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
        remaining = max(0, demand.limit - counter.value)
        return CounterState(demand.key, demand.limit, remaining, counter.expires_at - now)

    def settle(self, settlement: Settlement, lease: str, now: float) -> int:
        counter = self._live(settlement.key, now)
        if counter is None:
            return 0
        counter.value = max(0, counter.value + settlement.delta)
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
        looks = [self._counters[d.kind].look(d, now) for d in demands]
        for index, (demand, look) in enumerate(zip(demands, looks, strict=True)):
            if demand.amount > demand.limit or not look.fits:
                wait = math.inf if demand.amount > demand.limit else look.wait_s
                return Decision(False, tuple(look.state for look in looks), index, wait)
        states = tuple(self._counters[d.kind].take(d, lease, now) for d in demands)
        return Decision(True, states)

    async def settle(self, settlements: Sequence[Settlement], lease: str) -> tuple[int, ...]:
        now = self._now()
        return tuple(self._counters[s.kind].settle(s, lease, now) for s in settlements)

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
    return max(window_s, 1e-6)  # as the Redis backend's whole microseconds, at least 1


def _drain_s(level: float, limit: int, window_s: float) -> float:
    """Seconds for ``level`` units to drain at ``limit / window_s`` per second."""
    return level * _window(window_s) / limit if limit > 0 else 0.0


def _rate_state(key: str, limit: int, window_s: float, level: float) -> CounterState:
    remaining = max(0, math.floor(limit - level + EPSILON))
    return CounterState(key, limit, remaining, max(0.0, _drain_s(level, limit, window_s)))
