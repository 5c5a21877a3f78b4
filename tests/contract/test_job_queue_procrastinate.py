"""What the Procrastinate backend adds to the JobQueue contract (test_job_queue.py runs that).

Each Headrace job that is not final has exactly one Procrastinate entry, changed in the same
transaction as the job: ``todo`` while queued, ``doing`` while running, none once final. A
failure anywhere in an operation leaves both sides as they were. Needs PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncEngine

from headrace.domain import JobStatus, Priority
from headrace.queue.base import Completion, Failure, Lease
from headrace.queue.procrastinate import (
    QUEUE,
    TASK,
    ProcrastinateJobQueue,
    apply_schema,
    dispatch_priority,
)
from headrace.queue.procrastinate import migrate as apply_procrastinate
from headrace.store.engine import create_engine
from headrace.store.migrate import SchemaOutOfDateError, migrate
from tests.contract.test_job_queue import BOOM, LEASE_S, T0, FakeClock, as_claimed, ids, job

pytest.importorskip("procrastinate")  # its schema: the postgres extra

INT4 = (-(2**31), 2**31 - 1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def url(fresh_database_url: str) -> str:
    await migrate(fresh_database_url)
    await apply_procrastinate(fresh_database_url)
    return fresh_database_url


@pytest.fixture
async def db(url: str) -> AsyncIterator[AsyncEngine]:
    """A direct connection, to look at (and tamper with) both sides."""
    engine = create_engine(url)
    yield engine
    await engine.dispose()


QueueFactory = Callable[[], Awaitable[ProcrastinateJobQueue]]


@pytest.fixture
async def make_queue(url: str, clock: FakeClock) -> AsyncIterator[QueueFactory]:
    made: list[ProcrastinateJobQueue] = []

    async def factory() -> ProcrastinateJobQueue:
        queue = ProcrastinateJobQueue(url, clock=clock)
        await queue.start()
        made.append(queue)
        return queue

    yield factory
    for queue in made:
        await queue.aclose()


@pytest.fixture
async def queue(make_queue: QueueFactory) -> ProcrastinateJobQueue:
    return await make_queue()


async def rows(db: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with db.connect() as conn:
        return list((await conn.execute(sqlalchemy.text(sql), params)).all())


async def entries(db: AsyncEngine) -> dict[str, Any]:
    """Every Procrastinate entry, by the job id in its args."""
    found = await rows(
        db,
        "SELECT id, queue_name, task_name, args, lock, queueing_lock, status::text AS status,"
        " priority, extract(epoch FROM scheduled_at) AS scheduled_at, worker_id"
        " FROM procrastinate_jobs ORDER BY id",
    )
    return {row.args["job_id"]: row for row in found}


async def fail_inserts_for(db: AsyncEngine, job_id: str, operation: str = "INSERT") -> None:
    """Make Procrastinate's table refuse ``operation`` on ``job_id``'s entry."""
    row = "OLD" if operation == "DELETE" else "NEW"
    async with db.begin() as conn:
        await conn.execute(
            sqlalchemy.text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF {row}.args->>'job_id' = '{job_id}' THEN RAISE EXCEPTION 'refused'; END IF; "
                f"RETURN {row}; END $$"
            )
        )
        await conn.execute(
            sqlalchemy.text(
                f"CREATE TRIGGER refuse BEFORE {operation} ON procrastinate_jobs "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        )


# -- one entry per unfinished job, in step with it ---------------------------------------------


async def test_an_entry_follows_its_job_through_every_state(
    queue: ProcrastinateJobQueue, db: AsyncEngine, clock: FakeClock
) -> None:
    await queue.submit(job("j1"))
    [entry] = (await entries(db)).values()
    assert (entry.queue_name, entry.task_name, entry.args) == (QUEUE, TASK, {"job_id": "j1"})
    assert (entry.lock, entry.queueing_lock, entry.status) == ("j1", "j1", "todo")
    assert entry.scheduled_at is None

    await queue.claim("w1", 1, LEASE_S)
    [entry] = (await entries(db)).values()
    [worker] = await rows(db, "SELECT id FROM procrastinate_workers")
    assert (entry.status, entry.worker_id) == ("doing", worker.id)

    await queue.fail("j1", "w1", Failure(error=BOOM, retry_at=T0 + 60))
    [retry] = (await entries(db)).values()
    assert (retry.id, retry.status, retry.scheduled_at) == (entry.id, "todo", T0 + 60)

    clock.advance(60)
    await queue.claim("w1", 1, LEASE_S)
    clock.advance(LEASE_S + 1)
    assert await queue.recover() == 1  # w1 went silent
    [recovered] = (await entries(db)).values()
    assert (recovered.id, recovered.status) == (entry.id, "todo")

    await queue.claim("w2", 1, LEASE_S)
    assert await queue.complete(await as_claimed(queue, "j1"), "w1", {"late": True}, 1) is None
    assert (await entries(db))["j1"].status == "doing"  # still w2's
    assert await queue.complete(await as_claimed(queue, "j1"), "w2", {"ok": True}, 1) is not None
    assert await entries(db) == {}


async def test_final_states_leave_no_entry(queue: ProcrastinateJobQueue, db: AsyncEngine) -> None:
    await queue.submit_many([job(f"j{i}", at=T0 + i, max_attempts=1) for i in range(5)])
    await queue.cancel("j0")  # queued
    await queue.claim("w1", 4, LEASE_S)
    await queue.cancel("j1")  # running
    await queue.fail("j2", "w1", Failure(error=BOOM, retry_at=None))  # failed
    await queue.fail("j3", "w1", Failure(error=BOOM, retry_at=T0))  # out of attempts: dead
    await queue.release("w1", ["j4"])
    assert {k: e.status for k, e in (await entries(db)).items()} == {"j4": "todo"}

    await queue.replay("j3")
    await queue.replay("j3")  # queued already: no second entry
    assert {k: e.status for k, e in (await entries(db)).items()} == {"j3": "todo", "j4": "todo"}
    await queue.claim("w1", 2, LEASE_S)
    await queue.fail("j3", "w1", Failure(error=BOOM, retry_at=None, dead=True))
    assert await queue.discard("j3")
    assert set(await entries(db)) == {"j4"}


async def test_an_expired_job_loses_its_entry(
    queue: ProcrastinateJobQueue, db: AsyncEngine, clock: FakeClock
) -> None:
    await queue.submit(job("late", deadline_at=T0 + 5))
    await queue.submit(job("fine", at=T0 + 1))
    clock.advance(5)
    assert ids(await queue.claim("w1", 5, LEASE_S)) == ["fine"]
    assert {k: e.status for k, e in (await entries(db)).items()} == {"fine": "doing"}


async def test_a_leased_submission_has_a_doing_entry_until_its_lease_ends(
    queue: ProcrastinateJobQueue, db: AsyncEngine, clock: FakeClock
) -> None:
    inline, created = await queue.submit(job("inline"), lease=Lease("inline-1", 600.0))
    assert (inline.status, created) == (JobStatus.RUNNING, True)
    assert (await entries(db))["inline"].status == "doing"
    assert await queue.claim("w1", 5, LEASE_S) == []

    clock.advance(601)  # the process running it inline died
    assert await queue.recover() == 1
    assert (await entries(db))["inline"].status == "todo"
    assert ids(await queue.claim("w1", 1, LEASE_S)) == ["inline"]
    assert (
        await queue.complete(await as_claimed(queue, "inline"), "inline-1", {"late": True}, 1)
        is None
    )
    assert (
        await queue.complete(await as_claimed(queue, "inline"), "w1", {"ok": True}, 1) is not None
    )
    assert await entries(db) == {}

    await queue.submit(job("gone"), lease=Lease("inline-2", 600.0))
    await queue.release("inline-2", ["gone"])  # its client went away: a worker finishes it
    assert (await entries(db))["gone"].status == "todo"


async def test_complete_many_finishes_the_entries_of_the_jobs_it_completes(
    queue: ProcrastinateJobQueue, db: AsyncEngine
) -> None:
    await queue.submit_many([job(f"j{i}", at=T0 + i) for i in range(3)])
    await queue.claim("w1", 2, LEASE_S)
    await queue.claim("w2", 1, LEASE_S)
    done = await queue.complete_many(
        "w1", [Completion(await as_claimed(queue, j), {}, 1) for j in ("j0", "j2", "j1")]
    )
    assert [d is not None for d in done] == [True, False, True]  # j2 is w2's
    assert {k: e.status for k, e in (await entries(db)).items()} == {"j2": "doing"}


# -- atomicity --------------------------------------------------------------------------------


async def test_a_failed_deferral_stores_no_job(
    queue: ProcrastinateJobQueue, db: AsyncEngine
) -> None:
    await fail_inserts_for(db, "boom")
    with pytest.raises(sqlalchemy.exc.DBAPIError, match="refused"):
        await queue.submit(job("boom"))
    assert await queue.get("boom") is None
    assert await queue.events("boom") == []

    batch = [job("ok1"), job("boom", at=T0 + 1), job("ok2", at=T0 + 2)]
    with pytest.raises(sqlalchemy.exc.DBAPIError, match="refused"):
        await queue.submit_many(batch)
    assert await queue.list_jobs(team_id="t1") == []
    assert await entries(db) == {}

    await queue.submit(job("fine"))  # the next one goes through
    assert set(await entries(db)) == {"fine"}


async def test_a_failed_finish_leaves_the_job_running(
    queue: ProcrastinateJobQueue, db: AsyncEngine
) -> None:
    await queue.submit(job("j1"))
    await queue.claim("w1", 1, LEASE_S)
    await fail_inserts_for(db, "j1", operation="DELETE")
    with pytest.raises(sqlalchemy.exc.DBAPIError, match="refused"):
        await queue.complete(await as_claimed(queue, "j1"), "w1", {"ok": True}, 5)
    running = await queue.get("j1")
    assert running is not None
    assert (running.status, running.result) == (JobStatus.RUNNING, None)
    assert (await entries(db))["j1"].status == "doing"


# -- order ------------------------------------------------------------------------------------


def test_priority_bands_are_ordered_disjoint_and_inside_int4() -> None:
    ranks = sorted(p.rank for p in Priority)
    assert ranks == list(range(len(ranks)))
    for rank in ranks:
        top, bottom = dispatch_priority(rank, 1), dispatch_priority(rank, 10**15)
        assert INT4[0] <= bottom < top <= INT4[1]
        assert dispatch_priority(rank, 0) == top  # tags start at 1
        assert dispatch_priority(rank, 2) == top - 1
        if rank > 0:
            assert bottom > dispatch_priority(rank - 1, 1)  # never into the class below


async def test_entries_carry_the_mapped_priority(
    queue: ProcrastinateJobQueue, db: AsyncEngine
) -> None:
    await queue.submit(job("h", priority=Priority.HIGH))
    await queue.submit_many([job(f"n{i}", at=T0 + i) for i in range(3)])
    await queue.submit(job("l", priority=Priority.LOW))
    # A tenant whose backlog pushed its tags past the band: its next job sorts last in it.
    async with db.begin() as conn:
        await conn.execute(sqlalchemy.text("UPDATE jobs SET fair_seq = 5000000000 WHERE id = 'n2'"))
    await queue.submit(job("n3", at=T0 + 3))

    tags = {r.id: (r.priority_rank, r.fair_seq) for r in await rows(db, "SELECT * FROM jobs")}
    assert tags["n3"] == (1, 5_000_000_001)
    for job_id, entry in (await entries(db)).items():
        if job_id != "n2":  # its tag was changed under it
            assert entry.priority == dispatch_priority(*tags[job_id]), job_id
    assert (await entries(db))["n3"].priority == dispatch_priority(1, 10**15)


async def test_procrastinates_own_fetch_follows_headraces_order(
    queue: ProcrastinateJobQueue, db: AsyncEngine
) -> None:
    """procrastinate_fetch_job_v2 (priority DESC, id) takes the jobs in the claim's order."""
    await queue.submit_many([job(f"a{i}", team="A", at=T0 + i) for i in range(4)])
    await queue.submit(job("b0", team="B", at=T0 + 10))
    await queue.submit(job("b1", team="B", at=T0 + 11))
    await queue.submit(job("low", team="B", at=T0 + 12, priority=Priority.LOW))
    await queue.submit(job("high", team="A", at=T0 + 13, priority=Priority.HIGH))
    async with db.connect() as conn:  # rolled back: the queue is left as it was
        fetched = [
            (
                await conn.execute(
                    sqlalchemy.text(
                        "SELECT args->>'job_id' FROM procrastinate_fetch_job_v2(:q, NULL)"
                    ),
                    {"q": [QUEUE]},
                )
            ).scalar()
            for _ in range(8)
        ]
    expected = ["high", "a0", "b0", "a1", "b1", "a2", "a3", "low"]
    assert fetched == expected
    assert ids(await queue.claim("w1", 8, LEASE_S)) == expected


