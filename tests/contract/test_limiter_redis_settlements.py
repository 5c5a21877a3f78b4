"""RedisLimiter's held settlements: they ride the next acquire or go together after the linger.

A settlement waits up to ``settle_linger_s`` for a call to carry it; these tests set the
linger to a minute where only an acquire or :meth:`RedisLimiter.aclose` may send it. Real Redis
(``HEADRACE_TEST_REDIS_URL``) except where the tests need a Redis that is not there.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from headrace.gateway.quota import Estimate, QuotaGuard, Reservation
from headrace.limits.base import Demand, LimiterUnavailableError, LimitKind, Settlement
from headrace.limits.redis import RedisLimiter
from tests.contract.test_limiter import delete_keys

NO_REDIS = "set HEADRACE_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/0) to run against Redis"
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1
MINUTE = 60.0

Factory = Callable[..., RedisLimiter]


@pytest.fixture
async def limiters(redis_url: str | None) -> AsyncIterator[Factory]:
    """RedisLimiters on one fresh prefix; closed, and their keys deleted, afterwards."""
    if not redis_url:
        pytest.skip(NO_REDIS)

    prefix = f"headrace-test:lim:{uuid.uuid4().hex}:"
    made: list[RedisLimiter] = []

    def make(**kwargs: Any) -> RedisLimiter:
        limiter = RedisLimiter(redis_url, prefix=prefix, timeout_s=5.0, **kwargs)
        made.append(limiter)
        return limiter

    try:
        yield make
    finally:
        for limiter in made:
            await limiter.aclose()
        await delete_keys(redis_url, prefix)


def parallel(limit: int) -> Demand:
    return Demand("key:k1:parallel", LimitKind.CONCURRENCY, limit, 1, MINUTE)


def tpm(amount: int) -> Demand:
    # Per hour, so that the level drains by less than one token in the tests' few seconds.
    return Demand("key:k1:tpm", LimitKind.RATE, 1000, amount, 3600.0)


def settled(tokens_delta: int) -> list[Settlement]:
    """A request's settlement: its tokens moved by ``tokens_delta``, its parallel slot freed."""
    return [Settlement.of(tpm(0), tokens_delta), Settlement.of(parallel(1))]


