"""A shared limiter that degrades to a local one while its backend is unreachable.

With Redis down, each gateway process keeps limiting on its own (a key's N processes then
admit up to N times its limit) instead of refusing all traffic; ``/health/ready`` reports the
limiter as degraded meanwhile. After ``retry_after_s`` the shared backend is tried again. A
request settles on the backend that admitted it. ``on_backend_down="refuse"`` in the settings
skips this wrapper: requests then fail with 503 while the backend is down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import structlog

from headrace.limits.base import Decision, Demand, Limiter, LimiterUnavailableError, Settlement

log = structlog.get_logger("headrace")


class FallbackLimiter:
    def __init__(
        self,
        shared: Limiter,
        local: Limiter,
        *,
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shared = shared
        self._local = local
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._down_until = 0.0
        self._local_leases: set[str] = set()

    @property
    def degraded(self) -> bool:
        return self._down_until > self._clock()

    async def start(self) -> None:
        await self._local.start()
        try:
            await self._shared.start()
        except LimiterUnavailableError as exc:
            self._went_down(exc)

    async def acquire(self, demands: Sequence[Demand], lease: str) -> Decision:
        if not self.degraded:
            try:
                return await self._shared.acquire(demands, lease)
            except LimiterUnavailableError as exc:
                self._went_down(exc)
        self._local_leases.add(lease)
        return await self._local.acquire(demands, lease)

    def settle(
        self, settlements: Sequence[Settlement], lease: str
    ) -> asyncio.Future[tuple[int, ...]]:
        if lease in self._local_leases:
            self._local_leases.discard(lease)
            return self._local.settle(settlements, lease)
        shared = self._shared.settle(settlements, lease)
        done: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()

        def relay(answer: asyncio.Future[tuple[int, ...]]) -> None:
            exc = None if answer.cancelled() else answer.exception()
            if isinstance(exc, LimiterUnavailableError):
                # The counters stay as reserved; leases expire on their own TTL.
                self._went_down(exc)
            if done.done():
                return  # its caller stopped waiting
            if answer.cancelled():
                done.cancel()
            elif isinstance(exc, LimiterUnavailableError):
                done.set_result(tuple(0 for _ in settlements))
            elif exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(answer.result())

        shared.add_done_callback(relay)
        return done

    async def first_time(self, flag: str, ttl_s: float) -> bool:
        if not self.degraded:
            try:
                return await self._shared.first_time(flag, ttl_s)
            except LimiterUnavailableError as exc:
                self._went_down(exc)
        return await self._local.first_time(flag, ttl_s)

    async def check(self) -> None:
        await self._shared.check()
        self._down_until = 0.0

    async def aclose(self) -> None:
        await self._shared.aclose()
        await self._local.aclose()

    def _went_down(self, exc: Exception) -> None:
        if not self.degraded:
            log.warning("limiter_backend_down", error=str(exc), fallback="local limits")
        self._down_until = self._clock() + self._retry_after_s
