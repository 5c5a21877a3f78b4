"""The in-memory limiter's arithmetic on a fake clock: drain, lease expiry, budget and flag TTLs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from headrace.limits.base import Demand, LimitKind, Settlement
from headrace.limits.memory import MemoryLimiter

RATE, CONCURRENCY, BUDGET = LimitKind.RATE, LimitKind.CONCURRENCY, LimitKind.BUDGET


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> MemoryLimiter:
    return MemoryLimiter(clock=clock)


async def test_a_rate_drains_at_limit_per_window(clock: Clock, limiter: MemoryLimiter) -> None:
    demand = Demand("tpm", RATE, 600, 600, 60.0)  # drains 10 units per second
    taken = await limiter.acquire([demand], "r1")
    assert taken.states[0].reset_s == 60.0
    clock.now = 4.5  # 45 drained: 555 held
    small = Demand("tpm", RATE, 600, 45, 60.0)
    state = (await limiter.acquire([small], "r2")).states[0]
    assert (state.remaining, state.reset_s) == (0, 60.0)
    refused = await limiter.acquire([Demand("tpm", RATE, 600, 25, 60.0)], "r3")
    assert refused.retry_after_s == 2.5  # (600 + 25 - 600) / 10
    assert refused.states[0].reset_s == 60.0
    clock.now = 7.0
    assert (await limiter.acquire([Demand("tpm", RATE, 600, 25, 60.0)], "r3")).allowed


async def test_remaining_counts_whole_units_and_reset_is_exact(
    clock: Clock, limiter: MemoryLimiter
) -> None:
    await limiter.acquire([Demand("rpm", RATE, 10, 10, 60.0)], "r1")  # 1 per 6 s
    clock.now = 9.0  # 1.5 drained
    state = (await limiter.acquire([Demand("rpm", RATE, 10, 0, 60.0)], "r2")).states[0]
    assert state.remaining == 1
    assert state.reset_s == pytest.approx(51.0)


async def test_drift_never_refuses_a_demand_that_fits(clock: Clock, limiter: MemoryLimiter) -> None:
    demand = Demand("rpm", RATE, 3, 1, 1.0)  # one every 1/3 s: a step floats cannot hold
    for _ in range(3):
        assert (await limiter.acquire([demand], "r")).allowed
    for step in range(1, 301):
        clock.now = step / 3
        assert (await limiter.acquire([demand], "r")).allowed, step
        assert not (await limiter.acquire([demand], "r")).allowed, step


async def test_settle_drains_first_then_adds_the_delta(
    clock: Clock, limiter: MemoryLimiter
) -> None:
    await limiter.acquire([Demand("tpm", RATE, 600, 500, 60.0)], "r1")
    clock.now = 10.0  # 100 drained: 400 held
    settled = await limiter.settle([Settlement("tpm", RATE, -150, 60.0, 600)], "r1")
    assert settled == (250,)
    clock.now = 35.0  # 250 drained: empty, and forgotten once swept
    assert await limiter.settle([Settlement("tpm", RATE, 0, 60.0, 600)], "r1") == (0,)
    # A settlement without the demand's limit cannot drain: it leaves the counter alone.
    await limiter.acquire([Demand("tpm", RATE, 600, 300, 60.0)], "r2")
    assert await limiter.settle([Settlement("tpm", RATE, -300, 60.0, 0)], "r2") == (0,)
    state = (await limiter.acquire([Demand("tpm", RATE, 600, 0, 60.0)], "r3")).states[0]
    assert state.remaining == 300


async def test_leases_expire_exactly_after_the_window(clock: Clock, limiter: MemoryLimiter) -> None:
    demand = Demand("parallel", CONCURRENCY, 2, 1, 30.0)
    await limiter.acquire([demand], "l1")
    clock.now = 10.0
    held = await limiter.acquire([demand], "l2")
    assert held.states[0].reset_s == 30.0  # the last lease, l2, expires at 40
    clock.now = 29.5
    refused = await limiter.acquire([demand], "l3")
    assert refused.retry_after_s == 0.5  # l1 expires at 30
    clock.now = 30.0
    taken = await limiter.acquire([demand], "l3")
    assert taken.allowed
    assert (taken.states[0].remaining, taken.states[0].reset_s) == (0, 30.0)
    clock.now = 60.0  # l2 expired; l3 expires now
    assert await limiter.settle([Settlement("parallel", CONCURRENCY, 0, 30.0, 2)], "gone") == (0,)


async def test_a_budget_counter_lives_window_s_from_creation(
    clock: Clock, limiter: MemoryLimiter
) -> None:
    demand = Demand("budget:2026-11", BUDGET, 1000, 100, 100.0, seed=250)
    first = await limiter.acquire([demand], "r1")
    assert (first.states[0].remaining, first.states[0].reset_s) == (650, 100.0)
    clock.now = 60.0
    later = await limiter.acquire([demand], "r2")
    assert (later.states[0].remaining, later.states[0].reset_s) == (550, 40.0)
    refused = await limiter.acquire([Demand("budget:2026-11", BUDGET, 1000, 600, 100.0)], "r3")
    assert refused.retry_after_s == 40.0
    settle = Settlement("budget:2026-11", BUDGET, 25, 100.0, 1000)
    assert await limiter.settle([settle], "r1") == (475,)
    clock.now = 100.0  # expired: settling skips it, and the next demand starts a new one
    assert await limiter.settle([settle], "r2") == (0,)
    fresh = await limiter.acquire([demand], "r4")
    assert (fresh.states[0].remaining, fresh.states[0].reset_s) == (650, 100.0)


async def test_first_time_flags_expire_after_their_ttl(
    clock: Clock, limiter: MemoryLimiter
) -> None:
    assert await limiter.first_time("alert", 10.0)
    clock.now = 9.999
    assert not await limiter.first_time("alert", 10.0)
    clock.now = 10.0
    assert await limiter.first_time("alert", 10.0)
    assert not await limiter.first_time("alert", 10.0)


async def test_a_sweep_forgets_drained_and_expired_counters(
    clock: Clock, limiter: MemoryLimiter
) -> None:
    demands = [
        Demand("rpm", RATE, 60, 30, 60.0),
        Demand("parallel", CONCURRENCY, 5, 1, 30.0),
        Demand("budget", BUDGET, 100, 10, 50.0),
    ]
    await limiter.acquire(demands, "r1")
    await limiter.first_time("alert", 40.0)
    clock.now = 61.0  # past every expiry, and a sweep is due
    assert (await limiter.acquire([], "r2")).allowed
    # Private state, looked at on purpose: the point is that nothing is left behind.
    tables = limiter._counters
    assert tables[RATE]._buckets == {}  # type: ignore[attr-defined]
    assert tables[CONCURRENCY]._held == {}  # type: ignore[attr-defined]
    assert tables[BUDGET]._counters == {}  # type: ignore[attr-defined]
    assert limiter._flags == {}


@pytest.mark.parametrize("seed", range(20))
async def test_leases_agree_with_a_plain_table_of_expiries(seed: int) -> None:
    # The leases live in heaps by expiry; a plain lease -> expiry table, scanned on every
    # step, is the specification: admission, remaining, reset, retry-after and release.
    rnd = random.Random(seed)
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    limit = rnd.randint(1, 8)
    table: dict[str, float] = {}
    for _ in range(300):
        clock.now += rnd.random() * 3
        table = {lease: at for lease, at in table.items() if at > clock.now}
        lease, window = f"l{rnd.randint(0, 15)}", rnd.choice([5.0, 10.0, 20.0])
        if rnd.random() < 0.6:
            decision = await limiter.acquire([Demand("p", CONCURRENCY, limit, 1, window)], lease)
            assert decision.allowed == (len(table) < limit)
            if decision.allowed:
                table[lease] = clock.now + window
            else:
                assert decision.retry_after_s == pytest.approx(min(table.values()) - clock.now)
            state = decision.states[0]
            assert state.remaining == max(0, limit - len(table))
            assert state.reset_s == pytest.approx(max(table.values()) - clock.now)
        else:
            settled = await limiter.settle([Settlement("p", CONCURRENCY, 0, window, limit)], lease)
            table.pop(lease, None)
            assert settled == (len(table),)


async def test_released_leases_do_not_pile_up(clock: Clock, limiter: MemoryLimiter) -> None:
    demand = Demand("p", CONCURRENCY, 100, 1, 900.0)
    await limiter.acquire([demand], "long")  # one lease held throughout
    for n in range(1000):
        clock.now += 0.01
        await limiter.acquire([demand], f"r{n}")
        await limiter.acquire([demand], "again")  # the same lease, taken again
        await limiter.settle([Settlement.of(demand)], f"r{n}")
    # Private state, looked at on purpose: released leases' heap entries are dropped.
    held = limiter._counters[CONCURRENCY]._held["p"]  # type: ignore[attr-defined]
    assert len(held.expiry) == 2
    assert len(held.first) <= 20
    assert len(held.last) <= 20
