"""Group commit: writes that arrive while one is in progress share the next transaction.

A job submission or a job result is one small transaction; at a few hundred per second the
fixed cost of each (a round trip per statement, the commit, building the statements) is most
of the work. :class:`GroupCommit` gives every caller its own ``await`` but writes their items
together: the first item is written at once, alone; the items that arrive while that write
is in progress wait for it and then go in one batch, and so on. Under a light load nothing
waits for a timer; under a heavy one, batches grow with the load.

Each caller gets the result of its own item, or the batch's exception (nothing in a failed
batch was stored, so nothing is reported as stored).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Write = Callable[[list[T]], Awaitable[Sequence[R]]]


class GroupCommit(Generic[T, R]):
    """Batches :meth:`add` calls into ``write`` calls of at most ``max_batch`` items, with at
    most ``max_writes`` writes in progress at once.

    ``write`` gets a list of items and returns their results in the same order.
    """

    def __init__(self, write: Write[T, R], *, max_batch: int = 500, max_writes: int = 1) -> None:
        self._write = write
        self._max_batch = max_batch
        self._max_writes = max_writes
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._writers: set[asyncio.Task[None]] = set()

    async def add(self, item: T) -> R:
        """Write ``item`` in the next batch; its result. Cancelling the caller does not take
        the item back: once added, it is written."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if len(self._writers) < self._max_writes:
            writer = asyncio.get_running_loop().create_task(self._drain())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return await asyncio.shield(done)

    async def wait_idle(self) -> None:
        """Until every item added so far is written (or failed)."""
        while self._writers:
            await asyncio.gather(*self._writers, return_exceptions=True)

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                results = await self._write([item for item, _ in batch])
            except asyncio.CancelledError:  # shutting down: whoever still waits learns it
                for _, done in batch + self._pending:
                    done.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)
