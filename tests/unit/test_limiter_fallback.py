"""FallbackLimiter: local limits while the shared backend is down, each lease settled where taken.

The shared backend that is down is a real ``RedisLimiter`` on a port nothing listens on (its
calls fail in about a millisecond), or the in-memory limiter switched off as Redis going away
would be (:class:`Switchable`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from structlog.testing import capture_logs

from headrace.limits.base import (
    Decision,
    Demand,
    Limiter,
    LimiterUnavailableError,
    LimitKind,
    Settlement,
)
from headrace.limits.fallback import FallbackLimiter
from headrace.limits.memory import MemoryLimiter
from headrace.limits.redis import RedisLimiter

NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused
RETRY_S = 5.0


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def parallel(limit: int) -> Demand:
    return Demand("key:k1:parallel", LimitKind.CONCURRENCY, limit, 1, 60.0)


class Switchable(MemoryLimiter):
    """The in-memory limiter, failing as an unreachable backend does while ``down``."""

    down = False

    async def acquire(self, demands: Sequence[Demand], lease: str) -> Decision:
        if self.down:
            raise LimiterUnavailableError("the shared backend went away")
        return await super().acquire(demands, lease)

    def settle(
        self, settlements: Sequence[Settlement], lease: str
    ) -> asyncio.Future[tuple[int, ...]]:
        if not self.down:
            return super().settle(settlements, lease)
        lost: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        lost.set_exception(LimiterUnavailableError("the shared backend went away"))
        return lost


def fallback(shared: Limiter, clock: Clock) -> FallbackLimiter:
    return FallbackLimiter(shared, MemoryLimiter(clock=clock), retry_after_s=RETRY_S, clock=clock)


async def admitted_then_down() -> FallbackLimiter:
    """A fallback limiter whose shared backend admitted lease ``a``, then went away."""
    clock = Clock()
    shared = Switchable(clock=clock)
    limiter = fallback(shared, clock)
    assert (await limiter.acquire([parallel(2)], "a")).allowed
    shared.down = True
    return limiter


async def test_with_the_backend_down_limits_hold_locally_and_it_says_so_once() -> None:
    clock = Clock()
    limiter = fallback(RedisLimiter(NOWHERE), clock)
    with capture_logs() as logs:
        first = await limiter.acquire([parallel(1)], "a")
        second = await limiter.acquire([parallel(1)], "b")
    assert first.allowed
    assert not second.allowed  # the one slot is held locally
    assert limiter.degraded
    assert [e["event"] for e in logs] == ["limiter_backend_down"]
    # The local lease settles locally: its slot is free again.
    assert await limiter.settle([Settlement.of(parallel(1))], "a") == (0,)
    assert (await limiter.acquire([parallel(1)], "c")).allowed
    await limiter.aclose()


async def test_the_shared_backend_is_tried_again_after_retry_after_s() -> None:
    clock = Clock()
    shared = MemoryLimiter(clock=clock)
    limiter = FallbackLimiter(
        shared, MemoryLimiter(clock=clock), retry_after_s=RETRY_S, clock=clock
    )
    limiter._went_down(LimiterUnavailableError("down"))
    assert (await limiter.acquire([parallel(1)], "local")).allowed
    clock.now = RETRY_S + 0.1
    assert not limiter.degraded
    assert (await limiter.acquire([parallel(1)], "shared")).allowed
    # Each lease went to a different backend: the shared one holds only its own.
    assert not (await shared.acquire([parallel(1)], "probe")).allowed
    assert await limiter.settle([Settlement.of(parallel(1))], "shared") == (0,)
    assert (await shared.acquire([parallel(1)], "probe")).allowed


async def test_a_lost_settlement_answers_zeros_and_marks_the_backend_down() -> None:
    limiter = await admitted_then_down()
    with capture_logs() as logs:
        values = await limiter.settle([Settlement.of(parallel(2))], "a")
    assert values == (0,)  # the counters stay as reserved; the lease expires on its TTL
    assert limiter.degraded
    assert [e["event"] for e in logs] == ["limiter_backend_down"]


async def test_a_settlement_whose_caller_stopped_waiting_still_marks_the_backend_down() -> None:
    limiter = await admitted_then_down()
    settling = limiter.settle([Settlement.of(parallel(2))], "a")
    settling.cancel()
    await asyncio.sleep(0)  # the shared backend's answer arrives
    assert limiter.degraded
