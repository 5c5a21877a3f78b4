"""JobRunner.purge: jobs past ``retention_s`` go in batches, at most every PURGE_EVERY_S."""

from __future__ import annotations

from typing import Any

from headrace.worker.runner import PURGE_BATCH, PURGE_EVERY_S, JobRunner


class PurgingQueue:
    """The part of the queue a purge uses: ``backlog`` old jobs, deleted ``limit`` at a time."""

    def __init__(self, backlog: int) -> None:
        self.backlog = backlog
        self.calls: list[tuple[float, int]] = []

    async def purge(self, finished_before: float, limit: int) -> int:
        self.calls.append((finished_before, limit))
        deleted = min(limit, self.backlog)
        self.backlog -= deleted
        return deleted


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def runner(queue: PurgingQueue, clock: Clock, retention_s: float | None) -> JobRunner:
    unused: Any = None  # purging needs neither the gateway nor principals
    typed: Any = queue
    return JobRunner(typed, unused, unused, clock=clock, retention_s=retention_s)


async def test_a_backlog_goes_in_batches_then_nothing_until_the_next_period() -> None:
    queue, clock = PurgingQueue(2 * PURGE_BATCH + 3), Clock()
    jobs = runner(queue, clock, retention_s=86_400)
    assert await jobs.purge() == 2 * PURGE_BATCH + 3
    assert queue.calls == [(clock.now - 86_400, PURGE_BATCH)] * 3
    clock.now += PURGE_EVERY_S - 1
    assert await jobs.purge() == 0
    assert len(queue.calls) == 3  # not asked again before the period ends
    clock.now += 1
    assert await jobs.purge() == 0
    assert len(queue.calls) == 4


async def test_no_retention_keeps_everything() -> None:
    queue = PurgingQueue(10)
    assert await runner(queue, Clock(), retention_s=None).purge() == 0
    assert queue.calls == []


async def test_a_failed_purge_is_logged_and_tried_again_next_period() -> None:
    class Broken(PurgingQueue):
        async def purge(self, finished_before: float, limit: int) -> int:
            raise OSError("database gone")

    queue, clock = Broken(0), Clock()
    jobs = runner(queue, clock, retention_s=60)
    assert await jobs.purge() == 0  # the runner's loop goes on