# -- workers ----------------------------------------------------------------------------------


async def test_workers_register_and_go_and_silent_ones_are_pruned(
    make_queue: QueueFactory, db: AsyncEngine
) -> None:
    first, second = await make_queue(), await make_queue()
    await first.submit_many([job("j1"), job("j2", at=T0 + 1)])
    assert await rows(db, "SELECT id FROM procrastinate_workers") == []  # submitters: none
    await first.claim("w1", 1, LEASE_S)
    await second.claim("w2", 1, LEASE_S)
    workers = {r.id for r in await rows(db, "SELECT id FROM procrastinate_workers")}
    assert len(workers) == 2
    held = {r.worker_id for r in (await entries(db)).values()}
    assert held == workers

    # The second process went silent long ago: the first prunes its row; its job stays
    # running on its lease (and keeps its entry, now without a worker).
    async with db.begin() as conn:
        await conn.execute(
            sqlalchemy.text(
                "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'"
                " WHERE id <> (SELECT worker_id FROM procrastinate_jobs"
                "  WHERE args->>'job_id' = 'j1')"
            )
        )
    assert await first.recover() == 0
    assert len(await rows(db, "SELECT id FROM procrastinate_workers")) == 1
    assert (await entries(db))["j2"].worker_id is None
    assert (
        await second.complete(await as_claimed(second, "j2"), "w2", {}, 0) is not None
    )  # the lease still holds

    await first.aclose()
    assert await rows(db, "SELECT id FROM procrastinate_workers") == []


