"""Usage records past their retention, deleted in the background (``usage.retention_days``).

One record per request is the audit trail, and it grows with traffic: a gateway answering
1,000 requests/s stores 86 million rows a day. Reports (``/admin/usage``, ``/v1/usage``,
``headrace usage``) and budgets read only the per-day aggregates, which are kept; so past its
retention a record can go without changing any figure Headrace shows.

Every gateway and worker process with usage on runs one :class:`UsagePurger`: every
:data:`PURGE_EVERY_S` (the first time shortly after start) it deletes the records older than
the retention, oldest first, :data:`PURGE_BATCH` per transaction, until a batch comes back
short. Processes purging at once skip each other's rows (PostgreSQL), or queue for SQLite's
one writer. A failure (the database down) is logged and tried again at the next round.

A record is written exactly once because its id is remembered: a record deleted here and then
replayed from a spool file would be stored and counted again. Spool files are replayed as soon
as the database is back, and the retention is a day at least, so that would take a database
down for longer than the retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

import structlog

log = structlog.get_logger("headrace")

PURGE_EVERY_S = 600.0  # between rounds
FIRST_PURGE_S = 30.0  # after start: not in the start's own rush
PURGE_BATCH = 5000  # records per transaction


class UsagePurgeStore(Protocol):
    """The store's purge (structural, so no import of it)."""

    async def purge_usage(self, created_before: float, limit: int) -> int: ...


class UsagePurger:
    """Deletes usage records older than ``retention_s`` (see the module doc)."""

    def __init__(
        self,
        store: UsagePurgeStore,
        retention_s: float,
        *,
        every_s: float = PURGE_EVERY_S,
        first_after_s: float = FIRST_PURGE_S,
        batch: int = PURGE_BATCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention_s <= 0:
            raise ValueError("retention_s must be positive")
        self._store = store
        self._retention_s = retention_s
        self._every_s = every_s
        self._first_after_s = first_after_s
        self._batch = batch
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="headrace-usage-purger"
            )

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop between transactions or in the middle of one (which then rolls back)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def purge(self) -> int:
        """One round: delete every record past the retention; how many (0 on a failure)."""
        before = self._clock() - self._retention_s
        purged = 0
        try:
            while True:
                deleted = await self._store.purge_usage(before, self._batch)
                purged += deleted
                if deleted < self._batch:
                    break
        except Exception as exc:
            log.warning("usage_purge_failed", error=repr(exc), purged=purged)
        if purged:
            log.info("usage_purged", records=purged, created_before=before)
        return purged

    async def _run(self) -> None:
        await asyncio.sleep(self._first_after_s)
        while True:
            await self.purge()
            await asyncio.sleep(self._every_s)
