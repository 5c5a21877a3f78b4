"""The job queue on PostgreSQL with dispatch through Procrastinate: :class:`ProcrastinateJobQueue`.

Headrace's tables (``jobs``, ``job_events``, ``job_idempotency``, the webhook outbox) stay the
source of truth, exactly as :class:`~headrace.queue.sql.SqlJobQueue` keeps them; every read
and every state change is that class's. What this backend adds is one Procrastinate job (an
*entry*) per unfinished Headrace job, kept in step with it inside the same transaction:

==================  ===========================================================================
Headrace job        its entry in ``procrastinate_jobs``
==================  ===========================================================================
``queued``          ``todo`` (``scheduled_at`` = ``run_after`` when that is in the future)
``running``         ``doing`` (``worker_id``: the claiming process's ``procrastinate_workers`` row)
final               none: finished with ``procrastinate_finish_job_v1`` and deleted
==================  ===========================================================================

so a crash can never leave a job without its entry, nor an entry without its job. How: the
parent's methods open their transactions with ``_write``; here ``_write`` is re-entrant (a
transaction already open in the task is reused), so each operation runs the parent's method
inside a transaction of its own and adds Procrastinate's statements to it, through the same
SQLAlchemy connection: ``procrastinate_defer_jobs_v1`` on submit and replay (a submission with
a lease, an idempotent request run inline, gets its entry ``doing`` at once),
``procrastinate_retry_job_v1`` when a job goes back to ``queued`` (a retry at ``retry_at``, a
release, a recovery), ``procrastinate_finish_job_v1`` when it ends (succeeded, failed, dead,
expired, cancelled: status ``succeeded``, ``failed`` or ``aborted``, and the entry deleted:
Headrace's events are the history, so ``procrastinate_jobs`` holds only live work). The two
operations a busy worker repeats are single statements in the parent, run in autocommit; here
they stay single statements with the entries' part as one more ``WITH`` clause: the claim
(:data:`_CLAIM`) and the completion of a batch (:data:`_COMPLETE`, which deletes the entries
as ``procrastinate_finish_job_v1(..., delete_job => true)`` does, set-based). The parent's
seams this relies on, private to the two classes: ``_write`` (every transaction), ``_expire``
and ``_take`` (the claim's two steps) and ``_completion`` (the completion statement); the SQL
clauses it extends are :mod:`headrace.queue.sql_statements`' ``CLAIM_EVENTS`` and
``COMPLETE_CLAUSES``. The contract suite runs on both backends.

An entry is task ``headrace.run_job`` in queue ``headrace`` with args ``{"job_id": ...}``, and
both its ``lock`` and its ``queueing_lock`` are the job id: Procrastinate's own unique partial
indexes on them then allow at most one ``todo`` and one ``doing`` entry per job, and are how a
job's entry is found.

Order. Procrastinate fetches ``ORDER BY priority DESC, id``; Headrace claims
``priority_rank DESC, fair_seq, created_at`` (see :mod:`headrace.queue.sql`). The entry's
priority folds both into Procrastinate's 32-bit integer (:func:`dispatch_priority`): the range
is cut into one band per priority class, higher classes higher, and inside a band the priority
falls as the fairness tag grows. Ties (one tag, one class) go by entry id, which is the order of
deferral: submission order, rather than ``created_at``. A retried, released or recovered job
keeps its entry, so its tag and its place; a replayed one gets a new tag and a new entry. A
band holds 1.43 billion tags; tags restart at 1 whenever a class drains, and a tag past the
band (a backlog that never drains for that long) sorts last in its band, never into the next.

Claim. The fetch is ``procrastinate_fetch_job_v2``'s, in one statement for ``limit`` jobs:
``todo`` entries of the queue whose ``scheduled_at`` passed and whose lock has no ``doing``
entry, by ``priority DESC, id``, ``FOR UPDATE SKIP LOCKED``, set ``doing`` with this process's
worker id; the same statement moves their jobs to ``running`` with the lease and appends
their events. The function
itself is not called because it fetches one job per call, and it reads the database's
``now()``, while ``run_after``, deadlines and leases are on the queue's clock (the clock the
contract tests fake): two clocks would let a job's ``run_after`` and its entry's
``scheduled_at`` disagree. The statement locks each job row with ``SKIP LOCKED`` as well (every
other operation locks the job row first, then its entry): a claim never waits, so the two lock
orders cannot deadlock.

Leases, not stalled workers. Each process registers a Procrastinate worker on its first claim,
refreshes its heartbeat on claims and heartbeats (every :data:`WORKER_BEAT_S` at most) and
unregisters in :meth:`~ProcrastinateJobQueue.aclose`; :meth:`~ProcrastinateJobQueue.recover`
prunes workers silent for ``stalled_worker_s`` (``procrastinate_prune_stalled_workers_v1``),
so Procrastinate's own tools see who runs what. But recovery is Headrace's per-job lease:
a job comes back when its lease expired, and the worker that lost it can no longer complete or
fail it. Procrastinate's stalled-job recovery is per worker and does not stop a worker that was
only paused from finishing a job someone else now runs; the lease does: no job lost, none run
twice concurrently. Run no ``retry_stalled_jobs`` task on the ``headrace`` queue.

Schema. Procrastinate's own (``schema.sql`` of the installed version), applied once by
:func:`apply_schema` (``headrace migrate`` calls :func:`migrate`; :meth:`start` applies it with
``migrate_on_start``, else checks it). It is not an Alembic revision: Procrastinate ships and
versions it, and the store's database may run on SQLite where it cannot exist. Upgrading
Procrastinate across a schema change means applying its migrations
(``procrastinate schema --migrations-path``); :func:`check_schema` names what is missing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import structlog
from sqlalchemy import Executable, Row, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from headrace.domain import Job, JobStatus, Priority
from headrace.queue.base import Completion, Failure, Idempotency, Lease
from headrace.queue.sql import Clock, SqlJobQueue
from headrace.queue.sql_statements import CLAIM_EVENTS, COMPLETE_CLAUSES
from headrace.store.engine import async_url, create_engine, is_sqlite
from headrace.store.migrate import SchemaOutOfDateError
from headrace.store.schema import jobs

__all__ = [
    "QUEUE",
    "TASK",
    "WORKER_BEAT_S",
    "ProcrastinateJobQueue",
    "apply_schema",
    "check_schema",
    "dispatch_priority",
    "migrate",
]

log = structlog.get_logger("headrace")

QUEUE = "headrace"
"""The Procrastinate queue of Headrace's jobs."""
TASK = "headrace.run_job"
"""The Procrastinate task name of every entry (``headrace worker`` runs it, args ``job_id``)."""
WORKER_BEAT_S = 10.0
"""At most this long between two heartbeats of this process's Procrastinate worker row."""

