"""The Limiter contract against every backend: memory (on a fake clock) and Redis (real time).

Redis needs ``HEADRACE_TEST_REDIS_URL`` (CI sets it); each test has its own prefix and deletes
its keys afterwards. Tests that wait use windows of 1-2 s so that Redis's run stays short.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from headrace.limits.base import (
    Decision,
    Demand,
    Limiter,
    LimiterUnavailableError,
    LimitKind,
    Settlement,
)
from headrace.limits.memory import MemoryLimiter

NO_REDIS = "set HEADRACE_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/0) to run against Redis"
RATE, CONCURRENCY, BUDGET = LimitKind.RATE, LimitKind.CONCURRENCY, LimitKind.BUDGET


@dataclass
class FakeClock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    limiter: Limiter
    twin: Limiter  # another client of the same counters (Redis: its own connection pool)
    elapse: Callable[[float], Awaitable[None]]  # let this many seconds pass
    slack_s: float  # how much real time a few calls may take (0 on the fake clock)


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest, redis_url: str | None) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        limiter = MemoryLimiter(clock=clock)
        yield Backend(limiter, limiter, advance, 0.0)
        return
    if not redis_url:
        pytest.skip(NO_REDIS)

    from headrace.limits.redis import RedisLimiter

    prefix = f"headrace-test:lim:{uuid.uuid4().hex}:"
    # Generous timeouts: these tests check behaviour, and a loaded machine connects slowly.
    one, two = (RedisLimiter(redis_url, prefix=prefix, timeout_s=5.0) for _ in range(2))
    try:
        yield Backend(one, two, asyncio.sleep, 0.25)
    finally:
        await one.aclose()
        await two.aclose()
        await delete_keys(redis_url, prefix)


async def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete a test's Redis keys (everything under ``prefix``)."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    names = [name async for name in client.scan_iter(match=f"{prefix}*")]
    if names:
        await client.delete(*names)
    await client.aclose()


def rpm(limit: int, window_s: float = 60.0, key: str = "key:k1:rpm") -> Demand:
    return Demand(key, RATE, limit, 1, window_s)


def tpm(limit: int, amount: int, key: str = "key:k1:tpm") -> Demand:
    return Demand(key, RATE, limit, amount, 60.0)


def parallel(limit: int, window_s: float = 60.0, key: str = "key:k1:parallel") -> Demand:
    return Demand(key, CONCURRENCY, limit, 1, window_s)


def budget(
    limit: int, amount: int, *, seed: int = 0, window_s: float = 3600.0, key: str = "b:2026-11"
) -> Demand:
    return Demand(key, BUDGET, limit, amount, window_s, seed)


def settle_of(demand: Demand, delta: int = 0) -> Settlement:
    return Settlement.of(demand, delta)


async def take(limiter: Limiter, *demands: Demand, lease: str | None = None) -> Decision:
    return await limiter.acquire(demands, lease or uuid.uuid4().hex)


async def test_rate_admits_exactly_the_limit_then_refuses_with_retry_after(
    backend: Backend,
) -> None:
    demand = rpm(5)  # one request drains every 12 s
    remaining = [(await take(backend.limiter, demand)).states[0].remaining for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    refused = await take(backend.limiter, demand)
    assert not refused.allowed
    assert refused.refused == 0
    assert 12.0 - backend.slack_s <= refused.retry_after_s <= 12.0
    state = refused.states[0]
    assert (state.key, state.limit, state.remaining) == ("key:k1:rpm", 5, 0)
    assert 60.0 - backend.slack_s <= state.reset_s <= 60.0


async def test_rate_drains_over_time(backend: Backend) -> None:
    demand = rpm(2, window_s=1.0)  # one request drains every 0.5 s
    for _ in range(2):
        assert (await take(backend.limiter, demand)).allowed
    refused = await take(backend.limiter, demand)
    assert not refused.allowed
    assert 0.5 - backend.slack_s <= refused.retry_after_s <= 0.5
    await backend.elapse(0.6)
    assert (await take(backend.limiter, demand)).allowed
    assert not (await take(backend.limiter, demand)).allowed
    await backend.elapse(1.05)  # long enough to drain both
    whole = await take(backend.limiter, Demand(demand.key, RATE, 2, 2, 1.0))
    assert whole.allowed
    assert whole.states[0].remaining == 0


async def test_tpm_reserves_then_settles_refunds_and_charges(backend: Backend) -> None:
    limiter = backend.limiter
    first = await take(limiter, tpm(1000, 800), lease="r1")
    assert first.allowed
    assert first.states[0].remaining == 200
    assert not (await take(limiter, tpm(1000, 300))).allowed
    # Used 100 of the 800 reserved: refund 700 (a few ms of draining may shave one token).
    (value,) = await limiter.settle([settle_of(tpm(1000, 800), -700)], "r1")
    assert 99 <= value <= 100
    second = await take(limiter, tpm(1000, 300), lease="r2")
    assert second.allowed
    assert 600 <= second.states[0].remaining <= 601
    # Used 800 of the 300 reserved: charge 500 more.
    (value,) = await limiter.settle([settle_of(tpm(1000, 300), 500)], "r2")
    assert 899 <= value <= 900
    refused = await take(limiter, tpm(1000, 200))
    assert not refused.allowed
    assert 99 <= refused.states[0].remaining <= 100


async def test_settling_a_drained_rate_counter_still_charges(backend: Backend) -> None:
    (value,) = await backend.limiter.settle([settle_of(tpm(1000, 0), 400)], "r1")
    assert 399 <= value <= 400
    assert not (await take(backend.limiter, tpm(1000, 700))).allowed
    (value,) = await backend.limiter.settle([settle_of(tpm(1000, 0), -5000)], "r1")
    assert value == 0  # clamped: never below empty
    assert (await take(backend.limiter, tpm(1000, 1000))).allowed


async def test_a_refusal_takes_nothing_from_the_demands_that_fit(backend: Backend) -> None:
    limiter = backend.limiter
    team = rpm(1, key="team:t1:rpm")
    assert (await take(limiter, team)).allowed
    demands = (rpm(5), parallel(1), budget(1000, 400, seed=100), team)
    refused = await take(limiter, *demands)
    assert not refused.allowed
    assert refused.refused == 3
    assert [s.remaining for s in refused.states] == [5, 1, 900, 0]
    # Each counter as it stands: an empty rpm and no lease are whole now, a new period's
    # budget counter would live its whole window, the team's rpm drains in a minute.
    resets = [s.reset_s for s in refused.states]
    assert resets[:2] == [0.0, 0.0]
    assert resets[2] == 3600.0
    assert 60.0 - backend.slack_s <= resets[3] <= 60.0
    # Nothing was taken: the key's rpm, its one parallel slot and the budget are all intact.
    after = await take(limiter, rpm(5), parallel(1), budget(1000, 900, seed=100))
    assert after.allowed
    assert [s.remaining for s in after.states] == [4, 0, 0]


async def test_the_first_demand_that_does_not_fit_is_reported(backend: Backend) -> None:
    assert (await take(backend.limiter, parallel(1), rpm(1))).allowed
    refused = await take(backend.limiter, rpm(5, key="other"), parallel(1), rpm(1))
    assert refused.refused == 1  # the parallel slot, though the rpm refuses too
    assert 60.0 - backend.slack_s <= refused.retry_after_s <= 60.0  # when the lease expires


@pytest.mark.parametrize(
    "demand",
    [tpm(100, 101), parallel(0), budget(1000, 1001)],
    ids=["rate", "concurrency", "budget"],
)
async def test_an_amount_beyond_the_limit_is_refused_for_good(
    backend: Backend, demand: Demand
) -> None:
    refused = await take(backend.limiter, rpm(10), demand)
    assert not refused.allowed
    assert refused.refused == 1
    assert math.isinf(refused.retry_after_s)
    assert refused.states[0].remaining == 10  # the rpm that fitted was not taken


async def test_concurrency_leases_are_held_until_settled(backend: Backend) -> None:
    limiter = backend.limiter
    demand = parallel(2)
    first = await take(limiter, demand, lease="l1")
    assert first.states[0].remaining == 1
    assert 60.0 - backend.slack_s <= first.states[0].reset_s <= 60.0
    assert (await take(limiter, demand, lease="l2")).states[0].remaining == 0
    refused = await take(limiter, demand, lease="l3")
    assert not refused.allowed
    assert 60.0 - backend.slack_s <= refused.retry_after_s <= 60.0
    assert await limiter.settle([settle_of(demand)], "l1") == (1,)
    assert (await take(limiter, demand, lease="l3")).allowed
    assert await limiter.settle([settle_of(demand)], "l2") == (1,)
    assert await limiter.settle([settle_of(demand)], "l3") == (0,)
    assert await limiter.settle([settle_of(demand)], "l3") == (0,)  # twice is harmless
    assert (await take(limiter, demand)).states[0].remaining == 1


async def test_a_lease_taken_again_holds_one_slot_with_its_new_expiry(backend: Backend) -> None:
    limiter = backend.limiter
    assert (await take(limiter, parallel(3, window_s=120.0), lease="long")).allowed
    assert (await take(limiter, parallel(3, window_s=30.0), lease="l1")).allowed
    again = await take(limiter, parallel(3, window_s=90.0), lease="l1")
    assert again.states[0].remaining == 1  # "long" and "l1", once
    assert 120.0 - backend.slack_s <= again.states[0].reset_s <= 120.0  # "long" expires last
    assert await limiter.settle([settle_of(parallel(3))], "long") == (1,)
    assert (await take(limiter, parallel(3, window_s=60.0), lease="l1")).states[0].remaining == 2
    after = await take(limiter, parallel(3, window_s=10.0), lease="l2")
    assert after.states[0].remaining == 1
    assert 60.0 - backend.slack_s <= after.states[0].reset_s <= 60.0  # l1's new expiry


async def test_concurrency_leases_expire_after_the_window(backend: Backend) -> None:
    demand = parallel(1, window_s=1.0)
    assert (await take(backend.limiter, demand, lease="crashed")).allowed
    assert not (await take(backend.limiter, demand)).allowed
    await backend.elapse(1.05)
    after = await take(backend.limiter, demand, lease="next")
    assert after.allowed
    assert after.states[0].remaining == 0


async def test_budget_starts_at_the_seed_and_counts_reservations(backend: Backend) -> None:
    limiter = backend.limiter
    first = await take(limiter, budget(1000, 500, seed=300), lease="r1")
    assert first.allowed
    state = first.states[0]
    assert state.remaining == 200
    assert 3600 - 1 <= state.reset_s <= 3600
    # The seed only starts a new counter: the 500 reserved still counts against the limit.
    refused = await take(limiter, budget(1000, 300, seed=0))
    assert not refused.allowed
    assert refused.states[0].remaining == 200
    assert 3600 - 1 <= refused.retry_after_s <= 3600  # the period's end
    assert await limiter.settle([settle_of(budget(1000, 500), -400)], "r1") == (400,)
    second = await take(limiter, budget(1000, 600), lease="r2")
    assert second.allowed
    assert second.states[0].remaining == 0
    assert await limiter.settle([settle_of(budget(1000, 600), 100)], "r2") == (1100,)
    assert await limiter.settle([settle_of(budget(1000, 0), -5000)], "r3") == (0,)  # clamped


async def test_a_missing_budget_counter_is_not_settled(backend: Backend) -> None:
    assert await backend.limiter.settle([settle_of(budget(1000, 0), 700)], "r1") == (0,)
    fresh = await take(backend.limiter, budget(1000, 100, seed=50))
    assert fresh.states[0].remaining == 850  # from the seed, without the skipped 700


async def test_a_budget_counter_expires_after_its_window(backend: Backend) -> None:
    demand = budget(1000, 900, window_s=1.0)
    assert (await take(backend.limiter, demand)).allowed
    assert not (await take(backend.limiter, demand)).allowed
    await backend.elapse(1.05)
    assert (await take(backend.limiter, demand)).allowed  # a new counter from its seed


async def test_first_time_is_true_once_per_flag_within_the_ttl(backend: Backend) -> None:
    limiter, twin = backend.limiter, backend.twin
    assert await limiter.first_time("alert:key:k1:2026-11", 1.0)
    assert not await limiter.first_time("alert:key:k1:2026-11", 1.0)
    assert not await twin.first_time("alert:key:k1:2026-11", 1.0)
    assert await twin.first_time("alert:team:t1:2026-11", 1.0)
    await backend.elapse(1.05)
    assert await limiter.first_time("alert:key:k1:2026-11", 1.0)


async def test_states_follow_the_demands_order(backend: Backend) -> None:
    demands = (budget(900, 10), tpm(700, 7), parallel(3), rpm(5), rpm(6, key="team:t1:rpm"))
    decision = await take(backend.limiter, *demands)
    assert decision.allowed
    assert [(s.key, s.limit) for s in decision.states] == [(d.key, d.limit) for d in demands]
    assert [s.remaining for s in decision.states] == [890, 693, 2, 4, 5]
    settled = await backend.limiter.settle([settle_of(d) for d in reversed(demands)], "x")
    assert len(settled) == len(demands)
    assert await backend.limiter.acquire([], "none") == Decision(True, ())
    assert await backend.limiter.settle([], "none") == ()


async def test_one_limit_holds_exactly_under_concurrent_acquires(backend: Backend) -> None:
    demand = rpm(50)
    clients = [backend.limiter, backend.twin]
    decisions = await asyncio.gather(
        *(take(clients[n % 2], demand, lease=f"r{n}") for n in range(200))
    )
    assert sum(d.allowed for d in decisions) == 50
    assert sum(d.allowed for d in decisions[0::2]) > 0  # both clients took part
    assert sum(d.allowed for d in decisions[1::2]) > 0


async def test_check_passes_when_the_backend_is_reachable(backend: Backend) -> None:
    await backend.limiter.check()


@pytest.mark.parametrize(
    "call",
    [
        lambda lim: lim.acquire([rpm(1)], "l"),
        lambda lim: lim.settle([settle_of(rpm(1))], "l"),
        lambda lim: lim.first_time("f", 1.0),
        lambda lim: lim.check(),
    ],
    ids=["acquire", "settle", "first_time", "check"],
)
async def test_an_unreachable_redis_raises_limiter_unavailable_quickly(
    call: Callable[[Limiter], Awaitable[object]],
) -> None:
    pytest.importorskip("redis")
    from headrace.limits.redis import RedisLimiter

    limiter = RedisLimiter("redis://127.0.0.1:1/0")  # nothing listens on port 1
    started = time.perf_counter()
    with pytest.raises(LimiterUnavailableError, match=r"127\.0\.0\.1:1.*limits\.redis_url"):
        await call(limiter)
    assert time.perf_counter() - started < 0.5
    await limiter.aclose()


async def test_redis_losing_the_script_loads_it_again(redis_url: str | None) -> None:
    # As after a restart of a Redis that keeps data but not scripts: EVALSHA answers NOSCRIPT.
    if not redis_url:
        pytest.skip(NO_REDIS)
    from redis.asyncio import Redis

    from headrace.limits.redis import RedisLimiter

    prefix = f"headrace-test:lim:{uuid.uuid4().hex}:"
    limiter = RedisLimiter(redis_url, prefix=prefix, timeout_s=5.0)
    client = Redis.from_url(redis_url)
    try:
        demands = [rpm(10), Demand("key:k1:parallel", CONCURRENCY, 5, 1, 60.0)]
        assert (await limiter.acquire(demands, "r0")).allowed
        await client.script_flush()
        decision = await limiter.acquire(demands, "r1")  # an acquire's own command
        assert decision.allowed
        assert [s.remaining for s in decision.states] == [8, 3]
        await client.script_flush()
        assert await limiter.settle([settle_of(d) for d in demands], "r1") == (2, 1)
    finally:
        await limiter.aclose()
        await client.aclose()
        await delete_keys(redis_url, prefix)


async def test_redis_closing_the_connections_costs_no_call(redis_url: str | None) -> None:
    # As after a Redis restart: the pooled connections are dead, the next calls reconnect.
    if not redis_url:
        pytest.skip(NO_REDIS)
    from redis.asyncio import Redis

    from headrace.limits.redis import RedisLimiter

    name = f"headrace-test-{uuid.uuid4().hex}"
    prefix = f"headrace-test:lim:{uuid.uuid4().hex}:"
    limiter = RedisLimiter(f"{redis_url}?client_name={name}", prefix=prefix, timeout_s=5.0)
    client = Redis.from_url(redis_url)
    try:
        demands = [rpm(10), Demand("key:k1:parallel", CONCURRENCY, 5, 1, 60.0)]
        calls = [limiter.acquire(demands, f"r{n}") for n in range(3)]  # three connections
        assert all(d.allowed for d in await asyncio.gather(*calls))
        ids = [c["id"] for c in await client.client_list() if c.get("name") == name]
        assert ids
        for client_id in ids:
            await client.client_kill_filter(_id=client_id)
        assert (await limiter.acquire(demands, "r3")).allowed
        assert await limiter.settle([settle_of(d) for d in demands], "r3") == (4, 3)
        await limiter.check()
        assert await limiter.first_time("flag", 10.0)
    finally:
        await limiter.aclose()
        await client.aclose()
        await delete_keys(redis_url, prefix)


async def test_redis_a_cancelled_call_is_cancelled_and_the_next_ones_answer_in_order(
    redis_url: str | None,
) -> None:
    # A caller cancelled while its command is on the wire (a client that left) must see the
    # cancellation, and the connection must not hand its late reply to the next caller.
    if not redis_url:
        pytest.skip(NO_REDIS)

    from headrace.limits.redis import RedisLimiter

    prefix = f"headrace-test:lim:{uuid.uuid4().hex}:"
    limiter = RedisLimiter(redis_url, prefix=prefix, timeout_s=5.0)
    try:
        parallel = Demand("key:k1:parallel", CONCURRENCY, 1000, 1, 60.0)
        assert (await limiter.acquire([parallel], "warm")).allowed
        for turns in range(1, 4):
            call = asyncio.create_task(limiter.acquire([parallel, rpm(100)], f"c{turns}"))
            for _ in range(turns):
                await asyncio.sleep(0)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            state = (await limiter.acquire([rpm(100, key="key:k2:rpm")], f"n{turns}")).states
            assert [s.key for s in state] == ["key:k2:rpm"]
    finally:
        await limiter.aclose()
        await delete_keys(redis_url, prefix)