def count_calls(limiter: RedisLimiter, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The commands ``limiter`` sends from now on (their names)."""
    sent: list[str] = []
    connection = limiter._redis
    send = connection.send

    async def counted(command: bytes) -> Any:
        sent.append(command.split(b"\r\n", 3)[2].decode())  # *N, $length, the name
        return await send(command)

    monkeypatch.setattr(connection, "send", counted)
    return sent


async def test_a_settlement_rides_the_next_acquire_which_sees_it_applied(
    limiters: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = limiters(settle_linger_s=MINUTE)
    assert (await limiter.acquire([tpm(100), parallel(1)], "a")).allowed
    sent = count_calls(limiter, monkeypatch)
    settling = limiter.settle(settled(-60), "a")
    for _ in range(3):
        await asyncio.sleep(0)
    assert not settling.done()  # held
    assert sent == []
    decision = await limiter.acquire([tpm(100), parallel(1)], "b")
    # One command: the settlement first (40 tokens left of 100, the slot free), then "b".
    assert decision.allowed, decision
    assert [s.remaining for s in decision.states] == [1000 - 40 - 100, 0]
    assert await settling == (40, 0)
    assert sent == ["EVALSHA"]


async def test_settlements_within_the_linger_go_in_one_call_each_answered_with_its_own(
    limiters: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter, twin = limiters(settle_linger_s=0.05), limiters()
    for n in range(5):
        assert (await limiter.acquire([tpm(100), parallel(5)], f"r{n}")).allowed
    sent = count_calls(limiter, monkeypatch)
    values = await asyncio.gather(*(limiter.settle(settled(-10), f"r{n}") for n in range(5)))
    assert sent == ["EVALSHA"]
    # Applied in order: the tokens go 490, 480, ..., the slots 4, 3, ...
    assert values == [(500 - 10 * n, 5 - n) for n in range(1, 6)]
    after = await twin.acquire([tpm(0), parallel(1)], "check")
    assert [s.remaining for s in after.states] == [1000 - 450, 0]


async def test_a_settlement_alone_goes_after_the_linger(limiters: Factory) -> None:
    limiter = limiters(settle_linger_s=0.02)
    assert (await limiter.acquire([tpm(100), parallel(1)], "a")).allowed
    assert await asyncio.wait_for(limiter.settle(settled(-100), "a"), 5.0) == (0, 0)


async def test_aclose_sends_every_settlement_still_held(limiters: Factory) -> None:
    limiter, twin = limiters(settle_linger_s=MINUTE), limiters()
    for n in range(3):
        assert (await limiter.acquire([tpm(100), parallel(3)], f"r{n}")).allowed
    settling = [limiter.settle(settled(-50), f"r{n}") for n in range(3)]
    await asyncio.sleep(0)
    await limiter.aclose()
    assert [t.result() for t in settling] == [(250, 2), (200, 1), (150, 0)]
    after = await twin.acquire([tpm(0), parallel(3)], "check")
    assert [s.remaining for s in after.states] == [850, 2]


async def test_a_settle_whose_caller_stops_waiting_is_still_applied(limiters: Factory) -> None:
    limiter = limiters(settle_linger_s=MINUTE)
    assert (await limiter.acquire([parallel(1)], "a")).allowed
    settling = limiter.settle([Settlement.of(parallel(1))], "a")
    await asyncio.sleep(0)
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling
    assert (await limiter.acquire([parallel(1)], "b")).allowed  # "a"'s slot was released


async def test_an_acquire_cancelled_mid_call_still_applies_and_answers_what_it_carried(
    limiters: Factory,
) -> None:
    limiter, twin = limiters(settle_linger_s=MINUTE), limiters()
    assert (await limiter.acquire([parallel(1)], "a")).allowed
    settling = limiter.settle([Settlement.of(parallel(1))], "a")
    await asyncio.sleep(0)
    acquiring = asyncio.create_task(limiter.acquire([parallel(5)], "b"))
    await asyncio.sleep(0)
    acquiring.cancel()  # its client left while the command was on the wire
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    assert await asyncio.wait_for(settling, 5.0) == (0,)
    # The cancelled acquire's own demand was taken, as a cancelled acquire's always may be.
    after = await twin.acquire([parallel(5)], "check")
    assert after.states[0].remaining == 3


async def test_a_failed_call_fails_every_settlement_it_carried() -> None:
    limiter = RedisLimiter(NOWHERE, settle_linger_s=MINUTE)
    settling = [limiter.settle(settled(-5), f"r{n}") for n in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(LimiterUnavailableError):
        await limiter.acquire([tpm(10)], "next")
    for task in settling:
        with pytest.raises(LimiterUnavailableError, match=r"127\.0\.0\.1:1"):
            await task
    await limiter.aclose()


async def test_a_failed_flush_fails_every_settlement_held() -> None:
    limiter = RedisLimiter(NOWHERE, settle_linger_s=0.01)
    settling = [limiter.settle(settled(-5), f"r{n}") for n in range(2)]
    results = await asyncio.gather(*settling, return_exceptions=True)
    assert [type(r) for r in results] == [LimiterUnavailableError] * 2
    await limiter.aclose()


async def test_the_quota_guard_logs_each_settlement_a_failed_call_carried() -> None:
    # limits.on_backend_down: refuse (no fallback): as with one settlement per call, each
    # lost settlement is a warning with its lease.
    limiter = RedisLimiter(NOWHERE, settle_linger_s=MINUTE)
    guard = QuotaGuard(limiter)
    demand = parallel(1)
    with capture_logs() as logs:
        for n in range(3):
            held = Reservation(f"r{n}", (demand,), Estimate(0, 0), (None,), (0,), (0,))
            guard.settle_later(held, tokens=0, cost_micro_usd=0)
        await asyncio.sleep(0)
        await limiter.aclose()
        await guard.aclose()
    failed = [e["lease"] for e in logs if e["event"] == "quota_settle_failed"]
    assert sorted(failed) == ["r0", "r1", "r2"]


async def test_a_settlement_is_held_before_settle_later_returns(limiters: Factory) -> None:
    # No loop turn between a request's settlement and the same client's next request: that
    # request's acquire carries the settlement, so its parallel slot is free again.
    guard = QuotaGuard(limiters())
    demand = parallel(1)
    lease = "first"
    taken = await guard.limiter.acquire([demand], lease)
    assert taken.allowed
    first = Reservation(lease, (demand,), Estimate(0, 0), (None,), (0,), (0,))
    guard.settle_later(first, tokens=0, cost_micro_usd=0)
    again = await guard.limiter.acquire([demand], "second")
    assert again.allowed
    await guard.aclose()