_INT4_MIN = -(2**31)
_BAND = 2**32 // len(Priority)  # priorities per class: 1,431,655,765
_SCHEMA_LOCK_ID = 0x68727063  # "hrpc": serialises concurrent schema applications
_NEEDED = (  # what this module calls: Procrastinate >= 3.2 made the last of them
    "procrastinate_defer_jobs_v1",
    "procrastinate_finish_job_v1",
    "procrastinate_retry_job_v1",
    "procrastinate_register_worker_v1",
    "procrastinate_unregister_worker_v1",
    "procrastinate_prune_stalled_workers_v1",
)
_FINAL_ENTRY = {  # the Procrastinate end status of an entry whose job ended so
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.CANCELLED: "aborted",
}


def dispatch_priority(rank: int, fair_seq: int) -> int:
    """The Procrastinate priority of a job of priority ``rank`` with fairness tag ``fair_seq``.

    Class ``rank`` (0 … ``len(Priority) - 1``) owns the band
    ``[-2**31 + rank * B, -2**31 + (rank + 1) * B - 1]`` with ``B = 2**32 // len(Priority)``;
    tag 1 is the band's top, each further tag one lower, tags past ``B`` its bottom. So
    ``priority DESC`` is Headrace's ``priority_rank DESC, fair_seq``. The deferral computes
    the same in SQL from the job's row.
    """
    return _INT4_MIN + rank * _BAND + (_BAND - 1) - min(max(fair_seq, 1) - 1, _BAND - 1)


_PRIORITY_PARAMS = {"int4_min": _INT4_MIN, "band": _BAND}

