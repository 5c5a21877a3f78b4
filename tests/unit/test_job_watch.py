"""JobWatch: one poll for every waiter, woken by a new event or a job that is gone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import structlog

from headrace.jobs import watch
from headrace.jobs.watch import JobWatch

TICK_S = 0.01


class SeqQueue:
    """The one query JobWatch makes: latest event seqs, by job id, of the jobs that exist."""

    def __init__(self, **seqs: int) -> None:
        self.seqs = dict(seqs)
        self.asked: list[list[str]] = []
        self.failures = 0

    async def event_seqs(self, job_ids: Sequence[str]) -> dict[str, int]:
        self.asked.append(list(job_ids))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database down")
        return {i: self.seqs[i] for i in job_ids if i in self.seqs}


def watch_of(queue: SeqQueue) -> JobWatch:
    return JobWatch(queue, interval_s=TICK_S)  # type: ignore[arg-type]


async def test_a_new_event_wakes_every_waiter_of_its_job_and_only_them() -> None:
    queue = SeqQueue(j1=1, j2=1)
    jobs = watch_of(queue)
    first = asyncio.ensure_future(jobs.changed("j1", 1, timeout_s=5))
    second = asyncio.ensure_future(jobs.changed("j1", 1, timeout_s=5))
    other = asyncio.ensure_future(jobs.changed("j2", 1, timeout_s=5))
    await asyncio.sleep(TICK_S * 5)
    assert not first.done()
    assert not other.done()
    queue.seqs["j1"] = 2
    assert await first is True
    assert await second is True
    await asyncio.sleep(TICK_S * 3)
    assert not other.done()
    assert jobs.waiting == 1
    other.cancel()
    await asyncio.gather(other, return_exceptions=True)
    assert jobs.waiting == 0


async def test_a_waiter_behind_the_latest_event_returns_at_the_first_poll() -> None:
    jobs = watch_of(SeqQueue(j1=3))
    assert await jobs.changed("j1", 2, timeout_s=5) is True


async def test_a_job_that_is_gone_wakes_its_waiters() -> None:
    queue = SeqQueue(j1=1)
    jobs = watch_of(queue)
    waiting = asyncio.ensure_future(jobs.changed("j1", 1, timeout_s=5))
    await asyncio.sleep(TICK_S * 3)
    del queue.seqs["j1"]
    assert await waiting is True


async def test_no_change_returns_false_after_the_timeout_and_leaves_nothing_behind() -> None:
    jobs = watch_of(SeqQueue(j1=1))
    assert await jobs.changed("j1", 1, timeout_s=TICK_S * 5) is False
    assert jobs.waiting == 0


async def test_one_query_a_turn_for_every_job_followed_and_none_when_nobody_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch, "IDS_PER_QUERY", 40)
    queue = SeqQueue(**{f"j{i}": 1 for i in range(100)})
    jobs = watch_of(queue)
    waiters = [
        asyncio.ensure_future(jobs.changed(f"j{i % 100}", 1, timeout_s=TICK_S * 10))
        for i in range(300)
    ]
    assert await asyncio.gather(*waiters) == [False] * 300
    # 100 jobs followed by 300 streams: each turn asks for each job once, 40 ids a query.
    turns = len(queue.asked) // 3
    assert turns >= 3
    assert [len(ids) for ids in queue.asked[:3]] == [40, 40, 20]
    assert sorted(i for ids in queue.asked[:3] for i in ids) == sorted(f"j{i}" for i in range(100))
    asked = len(queue.asked)
    await asyncio.sleep(TICK_S * 5)
    assert len(queue.asked) <= asked + 3  # at most the turn under way when the last left
    settled = len(queue.asked)
    await asyncio.sleep(TICK_S * 5)
    assert len(queue.asked) == settled  # the poll stopped with the last waiter
    assert await jobs.changed("j1", 0, timeout_s=1) is True  # and starts again with the next


async def test_a_failed_poll_is_logged_and_the_next_turn_tries_again() -> None:
    queue = SeqQueue(j1=2)
    queue.failures = 2
    jobs = watch_of(queue)
    with structlog.testing.capture_logs() as logs:
        assert await jobs.changed("j1", 1, timeout_s=5) is True
    assert len(queue.asked) == 3
    failed = [entry for entry in logs if entry["event"] == "job_watch_failed"]
    assert len(failed) == 2
    assert failed[0]["jobs"] == 1
    assert "database down" in failed[0]["error"]


async def test_a_nudge_for_a_followed_job_polls_at_once_and_others_wait_for_the_turn() -> None:
    queue = SeqQueue(j1=1, j2=1)
    jobs = JobWatch(queue, interval_s=30)  # type: ignore[arg-type]
    followed = asyncio.ensure_future(jobs.changed("j1", 1, timeout_s=5))
    await asyncio.sleep(TICK_S)
    jobs.nudge(["j2", "j3"])  # nobody follows these: no poll
    await asyncio.sleep(TICK_S * 3)
    assert queue.asked == []
    queue.seqs["j1"] = 2
    jobs.nudge(["j2", "j1"])
    assert await asyncio.wait_for(followed, 1) is True
    assert queue.asked == [["j1"]]


async def test_nudges_during_a_poll_make_one_more_poll_not_one_each() -> None:
    queue = SeqQueue(j1=1)
    asked_at = asyncio.Event()
    answer = asyncio.Event()
    event_seqs = queue.event_seqs

    async def slow_seqs(job_ids: Sequence[str]) -> dict[str, int]:
        asked_at.set()
        await answer.wait()
        return await event_seqs(job_ids)

    queue.event_seqs = slow_seqs  # type: ignore[method-assign]
    jobs = JobWatch(queue, interval_s=30)  # type: ignore[arg-type]
    followed = asyncio.ensure_future(jobs.changed("j1", 1, timeout_s=5))
    await asyncio.sleep(TICK_S)
    jobs.nudge(["j1"])
    await asyncio.wait_for(asked_at.wait(), 1)
    for _ in range(5):  # while the first poll is under way
        jobs.nudge(["j1"])
    answer.set()
    await asyncio.sleep(TICK_S * 5)
    assert len(queue.asked) == 2
    assert not followed.done()
    queue.seqs["j1"] = 2
    jobs.nudge(["j1"])
    assert await asyncio.wait_for(followed, 1) is True
    assert len(queue.asked) == 3


async def test_a_stream_of_nudges_polls_at_most_once_a_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch, "NUDGE_GAP_S", 0.05)
    queue = SeqQueue(j1=1)
    jobs = JobWatch(queue, interval_s=30)  # type: ignore[arg-type]
    followed = asyncio.ensure_future(jobs.changed("j1", 1, timeout_s=5))
    await asyncio.sleep(TICK_S)
    started = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - started < 0.5:  # a busy runner's commits
        jobs.nudge(["j1"])
        await asyncio.sleep(0.002)
    assert 5 <= len(queue.asked) <= 0.5 / 0.05 + 2
    followed.cancel()
    await asyncio.gather(followed, return_exceptions=True)


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        JobWatch(SeqQueue(), interval_s=0)  # type: ignore[arg-type]
