"""JobWatch: one poll per process for every job that an event stream follows.

``GET /v1/jobs/{id}/events`` streams a job's status changes, which may be made by any process
(a worker, another gateway). Each open stream used to read its job every 0.2 s, two queries a
turn: 100 streams of idle jobs kept a gateway at more than a core (bench/job_events.py).
Streams now wait here instead. While any waits, one query every ``interval_s``
(:meth:`JobQueue.event_seqs`, up to :data:`IDS_PER_QUERY` jobs each) reads the latest event
sequence of every job followed, and wakes the waiters whose job moved past what they have
seen, or is gone; only they read their events. The database's load is then one query per
``interval_s`` per process, however many streams are open, and a change reaches its streams
within ``interval_s`` plus a query.

A change made in this process need not wait for the turn: whoever makes it (the job runner
of ``headrace serve``, a cancel through the API, an idempotent request run inline) calls
:meth:`JobWatch.nudge` with the jobs it changed once its transaction has committed, and if
any of them is followed the poll runs at once, though no sooner than :data:`NUDGE_GAP_S`
after the last one: a busy runner commits changes faster than polls are worth making, and
nudges that arrive meanwhile make one more poll, not one each. So on the embedded default,
where the gateway runs its own jobs, a stream sees each change within a query (and at most
``NUDGE_GAP_S``); a change made by another process still waits for the next turn.

The poll stops when the last waiter leaves and starts again with the next. A failed poll
(the database down) is logged and tried again at the next turn; a waiter gives up after its
own timeout, so a stream never hangs on the watch (docs/adr/0010-jobs-and-queue.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterable

import structlog

from headrace.queue.base import JobQueue

log = structlog.get_logger("headrace")

POLL_INTERVAL_S = 0.1
IDS_PER_QUERY = 1000
NUDGE_GAP_S = 0.02  # nudged polls: at most 50 a second


class JobWatch:
    """Wakes waiters when their job has a new event (see the module doc)."""

    def __init__(self, queue: JobQueue, *, interval_s: float = POLL_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._queue = queue
        self._interval_s = interval_s
        # job id -> each waiter's future and the last seq it has seen
        self._waiters: dict[str, dict[asyncio.Future[None], int]] = {}
        self._poll: asyncio.Task[None] | None = None
        self._nudged = asyncio.Event()

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    async def changed(self, job_id: str, seen_seq: int, timeout_s: float) -> bool:
        """Wait until ``job_id`` has an event after ``seen_seq``, or no longer exists: True;
        False when ``timeout_s`` passes first."""
        future = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(job_id, {})
        waiters[future] = seen_seq
        if self._poll is None or self._poll.done():
            self._poll = asyncio.get_running_loop().create_task(
                self._polling(), name="headrace-job-watch"
            )
        try:
            async with asyncio.timeout(timeout_s):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            del waiters[future]
            if not waiters and self._waiters.get(job_id) is waiters:
                del self._waiters[job_id]

    def nudge(self, job_ids: Iterable[str]) -> None:
        """These jobs changed in this process (committed): poll now if any is followed."""
        if self._waiters and any(job_id in self._waiters for job_id in job_ids):
            self._nudged.set()

    async def _polling(self) -> None:
        loop = asyncio.get_running_loop()
        polled_at = -math.inf
        while self._waiters:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._nudged.wait()
            await asyncio.sleep(polled_at + NUDGE_GAP_S - loop.time())  # no-op when <= 0
            polled_at = loop.time()
            self._nudged.clear()
            ids = list(self._waiters)
            try:
                latest: dict[str, int] = {}
                for start in range(0, len(ids), IDS_PER_QUERY):
                    latest.update(await self._queue.event_seqs(ids[start : start + IDS_PER_QUERY]))
            except Exception as exc:  # the database down: the next turn tries again
                log.warning("job_watch_failed", error=repr(exc), jobs=len(ids))
                continue
            for job_id in ids:
                seq = latest.get(job_id)
                for future, seen in self._waiters.get(job_id, {}).items():
                    if (seq is None or seq > seen) and not future.done():
                        future.set_result(None)
