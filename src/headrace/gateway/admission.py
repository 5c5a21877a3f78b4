"""Admission control: a bounded number of model requests at once, a bounded queue behind them.

When every slot is taken, requests wait in a queue ordered by priority (then arrival). When
the queue is full, the least important request is shed with 503 and ``Retry-After``: the
newcomer itself if nothing waiting is less important, else the least important waiter. A
request that waits longer than ``max_wait_s`` is shed too. Under pressure, lower priorities
go first and the process keeps its latency instead of collapsing.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from headrace.domain import Priority
from headrace.errors import OverloadedError
from headrace.observability.metrics import Metrics


@dataclass(order=True)
class _Waiter:
    rank: int  # negative priority rank: the heap pops the most important first
    seq: int
    future: asyncio.Future[None] = field(compare=False)
    priority: Priority = field(compare=False)


def _granted(waiter: _Waiter) -> bool:
    future = waiter.future
    return future.done() and not future.cancelled() and future.exception() is None


def _shed(reason: str, retry_after_s: int) -> OverloadedError:
    return OverloadedError(
        f"Headrace is at capacity ({reason}); retry after {retry_after_s} s.",
        headers={"Retry-After": str(retry_after_s)},
    )


class Admission:
    def __init__(
        self,
        *,
        max_concurrent: int,
        max_queue: int,
        max_wait_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._free = max_concurrent
        self._max_queue = max_queue
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._retry_after_s = max(1, round(max_wait_s / 2))

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._queue if not w.future.done())

    @property
    def free(self) -> int:
        return self._free

    def _count_shed(self, priority: Priority) -> None:
        if self._metrics is not None:
            self._metrics.shed.labels(priority.value).inc()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.admission_queue.set(len(self._queue))

    @asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        """Hold one serving slot for the duration of the block; raise 503 if shed."""
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: Priority) -> None:
        if self._free > 0 and not self._queue:
            self._free -= 1
            return
        if len(self._queue) >= self._max_queue:
            least = max(self._queue) if self._queue else None
            if least is None or -least.rank >= priority.rank:
                self._count_shed(priority)
                raise _shed("queue full", self._retry_after_s)
            self._queue.remove(least)
            heapq.heapify(self._queue)
            self._count_shed(least.priority)
            least.future.set_exception(_shed("shed for a higher priority", self._retry_after_s))
        waiter = _Waiter(
            -priority.rank, next(self._seq), asyncio.get_running_loop().create_future(), priority
        )
        heapq.heappush(self._queue, waiter)
        self._gauge()
        try:
            async with asyncio.timeout(self._max_wait_s):
                await waiter.future
        except TimeoutError:
            self._forget(waiter)
            if _granted(waiter):
                return  # the slot arrived as the wait ran out: keep it
            self._count_shed(priority)
            raise _shed(f"waited {self._max_wait_s:g} s", self._retry_after_s) from None
        except BaseException:
            if _granted(waiter):
                self._release()  # granted just as we were cancelled: pass it on
            self._forget(waiter)
            raise

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self._queue:
            self._queue.remove(waiter)
            heapq.heapify(self._queue)
        self._gauge()

    def _release(self) -> None:
        while self._queue:
            waiter = heapq.heappop(self._queue)
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot passes straight to the waiter
                self._gauge()
                return
        self._free += 1
        self._gauge()