# A todo entry for each queued or running job of :ids (which have none), in created_at order
# (so in id order).
# The priority is dispatch_priority over the job row (its constants bound as :int4_min and
# :band); scheduled_at is run_after while that is still ahead (NULL, the common case, spares
# Procrastinate's "scheduled" event).
_DEFER = text(
    "SELECT count(*) FROM unnest(procrastinate_defer_jobs_v1(ARRAY("
    "  SELECT CAST(ROW("
    "    :queue, :task,"
    "    CAST(CAST(:int4_min AS bigint) + j.priority_rank * CAST(:band AS bigint)"
    "      + (CAST(:band AS bigint) - 1)"
    "      - LEAST(GREATEST(j.fair_seq, 1) - 1, CAST(:band AS bigint) - 1) AS integer),"
    "    j.id, j.id, jsonb_build_object('job_id', j.id),"
    "    CASE WHEN j.run_after > :now THEN to_timestamp(j.run_after) END"
    "  ) AS procrastinate_job_to_defer_v1)"
    "  FROM jobs AS j"
    "  WHERE j.id = ANY(CAST(:ids AS text[])) AND j.status IN ('queued', 'running')"
    "  ORDER BY j.created_at, j.id)))"
)

# The entries of :ids back to todo where their job is queued again, scheduled as in _DEFER.
_REQUEUE = text(
    "SELECT procrastinate_retry_job_v1(p.id,"
    "  CASE WHEN j.run_after > :now THEN to_timestamp(j.run_after) END, NULL, NULL, NULL)"
    " FROM procrastinate_jobs AS p JOIN jobs AS j ON j.id = p.lock"
    " WHERE p.lock = ANY(CAST(:ids AS text[])) AND p.status = 'doing'"
    " AND p.queue_name = :queue AND j.status = 'queued'"
)

# The todo entries of :ids made doing (a job submitted with a lease runs at once), held by this
# process's worker row if it has one.
_HOLD = text(
    "UPDATE procrastinate_jobs SET status = 'doing',"
    " worker_id = (SELECT w.id FROM procrastinate_workers AS w WHERE w.id = :worker_id)"
    " WHERE queueing_lock = ANY(CAST(:ids AS text[])) AND status = 'todo'"
    " AND queue_name = :queue"
)

# The active entries of :ids finished with :status and deleted. An entry is found by ``lock``
# when ``doing`` and by ``queueing_lock`` when ``todo`` (Procrastinate's two unique partial
# indexes), then by its primary key: whatever the statistics say, no scan of the table.
_FINISH = text(
    "SELECT procrastinate_finish_job_v1(p.id, CAST(:status AS procrastinate_job_status), true)"
    " FROM procrastinate_jobs AS p"
    " WHERE p.id = ANY(ARRAY("
    "   SELECT e.id FROM procrastinate_jobs AS e"
    "   WHERE e.lock = ANY(CAST(:ids AS text[])) AND e.status = 'doing'"
    "   UNION ALL"
    "   SELECT e.id FROM procrastinate_jobs AS e"
    "   WHERE e.queueing_lock = ANY(CAST(:ids AS text[])) AND e.status = 'todo'))"
    " AND p.queue_name = :queue"
)

# ``doing`` entries whose job is not running (any more): after a recovery, and any strays.
_ADRIFT = text(
    "SELECT p.lock AS job_id, j.status FROM procrastinate_jobs AS p"
    " LEFT JOIN jobs AS j ON j.id = p.lock"
    " WHERE p.status = 'doing' AND p.queue_name = :queue"
    " AND j.status IS DISTINCT FROM 'running'"
)

# The claim (see the module docstring). ``j.id = ANY(ARRAY(...))``: primary-key lookups
# whatever plan the prepared statement gets (as SqlJobQueue._among). The worker id is looked
# up rather than trusted: a row pruned meanwhile leaves NULL, not a foreign-key error.
_CLAIM = text(
    "WITH candidate AS MATERIALIZED ("  # noqa: S608 - built from constants
    "  SELECT p.id, p.lock, p.priority FROM procrastinate_jobs AS p"
    "  WHERE p.status = 'todo' AND p.queue_name = :queue"
    "    AND (p.scheduled_at IS NULL OR p.scheduled_at <= to_timestamp(:now))"
    "    AND NOT EXISTS (SELECT FROM procrastinate_jobs AS other"
    "      WHERE other.lock = p.lock AND other.status = 'doing')"
    "  ORDER BY p.priority DESC, p.id"
    "  LIMIT :limit"
    "  FOR UPDATE SKIP LOCKED"
    "), claimable AS MATERIALIZED ("
    "  SELECT jobs.id FROM jobs"
    "  WHERE jobs.id = ANY(ARRAY(SELECT lock FROM candidate))"
    "    AND jobs.status = 'queued'"
    "    AND (jobs.deadline_at IS NULL OR jobs.deadline_at > :now)"
    "  FOR UPDATE SKIP LOCKED"
    "), fetched AS ("
    "  UPDATE procrastinate_jobs AS p"
    "  SET status = 'doing',"
    "      worker_id = (SELECT w.id FROM procrastinate_workers AS w WHERE w.id = :worker_id)"
    "  FROM candidate AS c"
    "  WHERE p.id = c.id AND c.lock IN (SELECT id FROM claimable)"
    "  RETURNING p.id, p.lock, p.priority"
    "), taken AS ("
    " UPDATE jobs SET status = 'running', attempts = jobs.attempts + 1, started_at = :now,"
    "   lease_owner = :worker, lease_expires_at = :expires, event_seq = jobs.event_seq + 1"
    " FROM fetched WHERE jobs.id = fetched.lock"
    " RETURNING jobs.*, fetched.priority AS dispatch_priority, fetched.id AS dispatch_id"
    "), " + CLAIM_EVENTS + " SELECT * FROM taken"
)

