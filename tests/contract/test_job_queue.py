"""The JobQueue contract on a fake clock: the SQL backend on SQLite (a file) and on PostgreSQL,
and the Procrastinate backend (PostgreSQL).

Tests that need several processes use several queue objects on one database: each has its
own engine (and, on SQLite, its own in-process write lock), as separate processes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy

from headrace.domain import Job, JobKind, JobStatus, Priority
from headrace.queue.base import (
    Completion,
    DeliveryRecord,
    Failure,
    Idempotency,
    IdempotencyConflictError,
    QueueDepth,
    job_view,
)
from headrace.queue.sql import WEBHOOK_LEASE_S, SqlJobQueue
from headrace.store.migrate import migrate

T0 = 1_800_000_000.0
LEASE_S = 30.0
HOOK = "https://hooks.example.com/jobs"
BOOM = {"message": "upstream said 503", "type": "upstream_error", "code": None, "status": 503}


@dataclass
class FakeClock:
    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", "postgresql", "procrastinate"])
def backend(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    value: str = request.getfixturevalue("fresh_database_url")
    return value


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


QueueFactory = Callable[[], Awaitable[SqlJobQueue]]


@pytest.fixture
async def make_queue(backend: str, url: str, clock: FakeClock) -> AsyncIterator[QueueFactory]:
    """Factory for queue objects on one migrated database, like one per process."""
    await migrate(url)
    kind: type[SqlJobQueue] = SqlJobQueue
    if backend == "procrastinate":
        pytest.importorskip("procrastinate")
        from headrace.queue import procrastinate

        await procrastinate.migrate(url)  # as `headrace migrate` does
        kind = procrastinate.ProcrastinateJobQueue
    made: list[SqlJobQueue] = []

    async def factory() -> SqlJobQueue:
        queue = kind(url, clock=clock)
        await queue.start()
        made.append(queue)
        return queue

    yield factory
    for queue in made:
        await queue.aclose()


@pytest.fixture
async def queue(make_queue: QueueFactory) -> SqlJobQueue:
    return await make_queue()


def job(
    job_id: str,
    *,
    team: str | None = "t1",
    key: str = "k1",
    at: float = T0,
    priority: Priority = Priority.NORMAL,
    **fields: Any,
) -> Job:
    return Job(
        id=job_id,
        kind=JobKind.CHAT,
        body={"model": "echo", "messages": [{"role": "user", "content": job_id}]},
        key_id=key,
        team_id=team,
        priority=priority,
        created_at=at,
        run_after=T0,
        **fields,
    )


def ids(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


def idem(key: str, body_hash: str = "a" * 64, *, expires_at: float = T0 + 3600) -> Idempotency:
    return Idempotency(scope="t1", key=key, body_hash=body_hash, expires_at=expires_at)


async def as_claimed(queue: SqlJobQueue, job_id: str) -> Job:
    """The job as its worker claimed it, which is what a worker completes."""
    stored = await queue.get(job_id)
    assert stored is not None
    return stored


async def statuses(queue: SqlJobQueue, job_id: str) -> list[JobStatus]:
    return [e.status for e in await queue.events(job_id)]


# -- submission and reading -------------------------------------------------------------------


async def test_submit_stores_the_job_and_its_first_event(queue: SqlJobQueue) -> None:
    submitted = job("j1", metadata={"run": "7"}, webhook_url=HOOK, deadline_at=T0 + 60)
    assert await queue.submit(submitted) == (submitted, True)
    assert await queue.get("j1") == submitted
    assert await queue.get("nope") is None
    [event] = await queue.events("j1")
    assert (event.job_id, event.seq, event.status, event.at) == ("j1", 1, JobStatus.QUEUED, T0)


async def test_the_submitting_trace_travels_with_the_job_to_its_worker(
    queue: SqlJobQueue,
) -> None:
    traced = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await queue.submit(job("one", traceparent=traced))
    await queue.submit_many([job("two", at=T0 + 1, traceparent=traced), job("three", at=T0 + 2)])
    claimed = {j.id: j.traceparent for j in await queue.claim("w1", 3, LEASE_S)}
    assert claimed == {"one": traced, "two": traced, "three": None}


async def test_the_submitting_trace_travels_with_the_jobs_webhook_events(
    queue: SqlJobQueue,
) -> None:
    traced = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await queue.submit(job("one", webhook_url=HOOK, traceparent=traced))
    await queue.submit(job("two", at=T0 + 1, webhook_url=HOOK))
    for claimed in await queue.claim("w1", 2, LEASE_S):
        await queue.complete(claimed, "w1", {"ok": True}, 1)
    items = {i.job_id: i.traceparent for i in await queue.due_webhooks(10)}
    assert items == {"one": traced, "two": None}


async def test_list_is_per_team_newest_first_in_pages(queue: SqlJobQueue) -> None:
    for i in range(5):
        await queue.submit(job(f"a{i}", team="A", at=T0 + i))
        await queue.submit(job(f"b{i}", team="B", at=T0 + i))
    await queue.submit(job("solo", team=None, key="k9", at=T0))
    await queue.submit(job("other", team=None, key="k8", at=T0))

    first = await queue.list_jobs(team_id="A", limit=2)
    assert ids(first) == ["a4", "a3"]
    second = await queue.list_jobs(team_id="A", after="a3", limit=2)
    assert ids(second) == ["a2", "a1"]
    assert ids(await queue.list_jobs(team_id="A", after="a1", limit=2)) == ["a0"]
    assert await queue.list_jobs(team_id="A", after="b3") == []  # another team's cursor
    assert ids(await queue.list_jobs(team_id=None, key_id="k9")) == ["solo"]
    assert await queue.list_jobs(team_id="C") == []


async def test_list_filters_by_status_and_batch(queue: SqlJobQueue) -> None:
    await queue.submit_many([job(f"x{i}", at=T0 + i, batch_id="batch_1") for i in range(3)])
    await queue.submit(job("y", at=T0 + 10))
    [claimed] = await queue.claim("w1", 1, LEASE_S)
    assert claimed.id == "x0"
    running = await queue.list_jobs(team_id="t1", status=JobStatus.RUNNING)
    assert ids(running) == ["x0"]
    assert ids(await queue.list_jobs(team_id="t1", batch_id="batch_1")) == ["x2", "x1", "x0"]
    queued = await queue.list_jobs(team_id="t1", batch_id="batch_1", status=JobStatus.QUEUED)
    assert ids(queued) == ["x2", "x1"]


async def test_submit_many_stores_every_job_with_its_event(queue: SqlJobQueue) -> None:
    batch = [job(f"m{i:04d}", at=T0 + i / 1000, batch_id="b") for i in range(2000)]
    await queue.submit_many(batch)
    await queue.submit_many([])
    assert await queue.get("m1999") == batch[-1]
    assert len(await queue.list_jobs(team_id="t1", batch_id="b", limit=5000)) == 2000
    assert await statuses(queue, "m0007") == [JobStatus.QUEUED]


# -- idempotency ------------------------------------------------------------------------------


async def test_the_same_key_and_body_return_the_first_job(queue: SqlJobQueue) -> None:
    first, created = await queue.submit(job("j1"), idem("k"))
    assert created
    again, created = await queue.submit(job("j2"), idem("k"))
    assert (again, created) == (first, False)
    assert await queue.get("j2") is None


async def test_the_same_key_with_another_body_conflicts(queue: SqlJobQueue) -> None:
    first, _ = await queue.submit(job("j1"), idem("k"))
    with pytest.raises(IdempotencyConflictError) as raised:
        await queue.submit(job("j2"), idem("k", "b" * 64))
    assert raised.value.existing == first
    assert await queue.get("j2") is None
    # Keys are per scope.
    other_scope = Idempotency(scope="t2", key="k", body_hash="b" * 64, expires_at=T0 + 60)
    assert (await queue.submit(job("j3", team="t2"), other_scope))[1]


async def test_an_expired_key_can_be_used_again(queue: SqlJobQueue, clock: FakeClock) -> None:
    await queue.submit(job("j1"), idem("k", expires_at=T0 + 60))
    clock.advance(60)
    second, created = await queue.submit(job("j2"), idem("k", "b" * 64, expires_at=T0 + 120))
    assert created
    assert second.id == "j2"
    assert (await queue.submit(job("j3"), idem("k", "b" * 64)))[0].id == "j2"


async def test_concurrent_duplicates_create_one_job(make_queue: QueueFactory) -> None:
    queues = [await make_queue() for _ in range(4)]
    results = await asyncio.gather(
        *(queues[i % 4].submit(job(f"dup{i}"), idem("same")) for i in range(20))
    )
    created = [j for j, new in results if new]
    assert len(created) == 1
    assert {j.id for j, _ in results} == {created[0].id}
    assert len(await queues[0].list_jobs(team_id="t1", limit=100)) == 1


# -- claim order ------------------------------------------------------------------------------


async def test_claim_takes_higher_priorities_first(queue: SqlJobQueue) -> None:
    await queue.submit(job("low", priority=Priority.LOW, at=T0))
    await queue.submit(job("normal", priority=Priority.NORMAL, at=T0 + 1))
    await queue.submit(job("high", priority=Priority.HIGH, at=T0 + 2))
    await queue.submit(job("high2", priority=Priority.HIGH, at=T0 + 3))
    claimed = await queue.claim("w1", 10, LEASE_S)
    assert ids(claimed) == ["high", "high2", "normal", "low"]
    assert all(j.status is JobStatus.RUNNING and j.attempts == 1 for j in claimed)
    assert all(j.started_at == T0 for j in claimed)
    assert await queue.claim("w1", 10, LEASE_S) == []


async def test_claim_is_fair_across_teams(queue: SqlJobQueue) -> None:
    await queue.submit_many([job(f"a{i}", team="A", at=T0 + i) for i in range(10)])
    await queue.submit(job("b0", team="B", at=T0 + 20))
    await queue.submit(job("b1", team="B", at=T0 + 21))
    assert ids(await queue.claim("w1", 5, LEASE_S)) == ["a0", "b0", "a1", "b1", "a2"]

    # A team arriving late starts at the head of the line, not behind A's backlog.
    await queue.submit_many([job(f"c{i}", team="C", at=T0 + 30 + i) for i in range(3)])
    assert ids(await queue.claim("w1", 6, LEASE_S)) == ["a3", "c0", "a4", "c1", "a5", "c2"]


async def test_a_key_without_a_team_is_its_own_fairness_group(queue: SqlJobQueue) -> None:
    await queue.submit_many([job(f"a{i}", team=None, key="ka", at=T0 + i) for i in range(3)])
    await queue.submit(job("b0", team=None, key="kb", at=T0 + 10))
    assert ids(await queue.claim("w1", 2, LEASE_S)) == ["a0", "b0"]


# -- leases -----------------------------------------------------------------------------------


async def test_an_expired_lease_is_recovered_and_the_old_worker_loses(
    queue: SqlJobQueue, clock: FakeClock
) -> None:
    await queue.submit(job("j1"))
    await queue.claim("w1", 1, LEASE_S)
    clock.advance(LEASE_S - 1)
    assert await queue.recover() == 0
    clock.advance(2)
    assert await queue.recover() == 1
    requeued = await queue.get("j1")
    assert requeued is not None
    assert (requeued.status, requeued.attempts) == (JobStatus.QUEUED, 1)
    assert requeued.error is not None
    assert requeued.error["code"] == "worker_lost"

    [theirs] = await queue.claim("w2", 1, LEASE_S)
    assert theirs.attempts == 2
    assert await queue.complete(theirs, "w1", {"late": True}, 5) is None
    assert await queue.heartbeat("w1", ["j1"], LEASE_S) == {"j1"}
    done = await queue.complete(theirs, "w2", {"ok": True}, 7)
    assert done is not None
    assert (done.status, done.result, done.cost_micro_usd) == (JobStatus.SUCCEEDED, {"ok": True}, 7)
    assert done.error is None
    assert done.finished_at == clock.now
    assert await queue.get("j1") == done


async def test_recover_sends_a_job_out_of_attempts_to_the_dead_letters(
    queue: SqlJobQueue, clock: FakeClock
) -> None:
    await queue.submit(job("j1", max_attempts=1, webhook_url=HOOK))
    await queue.claim("w1", 1, LEASE_S)
    clock.advance(LEASE_S + 1)
    assert await queue.recover() == 1
    dead = await queue.get("j1")
    assert dead is not None
    assert dead.status is JobStatus.DEAD
    assert [e["code"] for e in dead.errors] == ["worker_lost"]
    assert ids(await queue.dead_letters()) == ["j1"]
    assert [i.event_type for i in await queue.due_webhooks(10)] == ["job.dead"]


async def test_heartbeat_extends_held_leases_and_names_the_rest(
    queue: SqlJobQueue, clock: FakeClock
) -> None:
    await queue.submit_many([job("j1"), job("j2", at=T0 + 1)])
    await queue.claim("w1", 2, LEASE_S)
    for _ in range(3):
        clock.advance(LEASE_S - 5)
        assert await queue.heartbeat("w1", ["j1", "j2"], LEASE_S) == set()
    assert await queue.recover() == 0
    assert await queue.heartbeat("w2", ["j1"], LEASE_S) == {"j1"}
    assert await queue.heartbeat("w1", ["j1", "nope"], LEASE_S) == {"nope"}
    assert await queue.heartbeat("w1", [], LEASE_S) == set()


# -- failures ---------------------------------------------------------------------------------


async def test_a_retry_waits_for_its_run_after(queue: SqlJobQueue, clock: FakeClock) -> None:
    await queue.submit(job("j1"))
    await queue.claim("w1", 1, LEASE_S)
    retried = await queue.fail("j1", "w1", Failure(error=BOOM, retry_at=T0 + 60))
    assert retried is not None
    assert (retried.status, retried.run_after, retried.attempts) == (JobStatus.QUEUED, T0 + 60, 1)
    assert retried.error == {**BOOM, "attempt": 1, "at": T0}
    assert await queue.get("j1") == retried
    assert await queue.claim("w1", 1, LEASE_S) == []
    clock.advance(60)
    [again] = await queue.claim("w1", 1, LEASE_S)
    assert again.attempts == 2
    assert await queue.fail("j1", "w2", Failure(error=BOOM, retry_at=None)) is None


async def test_out_of_attempts_is_dead_with_the_whole_error_history(
    queue: SqlJobQueue, clock: FakeClock
) -> None:
    await queue.submit(job("j1", max_attempts=3))
    after: Job | None = None
    for attempt in range(1, 4):
        [claimed] = await queue.claim("w1", 1, LEASE_S)
        assert claimed.attempts == attempt
        error = {**BOOM, "message": f"failure {attempt}"}
        # The caller asks for a retry each time; out of attempts, the queue makes it dead.
        after = await queue.fail("j1", "w1", Failure(error=error, retry_at=clock.now))
        clock.advance(1)
    assert after is not None
    assert after.status is JobStatus.DEAD
    assert [(e["message"], e["attempt"]) for e in after.errors] == [
        ("failure 1", 1),
        ("failure 2", 2),
        ("failure 3", 3),
    ]
    assert after.error == after.errors[-1]
    assert await queue.dead_letters() == [after]
    assert await queue.claim("w1", 1, LEASE_S) == []


async def test_dead_on_the_callers_word(queue: SqlJobQueue) -> None:
    await queue.submit(job("j1"))
    await queue.claim("w1", 1, LEASE_S)
    dead = await queue.fail("j1", "w1", Failure(error=BOOM, retry_at=None, dead=True))
    assert dead is not None
    assert dead.status is JobStatus.DEAD


async def test_a_permanent_failure_is_final(queue: SqlJobQueue) -> None:
    await queue.submit(job("j1", webhook_url=HOOK))
    await queue.claim("w1", 1, LEASE_S)
    failed = await queue.fail("j1", "w1", Failure(error=BOOM, retry_at=None))
    assert failed is not None
    assert (failed.status, failed.finished_at, failed.error) == (
        JobStatus.FAILED,
        T0,
        {**BOOM, "attempt": 1, "at": T0},
    )
    assert await queue.dead_letters() == []
    assert await queue.claim("w1", 1, LEASE_S) == []
    [item] = await queue.due_webhooks(10)
    assert item.event_type == "job.failed"
    assert item.payload["error"] == failed.error


async def test_release_requeues_and_refunds_the_attempt(queue: SqlJobQueue) -> None:
    await queue.submit_many([job("j1"), job("j2", at=T0 + 1)])
    await queue.claim("w1", 2, LEASE_S)
    await queue.release("w2", ["j1"])  # not w2's: nothing happens
    await queue.release("w1", ["j1", "j2"])
    for job_id in ("j1", "j2"):
        released = await queue.get(job_id)
        assert released is not None
        assert (released.status, released.attempts) == (JobStatus.QUEUED, 0)
    assert await statuses(queue, "j1") == [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.QUEUED]
    assert ids(await queue.claim("w2", 2, LEASE_S)) == ["j1", "j2"]


# -- cancel and deadlines ---------------------------------------------------------------------


async def test_cancel_a_queued_job(queue: SqlJobQueue) -> None:
    await queue.submit(job("j1", webhook_url=HOOK))
    cancelled = await queue.cancel("j1")
    assert cancelled is not None
    assert (cancelled.status, cancelled.finished_at) == (JobStatus.CANCELLED, T0)
    assert await queue.claim("w1", 1, LEASE_S) == []
    assert await queue.cancel("j1") == cancelled  # final: unchanged
    assert await queue.cancel("nope") is None
    [item] = await queue.due_webhooks(10)
    assert item.event_type == "job.cancelled"


async def test_cancel_a_running_job(queue: SqlJobQueue) -> None:
    await queue.submit(job("j1"))
    await queue.claim("w1", 1, LEASE_S)
    cancelled = await queue.cancel("j1")
    assert cancelled is not None
    assert cancelled.status is JobStatus.CANCELLED
    assert await queue.heartbeat("w1", ["j1"], LEASE_S) == {"j1"}
    assert await queue.complete(cancelled, "w1", {"late": True}, 3) is None
    assert await queue.fail("j1", "w1", Failure(error=BOOM, retry_at=None)) is None
    assert await queue.get("j1") == cancelled
    assert await statuses(queue, "j1") == [
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.CANCELLED,
    ]


async def test_claim_fails_queued_jobs_past_their_deadline(
    queue: SqlJobQueue, clock: FakeClock
) -> None:
    await queue.submit(job("late", deadline_at=T0 + 10, webhook_url=HOOK, priority=Priority.HIGH))
    await queue.submit(job("fine", deadline_at=T0 + 100, at=T0 + 1))
    clock.advance(10)
    assert ids(await queue.claim("w1", 5, LEASE_S)) == ["fine"]
    expired = await queue.get("late")
    assert expired is not None
    assert expired.status is JobStatus.FAILED
    assert expired.error is not None
    assert expired.error["code"] == "expired"
    assert expired.finished_at == T0 + 10
    assert await statuses(queue, "late") == [JobStatus.QUEUED, JobStatus.FAILED]
    [item] = await queue.due_webhooks(10)
    assert (item.job_id, item.event_type) == ("late", "job.failed")


# -- operations -------------------------------------------------------------------------------


async def test_replay_and_discard_dead_letters(queue: SqlJobQueue, clock: FakeClock) -> None:
    for job_id in ("d1", "d2"):
        await queue.submit(job(job_id, max_attempts=1, deadline_at=T0 + 5))
        await queue.claim("w1", 1, LEASE_S)
        await queue.fail(job_id, "w1", Failure(error=BOOM, retry_at=None, dead=True))
    clock.advance(100)
    assert {j.id for j in await queue.dead_letters()} == {"d1", "d2"}

    replayed = await queue.replay("d1")
    assert replayed is not None
    assert (replayed.status, replayed.attempts, replayed.error) == (JobStatus.QUEUED, 0, None)
    assert len(replayed.errors) == 1  # the history stays
    assert await queue.replay("d1") == replayed  # not dead any more: unchanged
    assert await queue.replay("nope") is None
    [claimed] = await queue.claim("w1", 1, LEASE_S)
    assert (claimed.id, claimed.attempts) == ("d1", 1)
    assert await statuses(queue, "d1") == [
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.DEAD,
        JobStatus.QUEUED,
        JobStatus.RUNNING,
    ]

    assert not await queue.discard("d1")  # running, not dead
    assert await queue.discard("d2")
    assert await queue.get("d2") is None
    assert await queue.events("d2") == []
    assert not await queue.discard("d2")
    assert ids(await queue.dead_letters()) == []


async def test_a_discarded_jobs_idempotency_key_is_free_again(queue: SqlJobQueue) -> None:
    await queue.submit(job("j1", max_attempts=1), idem("k"))
    await queue.claim("w1", 1, LEASE_S)
    await queue.fail("j1", "w1", Failure(error=BOOM, retry_at=None, dead=True))
    assert await queue.discard("j1")
    assert (await queue.submit(job("j2"), idem("k", "b" * 64)))[1]


async def test_depth_per_priority_with_the_oldest_age(queue: SqlJobQueue, clock: FakeClock) -> None:
    assert await queue.depth() == [
        QueueDepth(Priority.HIGH, 0, 0.0),
        QueueDepth(Priority.NORMAL, 0, 0.0),
        QueueDepth(Priority.LOW, 0, 0.0),
    ]
    await queue.submit(job("h1", priority=Priority.HIGH, at=T0))
    await queue.submit(job("h2", priority=Priority.HIGH, at=T0 + 5))
    await queue.submit(job("l1", priority=Priority.LOW, at=T0 + 8))
    await queue.submit(job("n1", at=T0 + 9))
    clock.advance(10)
    await queue.claim("w1", 1, LEASE_S)  # h1
    assert await queue.depth() == [
        QueueDepth(Priority.HIGH, 1, 5.0),
        QueueDepth(Priority.NORMAL, 1, 1.0),
        QueueDepth(Priority.LOW, 1, 2.0),
    ]


async def test_events_are_in_order_with_details(queue: SqlJobQueue, clock: FakeClock) -> None:
    await queue.submit(job("j1"))
    await queue.claim("w1", 1, LEASE_S)
    clock.advance(1)
    await queue.fail("j1", "w1", Failure(error=BOOM, retry_at=clock.now))
    [claimed] = await queue.claim("w2", 1, LEASE_S)
    clock.advance(1)
    await queue.complete(claimed, "w2", {"ok": True}, 1)
    events = await queue.events("j1")
    assert [(e.seq, e.status) for e in events] == [
        (1, JobStatus.QUEUED),
        (2, JobStatus.RUNNING),
        (3, JobStatus.QUEUED),
        (4, JobStatus.RUNNING),
        (5, JobStatus.SUCCEEDED),
    ]
    assert [e.at for e in events] == [T0, T0, T0 + 1, T0 + 1, T0 + 2]
    assert events[1].detail == {"worker": "w1", "attempt": 1}
    assert events[2].detail["retry_at"] == T0 + 1
    assert [e.seq for e in await queue.events("j1", after_seq=3)] == [4, 5]


async def test_event_seqs_give_each_existing_jobs_latest_event(
    queue: SqlJobQueue, clock: FakeClock
) -> None:
    await queue.submit_many([job("j1"), job("j2")])
    assert await queue.event_seqs([]) == {}
    assert await queue.event_seqs(["j1", "j2", "gone"]) == {"j1": 1, "j2": 1}
    [claimed] = await queue.claim("w1", 1, LEASE_S)
    await queue.complete(claimed, "w1", {"ok": True}, 1)
    await queue.cancel("j2")
    seqs = await queue.event_seqs(["j1", "j2"])
    assert seqs == {e.job_id: e.seq for j in ("j1", "j2") for e in await queue.events(j)}
    assert seqs == {"j1": 3, "j2": 2}


# -- the webhook outbox -----------------------------------------------------------------------


async def test_the_outbox_gets_an_event_exactly_when_a_hooked_job_ends(
    queue: SqlJobQueue, clock: FakeClock
) -> None:
    await queue.submit(job("hooked", webhook_url=HOOK, metadata={"run": "7"}))
    await queue.submit(job("quiet", at=T0 + 1))
    await queue.claim("w1", 2, LEASE_S)
    await queue.fail("hooked", "w1", Failure(error=BOOM, retry_at=clock.now))
    assert await queue.due_webhooks(10) == []  # a retry is not final
    [hooked] = await queue.claim("w1", 1, LEASE_S)
    clock.advance(2)
    done = await queue.complete(hooked, "w1", {"choices": []}, 1234)
    await queue.complete(await as_claimed(queue, "quiet"), "w1", {"choices": []}, 1)
    assert done is not None

    [item] = await queue.due_webhooks(10)
    assert item.event_id.startswith("evt_")
    assert len(item.event_id) == 4 + 32
    assert (item.job_id, item.url, item.event_type) == ("hooked", HOOK, "job.succeeded")
    assert (item.created_at, item.attempts) == (T0 + 2, 0)
    assert item.payload == job_view(done)
    assert item.payload == job_view(await as_claimed(queue, "hooked"))  # as stored
    assert item.payload["result"] == {"choices": []}
    assert item.payload["cost_usd"] == 0.001234
    assert item.payload["attempts"] == 2
    assert item.payload["metadata"] == {"run": "7"}
    assert item.payload["finished_at"] == T0 + 2


async def test_a_completion_whose_outbox_row_cannot_be_written_changes_nothing(
    queue: SqlJobQueue, backend: str
) -> None:
    await queue.submit(job("hooked", webhook_url=HOOK))
    await queue.submit(job("quiet", at=T0 + 1))
    claimed = await queue.claim("w1", 2, LEASE_S)
    async with queue.engine.begin() as conn:
        if backend == "sqlite":
            await conn.execute(
                sqlalchemy.text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON webhook_outbox"
                    " BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
        else:
            await conn.execute(
                sqlalchemy.text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql"
                    " AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$"
                )
            )
            await conn.execute(
                sqlalchemy.text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON webhook_outbox"
                    " FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )
    with pytest.raises(sqlalchemy.exc.DBAPIError, match="refused"):
        await queue.complete_many("w1", [Completion(j, {"ok": True}, 1) for j in claimed])
    for claimed_job in claimed:  # neither job finished, nor any event written
        assert await queue.get(claimed_job.id) == claimed_job
        assert await statuses(queue, claimed_job.id) == [JobStatus.QUEUED, JobStatus.RUNNING]


async def test_due_webhooks_leases_each_item_to_one_deliverer(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    first, second = await make_queue(), await make_queue()
    for i in range(3):
        await first.submit(job(f"j{i}", webhook_url=HOOK, at=T0 + i))
        await first.cancel(f"j{i}")
        clock.advance(1)
    got = await first.due_webhooks(2)
    assert [i.job_id for i in got] == ["j0", "j1"]
    assert [i.job_id for i in await second.due_webhooks(10)] == ["j2"]
    assert await first.due_webhooks(10) == []
    clock.advance(WEBHOOK_LEASE_S)  # the deliverers died: the items come back
    assert [i.job_id for i in await second.due_webhooks(10)] == ["j0", "j1", "j2"]


async def test_record_delivery_keeps_history_and_reschedules(
    queue: SqlJobQueue, clock: FakeClock
) -> None:
    await queue.submit(job("j1", webhook_url=HOOK))
    await queue.cancel("j1")
    [item] = await queue.due_webhooks(10)
    first = DeliveryRecord(item.event_id, 1, clock.now, 503, "retry", "busy")
    await queue.record_delivery(first, next_attempt_at=clock.now + 10)
    await queue.record_delivery(first, next_attempt_at=clock.now + 10)  # recorded twice: once
    clock.advance(9)
    assert await queue.due_webhooks(10) == []
    clock.advance(1)
    [again] = await queue.due_webhooks(10)
    assert (again.event_id, again.attempts) == (item.event_id, 1)
    second = DeliveryRecord(item.event_id, 2, clock.now, 200, "delivered")
    await queue.record_delivery(second, next_attempt_at=None)
    clock.advance(3600)
    assert await queue.due_webhooks(10) == []
    assert await queue.deliveries("j1") == [first, second]
    assert await queue.deliveries("nope") == []


async def test_purge_deletes_ended_jobs_past_retention_with_their_history(
    queue: SqlJobQueue, clock: FakeClock
) -> None:
    await queue.submit(job("old-ok", webhook_url=HOOK), idem("k-old"))
    await queue.submit_many(
        [
            job("old-failed", at=T0 + 1),
            job("old-cancelled", at=T0 + 2),
            job("old-dead", at=T0 + 3),
            job("old-batch", at=T0 + 4, batch_id="batch_1"),
            job("running", at=T0 + 5),
        ]
    )
    await queue.cancel("old-cancelled")
    claimed = {j.id: j for j in await queue.claim("w1", 10, LEASE_S)}
    await queue.complete(claimed["old-ok"], "w1", {"ok": True}, 1)
    await queue.complete(claimed["old-batch"], "w1", {"ok": True}, 1)
    await queue.fail("old-failed", "w1", Failure(error=BOOM, retry_at=None))
    await queue.fail("old-dead", "w1", Failure(error=BOOM, retry_at=None, dead=True))
    [item] = [i for i in await queue.due_webhooks(10) if i.job_id == "old-ok"]
    await queue.record_delivery(DeliveryRecord(item.event_id, 1, clock.now, 200, "delivered"), None)
    clock.advance(100)
    await queue.submit(job("new-ok", at=clock.now))
    [new] = await queue.claim("w2", 1, LEASE_S)
    await queue.complete(new, "w2", {"ok": True}, 1)

    assert await queue.purge(T0 + 50, 2) == 2  # a batch at a time
    assert await queue.purge(T0 + 50, 10) == 1
    assert await queue.purge(T0 + 50, 10) == 0
    for gone in ("old-ok", "old-failed", "old-cancelled"):
        assert await queue.get(gone) is None
        assert await queue.events(gone) == []
    assert await queue.deliveries("old-ok") == []
    kept = {"old-dead", "old-batch", "running", "new-ok"}  # dead letter, batch, live, recent
    for job_id in kept:
        assert await queue.get(job_id) is not None
    again, created = await queue.submit(job("again", at=clock.now), idem("k-old"))
    assert (again.id, created) == ("again", True)  # the purged job's key is free


async def test_a_caller_cancelled_mid_statement_leaves_no_connection_behind(
    queue: SqlJobQueue, backend: str
) -> None:
    if backend == "sqlite":
        pytest.skip("SQLite's operations are transactions: a cancelled one rolls back")
    for n in range(400):
        await queue.submit(job(f"j{n}", at=T0 + n))
    for attempt in range(60):  # cancelled at every point of the statement, twice
        claiming = asyncio.create_task(queue.claim("w1", 5, LEASE_S))
        await asyncio.sleep(0.0002 * (attempt % 15))
        claiming.cancel()
        await asyncio.sleep(0)
        claiming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await claiming
    [claimed] = await queue.claim("w2", 1, LEASE_S)
    completing = asyncio.create_task(queue.complete(claimed, "w2", {"ok": True}, 1))
    await asyncio.sleep(0.001)
    completing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await completing
    for _ in range(200):  # the statements end on their own
        if queue.engine.pool.checkedout() == 0:
            break
        await asyncio.sleep(0.01)
    assert queue.engine.pool.checkedout() == 0
    gc.collect()  # a connection dropped instead of checked in warns here (an error in pytest)
    done = await queue.get(claimed.id)
    assert done is not None
    assert done.status is JobStatus.SUCCEEDED  # a completion, once sent, stays written


# -- concurrency ------------------------------------------------------------------------------


async def test_concurrent_claimers_take_every_job_exactly_once(
    make_queue: QueueFactory,
) -> None:
    queues = [await make_queue() for _ in range(4)]
    await queues[0].submit_many(
        [job(f"c{i:03d}", team=f"t{i % 7}", at=T0 + i / 100) for i in range(500)]
    )
    taken: list[list[str]] = [[] for _ in queues]

    async def work(n: int) -> None:
        while batch := await queues[n].claim(f"w{n}", 7, LEASE_S):
            taken[n].extend(j.id for j in batch)
            for claimed in batch[::2]:
                assert await queues[n].complete(claimed, f"w{n}", {}, 0) is not None

    await asyncio.gather(*(work(n) for n in range(4)))
    everything = [job_id for ids_ in taken for job_id in ids_]
    assert len(everything) == 500
    assert len(set(everything)) == 500
    assert sum(1 for worker in taken if worker) > 1  # they did run side by side
    counts = await queues[0].depth()
    assert sum(d.queued for d in counts) == 0


async def test_a_shared_engine_is_left_open(url: str, clock: FakeClock) -> None:
    from headrace.store.engine import create_engine

    await migrate(url)
    engine = create_engine(url)
    queue = SqlJobQueue(engine, clock=clock)
    await queue.start()
    await queue.check()
    await queue.submit(job("j1"))
    await queue.aclose()
    async with engine.connect():  # still usable
        pass
    await engine.dispose()


async def test_start_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    from headrace.store.migrate import SchemaOutOfDateError

    queue = SqlJobQueue(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(SchemaOutOfDateError, match="headrace migrate"):
        await queue.start()
    await queue.aclose()
    migrating = SqlJobQueue(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", migrate_on_start=True)
    await migrating.start()
    assert await migrating.get("x") is None
    await migrating.aclose()


def test_job_view_is_plain_json() -> None:
    """One view for the API, the webhook payload and SSE (queue.base.job_view)."""
    done = dataclasses.replace(job("j1"), status=JobStatus.SUCCEEDED, result={"a": 1})
    view = job_view(done)
    assert orjson.loads(orjson.dumps(view)) == view
    assert view["status"] == "succeeded"
    assert view["result"] == {"a": 1}
    assert view["error"] is None


async def test_the_worker_side_indexes_are_partial(url: str) -> None:
    """Alembic's schema comparison ignores index predicates: check them here."""
    import sqlalchemy

    from headrace.store.engine import create_engine

    await migrate(url)
    engine = create_engine(url)
    async with engine.connect() as conn:
        indexes = await conn.run_sync(lambda c: sqlalchemy.inspect(c).get_indexes("jobs"))
    await engine.dispose()
    predicates = {
        index["name"]: str(
            index.get("dialect_options", {}).get("postgresql_where")
            or index.get("dialect_options", {}).get("sqlite_where")
        )
        for index in indexes
    }
    for name, state in [
        ("ix_jobs_claim", "queued"),
        ("ix_jobs_tenant_queue", "queued"),
        ("ix_jobs_queued_deadline_at", "queued"),
        ("ix_jobs_running_lease_expires_at", "running"),
        ("ix_jobs_dead_finished_at", "dead"),
    ]:
        assert f"'{state}'" in predicates[name], (name, predicates[name])