async def test_a_claim_after_this_workers_row_was_pruned_still_works(
    queue: ProcrastinateJobQueue, db: AsyncEngine
) -> None:
    await queue.submit_many([job("j1"), job("j2", at=T0 + 1)])
    await queue.claim("w1", 1, LEASE_S)
    async with db.begin() as conn:
        await conn.execute(sqlalchemy.text("DELETE FROM procrastinate_workers"))
    assert ids(await queue.claim("w1", 1, LEASE_S)) == ["j2"]


# -- the schema -------------------------------------------------------------------------------


async def test_start_checks_the_schema_or_applies_it(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    checking = ProcrastinateJobQueue(fresh_database_url)
    with pytest.raises(SchemaOutOfDateError, match="headrace migrate"):
        await checking.start()
    await checking.aclose()

    engine = create_engine(fresh_database_url)
    try:
        applied = await asyncio.gather(*(apply_schema(engine) for _ in range(3)))
        assert sorted(applied) == [False, False, True]  # concurrent callers: one applies
    finally:
        await engine.dispose()
    assert not await apply_procrastinate(fresh_database_url)  # and again: nothing to do
    migrating = ProcrastinateJobQueue(fresh_database_url, migrate_on_start=True)
    await migrating.start()
    await migrating.submit(job("j1"))
    await migrating.aclose()


async def test_an_older_procrastinate_schema_is_named(url: str, db: AsyncEngine) -> None:
    async with db.begin() as conn:
        await conn.execute(
            sqlalchemy.text(
                "DROP FUNCTION procrastinate_defer_jobs_v1(procrastinate_job_to_defer_v1[])"
            )
        )
    queue = ProcrastinateJobQueue(url)
    with pytest.raises(SchemaOutOfDateError, match="procrastinate_defer_jobs_v1"):
        await queue.start()
    await queue.aclose()


def test_sqlite_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"jobs\.backend: sql"):
        ProcrastinateJobQueue("sqlite+aiosqlite:///jobs.db")