# The completion (the parent's clauses), whose entries are finished and deleted in the same
# statement: what ``procrastinate_finish_job_v1(id, status, delete_job => true)`` does to each
# (a DELETE of the entry while todo or doing), as one set-based clause. Its entry is
# ``doing``, found by ``lock`` (Procrastinate's unique partial index).
_COMPLETE = text(
    COMPLETE_CLAUSES + ", entries AS ("  # noqa: S608 - built from constants
    " DELETE FROM procrastinate_jobs AS p WHERE p.lock = ANY(ARRAY(SELECT id FROM finished))"
    f" AND p.status = 'doing' AND p.queue_name = '{QUEUE}')"
    " SELECT id FROM finished"
)


class ProcrastinateJobQueue(SqlJobQueue):
    """:class:`SqlJobQueue` with its dispatch through Procrastinate (see the module docstring).

    PostgreSQL only. ``engine_or_url``, ``clock`` and ``migrate_on_start`` as for
    :class:`SqlJobQueue`; ``migrate_on_start`` also applies Procrastinate's schema when it is
    missing. ``stalled_worker_s``: :meth:`recover` deletes Procrastinate worker rows whose
    heartbeat is older (housekeeping only: jobs come back by their leases).
    """

    def __init__(
        self,
        engine_or_url: AsyncEngine | str,
        *,
        clock: Clock = time.time,
        migrate_on_start: bool = False,
        stalled_worker_s: float = 120.0,
    ) -> None:
        url = async_url(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url.url
        if is_sqlite(url):
            raise ValueError(
                "jobs.backend: procrastinate needs PostgreSQL: set database_url to a "
                "postgresql:// URL, or use jobs.backend: sql"
            )
        super().__init__(engine_or_url, clock=clock, migrate_on_start=migrate_on_start)
        self._stalled_worker_s = stalled_worker_s
        # The transaction open in the running task, for the re-entrant _write.
        self._open: ContextVar[AsyncConnection | None] = ContextVar(
            f"headrace_procrastinate_txn_{id(self):x}", default=None
        )
        self._worker_id: int | None = None  # this process's row in procrastinate_workers
        self._beat_at = float("-inf")  # time.monotonic() of its last heartbeat
        self._beating = asyncio.Lock()  # one registration, however many loops claim at once

    async def start(self) -> None:
        if self._migrate_on_start:
            await apply_schema(self._engine)
        else:
            await check_schema(self._engine)
        await super().start()

    async def aclose(self) -> None:
        if self._worker_id is not None:
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(
                        text("SELECT procrastinate_unregister_worker_v1(:id)"),
                        {"id": self._worker_id},
                    )
            except Exception as exc:  # the database is gone: the row is pruned later
                log.warning("procrastinate_unregister_failed", error=repr(exc))
            self._worker_id = None
        await super().aclose()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction; inside one already open in this task, that same one."""
        conn = self._open.get()
        if conn is not None:
            yield conn
            return
        async with super()._write() as conn:
            token = self._open.set(conn)
            try:
                yield conn
            finally:
                self._open.reset(token)

    # -- submission ---------------------------------------------------------------------------

    async def submit(
        self, job: Job, idempotency: Idempotency | None = None, *, lease: Lease | None = None
    ) -> tuple[Job, bool]:
        async with self._write() as conn:
            stored, created = await super().submit(job, idempotency, lease=lease)
            if created:
                await self._defer(conn, [job.id])
                if lease is not None:  # running at once: its entry is doing
                    await self._hold(conn, [job.id])
        return stored, created

    async def submit_many(self, jobs_: Sequence[Job]) -> None:
        if not jobs_:
            return
        async with self._write() as conn:
            await super().submit_many(jobs_)
            await self._defer(conn, [job.id for job in jobs_])

    # -- the worker side ----------------------------------------------------------------------

    async def claim(self, worker: str, limit: int, lease_s: float) -> list[Job]:
        await self._beat()
        return await super().claim(worker, limit, lease_s)

    async def _expire(self, conn: AsyncConnection, now: float) -> list[Row[Any]]:
        expired = await super()._expire(conn, now)
        await self._finish(conn, [row.id for row in expired], "failed")
        return expired

    async def _take(self, worker: str, limit: int, lease_s: float, now: float) -> list[Row[Any]]:
        params = {
            "queue": QUEUE,
            "now": now,
            "limit": limit,
            "worker_id": self._worker_id,
            "worker": worker,
            "expires": now + lease_s,
        }
        claimed = await self._alone(_CLAIM, params)
        # RETURNING comes in no particular order.
        return sorted(claimed, key=lambda r: (-r.dispatch_priority, r.dispatch_id))

    async def heartbeat(self, worker: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        await self._beat()
        return await super().heartbeat(worker, job_ids, lease_s)

    async def complete(
        self, job: Job, worker: str, result: Mapping[str, Any], cost_micro_usd: int
    ) -> Job | None:
        (done,) = await self.complete_many(worker, [Completion(job, result, cost_micro_usd)])
        return done

    def _completion(self) -> Executable:
        return _COMPLETE

    async def fail(self, job_id: str, worker: str, failure: Failure) -> Job | None:
        async with self._write() as conn:
            after = await super().fail(job_id, worker, failure)
            if after is not None:
                await self._follow(conn, [after])
        return after

    async def release(self, worker: str, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        async with self._write() as conn:
            await super().release(worker, job_ids)
            # Only the jobs this worker held are queued again; the others' entries stay.
            await self._requeue(conn, list(job_ids))

    async def recover(self) -> int:
        """Requeue (or bury) the jobs whose lease expired, with their entries; prune silent
        Procrastinate workers."""
        async with self._write() as conn:
            recovered = await super().recover()
            if recovered:
                adrift = (await conn.execute(_ADRIFT, {"queue": QUEUE})).all()
                queued = [row.job_id for row in adrift if row.status == JobStatus.QUEUED.value]
                await self._requeue(conn, queued)
                gone = [row.job_id for row in adrift if row.status != JobStatus.QUEUED.value]
                await self._finish(conn, gone, "failed")
        # Apart: deleting a worker row updates its entries, which others may hold.
        async with self._engine.begin() as conn:
            await conn.execute(
                text("SELECT * FROM procrastinate_prune_stalled_workers_v1(:seconds)"),
                {"seconds": self._stalled_worker_s},
            )
        return recovered

    # -- the client side and operations -------------------------------------------------------

    async def cancel(self, job_id: str) -> Job | None:
        async with self._write() as conn:
            after = await super().cancel(job_id)
            if after is not None:
                await self._follow(conn, [after])
        return after

    async def replay(self, job_id: str) -> Job | None:
        async with self._write() as conn:
            # Locked here first, so the state it was in is the state the parent replays.
            before = (
                await conn.execute(
                    select(jobs.c.status).where(jobs.c.id == job_id).with_for_update()
                )
            ).scalar()
            after = await super().replay(job_id)
            replayable = (JobStatus.DEAD.value, JobStatus.FAILED.value)
            if after is not None and before in replayable:
                await self._defer(conn, [job_id])
        return after

    async def discard(self, job_id: str) -> bool:
        async with self._write() as conn:
            discarded = await super().discard(job_id)
            if discarded:  # a dead job has no entry; should a stray one remain, it goes too
                await self._finish(conn, [job_id], "failed")
        return discarded

    # -- the entries --------------------------------------------------------------------------

    async def _follow(self, conn: AsyncConnection, changed: Sequence[Job]) -> None:
        """Bring the entries of jobs that just changed state in line with them."""
        await self._requeue(conn, [j.id for j in changed if j.status is JobStatus.QUEUED])
        for job in changed:
            if job.status.final:
                await self._finish(conn, [job.id], _FINAL_ENTRY.get(job.status, "failed"))

    async def _defer(self, conn: AsyncConnection, job_ids: Sequence[str]) -> None:
        params = {
            "queue": QUEUE,
            "task": TASK,
            "ids": list(job_ids),
            "now": self._clock(),
            **_PRIORITY_PARAMS,
        }
        await conn.execute(_DEFER, params)

    async def _hold(self, conn: AsyncConnection, job_ids: Sequence[str]) -> None:
        params = {"queue": QUEUE, "ids": list(job_ids), "worker_id": self._worker_id}
        await conn.execute(_HOLD, params)

    async def _requeue(self, conn: AsyncConnection, job_ids: Sequence[str]) -> None:
        if job_ids:
            params = {"queue": QUEUE, "ids": list(job_ids), "now": self._clock()}
            await conn.execute(_REQUEUE, params)

    async def _finish(self, conn: AsyncConnection, job_ids: Sequence[str], status: str) -> None:
        if job_ids:
            params = {"queue": QUEUE, "ids": list(job_ids), "status": status}
            await conn.execute(_FINISH, params)

    async def _beat(self) -> None:
        """Register this process's Procrastinate worker, or refresh its heartbeat (throttled).

        A row pruned meanwhile (the process was paused longer than some pruner's timeout) is
        registered anew.
        """
        if self._worker_id is not None and time.monotonic() - self._beat_at < WORKER_BEAT_S:
            return
        async with self._beating:
            if self._worker_id is not None and time.monotonic() - self._beat_at < WORKER_BEAT_S:
                return  # another task beat meanwhile
            await self._beat_now()

    async def _beat_now(self) -> None:
        async with self._engine.begin() as conn:
            alive = None
            if self._worker_id is not None:
                alive = (
                    await conn.execute(
                        text(
                            "UPDATE procrastinate_workers SET last_heartbeat = now()"
                            " WHERE id = :id RETURNING id"
                        ),
                        {"id": self._worker_id},
                    )
                ).scalar()
            if alive is None:
                registered = await conn.execute(
                    text("SELECT worker_id FROM procrastinate_register_worker_v1()")
                )
                alive = registered.scalar_one()
        self._worker_id = int(alive)
        self._beat_at = time.monotonic()


# -- the schema -------------------------------------------------------------------------------


async def apply_schema(engine: AsyncEngine) -> bool:
    """Apply Procrastinate's schema to ``engine``'s database unless it is there; True if it
    applied it. Safe to run again and concurrently (an advisory lock serialises the callers).

    Raises :class:`~headrace.store.migrate.SchemaOutOfDateError` when an older Procrastinate
    schema is there without what this module needs.
    """
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK_ID})
        if await _installed(conn):
            return False
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None  # a connection checked out of the pool
        # psycopg runs a script of many statements when it is sent without parameters.
        await driver.execute(_schema_sql())
    return True


async def check_schema(engine: AsyncEngine) -> None:
    """Raise :class:`~headrace.store.migrate.SchemaOutOfDateError` unless Procrastinate's
    schema, with everything this module calls, is in ``engine``'s database."""
    async with engine.connect() as conn:
        if not await _installed(conn):
            url = engine.url.render_as_string(hide_password=True)
            raise SchemaOutOfDateError(
                f"the database {url} has no Procrastinate schema (jobs.backend: "
                "procrastinate): run `headrace migrate` against it (same database_url) before "
                "starting, or set store.migrate_on_start: true"
            )


async def migrate(url: str) -> bool:
    """:func:`apply_schema` on the database at ``url``: what ``headrace migrate`` runs, after
    the store's migrations, when ``jobs.backend`` is ``procrastinate``."""
    engine = create_engine(url)
    try:
        return await apply_schema(engine)
    finally:
        await engine.dispose()


async def _installed(conn: AsyncConnection) -> bool:
    """Whether Procrastinate's schema is there (False: nothing of it); raises when it is there
    but lacks functions this module calls (made by an older Procrastinate)."""
    found = await conn.execute(
        text(
            "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS jobs,"
            " ARRAY(SELECT proname::text FROM pg_proc WHERE proname = ANY(CAST(:names AS text[])))"
            " AS functions"
        ),
        {"names": list(_NEEDED)},
    )
    row = found.one()
    if not row.jobs:
        return False
    missing = sorted(set(_NEEDED) - set(row.functions))
    if missing:
        raise SchemaOutOfDateError(
            f"the database's Procrastinate schema lacks {', '.join(missing)}: it was made by "
            "Procrastinate older than 3.2. Apply Procrastinate's migrations since that "
            "version (`procrastinate schema --migrations-path` lists them), then start again"
        )
    return True


def _schema_sql() -> str:
    from procrastinate.schema import SchemaManager  # the optional dependency, loaded on use

    return SchemaManager.get_schema()
