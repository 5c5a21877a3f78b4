"""The job queue in SQL (SQLAlchemy 2 async Core): SQLite embedded, PostgreSQL scaled out.

:class:`SqlJobQueue` keeps every job, its events, its idempotency key and its webhook outbox
in the store's database (tables in :mod:`headrace.store.schema`, revision 0003). Workers in
any number of processes claim jobs with leases; a worker that dies stops heartbeating, its
lease expires, and :meth:`SqlJobQueue.recover` hands the job to someone else.

Transactions. Every state change is one transaction that updates ``jobs``, appends a
``job_events`` row (``seq`` = the job's ``event_seq`` + 1, taken from the row the same
transaction updates, so it is always the previous maximum + 1) and, when the new state is
final and the job has a ``webhook_url``, inserts a ``webhook_outbox`` row.

- PostgreSQL: ``claim``, ``recover`` and ``due_webhooks`` pick their rows with
  ``FOR UPDATE SKIP LOCKED``, so concurrent claimers never wait for each other nor take the
  same row. The two operations a busy worker repeats are each one statement, run in
  autocommit (the statement is the transaction: no ``BEGIN`` and ``COMMIT`` round trips),
  whose data-modifying ``WITH`` clauses write the events (and outbox rows) too: the claim
  (:data:`~headrace.queue.sql_statements.CLAIM`: ``UPDATE jobs ... WHERE id =
  ANY(ARRAY(SELECT id ... ORDER BY ... LIMIT n FOR UPDATE SKIP LOCKED)) RETURNING *``, the
  array form, not ``IN``: see :meth:`SqlJobQueue._among`) and the completion of a batch
  (:data:`~headrace.queue.sql_statements.COMPLETE`, its rows locked in id order first). A
  completion carries the job as claimed, so the finished job and its webhook payload are
  built here, not read back. ``submit_many`` and the events of other changes insert with
  ``INSERT ... SELECT FROM json_populate_recordset(<one JSON array of rows>)``.
- SQLite: write transactions start with ``BEGIN IMMEDIATE`` (they take the database's write
  lock first, so a read-then-write transaction can never fail half way with "database is
  locked" when another process writes the same file; ``busy_timeout`` makes the others
  wait), and writers of one process queue on an :class:`asyncio.Lock` instead of polling the
  busy handler. ``FOR UPDATE`` is not needed there (SQLAlchemy does not render it): one
  writer at a time.
- Both: the worker-side queries name the state as a literal (``status = 'queued'``) so that
  the partial indexes of :mod:`headrace.store.schema` serve them; those hold only the queued
  (running, dead) rows, so a claim costs the same however many finished jobs the table keeps.

A worker keeps its lease after ``lease_expires_at`` until :meth:`SqlJobQueue.recover` (which
the runner calls periodically) takes the job back: until then, its heartbeat, ``complete``
or ``fail`` still count.

Ordering and fairness. Claim order is ``priority_rank DESC, fair_seq, created_at``, read in
order from ``ix_jobs_claim``. ``fair_seq`` is a start-time fair-queueing tag per priority: a
job submitted by tenant T (its team, or its key without one) gets ``max(last + 1, head)``,
where ``last`` is T's largest tag among its queued jobs of that priority and ``head`` is the
smallest tag among the priority's runnable queued jobs (the virtual time: the tag being
served now). So a tenant's n-th queued job goes after every other tenant's (n-1)-th, and a
tenant that arrives late starts at the head of the line rather than behind everyone's
backlog, or ahead of everyone with tags that restart at 1. Jobs requeued for a retry keep
their tag (they go ahead of newer work); a replayed job gets a new one.

Deadlines. A claim never starts a job whose ``deadline_at`` passed; at most once every
:data:`EXPIRE_SWEEP_S` a claim first fails those jobs (error code ``expired``, up to 1,000 at
a time, in a transaction of its own).

One class with one method per Protocol operation, each a transaction; past the 800 lines of
STYLE.md because the class is one thing. How a job maps to rows is
:mod:`headrace.queue.sql_rows`; the statements built once (and the clauses
:mod:`headrace.queue.procrastinate` shares) are :mod:`headrace.queue.sql_statements`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Executable,
    Row,
    Select,
    Table,
    any_,
    case,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from headrace.domain import Job, JobEvent, JobStatus, Priority
from headrace.queue.base import (
    Completion,
    DeliveryRecord,
    Failure,
    Idempotency,
    IdempotencyConflictError,
    Lease,
    OutboxItem,
    QueueDepth,
)
from headrace.queue.sql_rows import (
    dumps,
    dumps_or_none,
    event_row,
    job_to_row,
    outbox_row,
    row_to_job,
    tenant_of,
)
from headrace.queue.sql_statements import (
    CLAIM,
    COMPLETE,
    in_state,
    json_insert,
    tags_query,
    take_sqlite,
)
from headrace.store.engine import SQLITE_BEGIN_IMMEDIATE, create_engine, is_sqlite
from headrace.store.migrate import check_engine, upgrade_engine
from headrace.store.schema import (
    job_events,
    job_idempotency,
    jobs,
    webhook_deliveries,
    webhook_outbox,
)

__all__ = ["WEBHOOK_LEASE_S", "SqlJobQueue"]

WEBHOOK_LEASE_S = 30.0
"""How long :meth:`SqlJobQueue.due_webhooks` leases an outbox item to its deliverer."""

_EXPIRE_BATCH = 1000  # deadline sweeps per claim: bounds one claim's transaction
# Claims fail overdue jobs at most this often (a claim never starts an overdue job either way:
# its own query skips them; the sweep only marks them failed, a second or so later).
EXPIRE_SWEEP_S = 1.0
_QUEUED = JobStatus.QUEUED.value
# What retention deletes: ended jobs; dead letters wait for an operator.
_PURGED = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
_RUNNING = JobStatus.RUNNING.value

Clock = Callable[[], float]


class SqlJobQueue:
    """Jobs in the store's SQL database (see the module docstring).

    ``engine_or_url``: an async URL (its own engine is made with
    :func:`headrace.store.engine.create_engine`, so SQLite gets WAL and ``busy_timeout``, and
    disposed in :meth:`aclose`), or an engine made by that function and shared (not
    disposed here). ``clock``: unix time in seconds; tests pass a fake one.
    ``migrate_on_start``: :meth:`start` upgrades the schema to head; by default it only checks
    it (the store's start, or ``headrace migrate``, owns the schema) and raises
    :class:`~headrace.store.migrate.SchemaOutOfDateError` when behind.
    """

    def __init__(
        self,
        engine_or_url: AsyncEngine | str,
        *,
        clock: Clock = time.time,
        migrate_on_start: bool = False,
    ) -> None:
        if isinstance(engine_or_url, str):
            self._engine = create_engine(engine_or_url)
            self._owns_engine = True
        else:
            self._engine = engine_or_url
            self._owns_engine = False
        self._sqlite = is_sqlite(self._engine.url)
        self._writer = self._engine.execution_options(**SQLITE_BEGIN_IMMEDIATE)
        self._write_lock = asyncio.Lock() if self._sqlite else None
        self._clock = clock
        self._migrate_on_start = migrate_on_start
        self._next_sweep_at = float("-inf")  # the next claim that fails overdue jobs
        # One-statement operations (claim, complete) on PostgreSQL: the statement is its own
        # transaction, without BEGIN and COMMIT round trips.
        self._autocommit = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        self._statements: set[asyncio.Future[list[Row[Any]]]] = set()  # running in _alone

    async def start(self) -> None:
        if self._migrate_on_start:
            await upgrade_engine(self._engine)
        else:
            await check_engine(self._engine)

    async def aclose(self) -> None:
        if self._statements:  # let statements whose callers went away end first
            await asyncio.wait(self._statements, timeout=10)
        if self._owns_engine:
            await self._engine.dispose()

    async def check(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction (see the module docstring for SQLite's)."""
        if self._write_lock is None:
            async with self._engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._writer.begin() as conn:
            yield conn

    async def _alone(self, statement: Executable, params: Mapping[str, Any]) -> list[Row[Any]]:
        """PostgreSQL: run ``statement`` as its own transaction, in autocommit, and return its
        rows. It runs to its end in a task of its own whatever happens to the caller: a
        caller cancelled mid-statement would leave the connection half given back to the pool
        (and the statement may be committed anyway). A claim whose caller is gone is taken
        back by recovery when its leases expire; a completion stays written."""

        async def run() -> list[Row[Any]]:
            async with self._autocommit.connect() as conn:
                return list(await conn.execute(statement, params))

        task = asyncio.ensure_future(run())
        self._statements.add(task)
        task.add_done_callback(_forget_statement(self._statements))
        return await asyncio.shield(task)

    @property
    def engine(self) -> AsyncEngine:
        """The database engine (for stores that must live beside the jobs: batches)."""
        return self._engine

    def _among(self, column: ColumnElement[str], picked: Select[tuple[str]]) -> ColumnElement[bool]:
        """``column IN (picked)``; on PostgreSQL ``column = ANY(ARRAY(picked))``.

        The array form is answered by primary-key lookups whatever the plan. With ``IN``, the
        generic plan of a prepared statement (psycopg prepares after five runs) cannot see the
        subquery's LIMIT and may hash-join it against a scan of the whole table.
        """
        if self._sqlite:
            return column.in_(picked)
        return column == any_(func.array(picked.scalar_subquery()))

    def _insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        return sqlite.insert(table) if self._sqlite else postgresql.insert(table)

    async def _insert_many(
        self, conn: AsyncConnection, table: Table, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert ``rows`` (all with the same keys) in one statement.

        PostgreSQL: ``INSERT ... SELECT ... FROM json_populate_recordset(...)``: one JSON
        parameter, whatever the number of rows; orjson writes it in microseconds, where
        psycopg's dumping of one array per column (``unnest``, docs/adr/0008) was a third of
        a batch's CPU.
        SQLite: executemany, which SQLAlchemy sends as multi-row ``VALUES``.
        """
        if not rows:
            return
        if self._sqlite:
            await conn.execute(insert(table), list(rows))
            return
        statement = json_insert(table, tuple(rows[0]))
        await conn.execute(statement, {"rows": orjson.dumps(rows).decode()})

    # -- submission ---------------------------------------------------------------------------

    async def submit(
        self, job: Job, idempotency: Idempotency | None = None, *, lease: Lease | None = None
    ) -> tuple[Job, bool]:
        now = self._clock()
        if lease is not None:
            job = dataclasses.replace(
                job, status=JobStatus.RUNNING, attempts=job.attempts + 1, started_at=now
            )
        async with self._write() as conn:
            if idempotency is not None:
                existing = await self._take_key(conn, job, idempotency, now)
                if existing is not None:
                    return existing, False
            (tag,) = await self._next_tags(conn, [job], now)
            row = job_to_row(job, tag)
            if lease is not None:
                row |= {"lease_owner": lease.worker, "lease_expires_at": now + lease.duration_s}
            await conn.execute(insert(jobs).values(row))
            await conn.execute(insert(job_events).values(event_row(job, 1, now, {})))
        return job, True

    async def _take_key(
        self, conn: AsyncConnection, job: Job, idempotency: Idempotency, now: float
    ) -> Job | None:
        """Take ``idempotency``'s key for ``job``; None when taken, else the job that holds it.

        One upsert on the primary key: a new key is inserted and an expired one overwritten
        (both return a row); a live one is left alone. A concurrent submission of the same
        key waits on the primary key until this transaction ends, then finds it live.
        """
        key = job_idempotency.c
        values = {
            "scope": idempotency.scope,
            "key": idempotency.key,
            "body_hash": idempotency.body_hash,
            "job_id": job.id,
            "expires_at": float(idempotency.expires_at),
        }
        insert_key = self._insert(job_idempotency).values(values)
        upsert = insert_key.on_conflict_do_update(
            index_elements=[key.scope, key.key],
            set_={
                name: insert_key.excluded[name] for name in ("body_hash", "job_id", "expires_at")
            },
            where=key.expires_at <= now,
        ).returning(key.job_id)
        if (await conn.execute(upsert)).first() is not None:
            return None
        holder = (
            await conn.execute(
                select(key.body_hash, key.job_id).where(
                    key.scope == idempotency.scope, key.key == idempotency.key
                )
            )
        ).one()
        existing = await self._get(conn, holder.job_id)
        if existing is None:  # its job was discarded: the key is free again
            await conn.execute(
                update(job_idempotency)
                .where(key.scope == idempotency.scope, key.key == idempotency.key)
                .values(body_hash=idempotency.body_hash, job_id=job.id)
            )
            return None
        if holder.body_hash != idempotency.body_hash:
            raise IdempotencyConflictError(existing)
        return existing

    async def submit_many(self, jobs_: Sequence[Job]) -> None:
        if not jobs_:
            return
        now = self._clock()
        async with self._write() as conn:
            tags = await self._next_tags(conn, jobs_, now)
            rows = [job_to_row(job, tag) for job, tag in zip(jobs_, tags, strict=True)]
            await self._insert_many(conn, jobs, rows)
            await self._insert_many(conn, job_events, [event_row(j, 1, now, {}) for j in jobs_])

    async def _next_tags(self, conn: AsyncConnection, new: Sequence[Job], now: float) -> list[int]:
        """The fairness tags of ``new`` jobs, in order (see the module docstring).

        One round trip: the smallest tag per priority and the largest per (tenant, priority),
        each a scalar subquery that reads one end of an index range.
        """
        ranks = sorted({job.priority.rank for job in new})
        lanes = sorted({(tenant_of(job), job.priority.rank) for job in new})
        params: dict[str, Any] = {"now": now}
        params |= {f"rank_{i}": rank for i, rank in enumerate(ranks)}
        for i, (tenant, rank) in enumerate(lanes):
            params |= {f"tenant_{i}": tenant, f"lane_rank_{i}": rank}
        statement = tags_query(len(ranks), len(lanes))
        found = (await conn.execute(statement, params)).one()
        head = dict(zip(ranks, found[: len(ranks)], strict=True))
        following = {
            lane: max(int(last or 0) + 1, int(head[lane[1]] or 1))
            for lane, last in zip(lanes, found[len(ranks) :], strict=True)
        }
        tags = []
        for job in new:
            lane = (tenant_of(job), job.priority.rank)
            tags.append(following[lane])
            following[lane] += 1
        return tags

    # -- the worker side ----------------------------------------------------------------------

    async def claim(self, worker: str, limit: int, lease_s: float) -> list[Job]:
        now = self._clock()
        if now >= self._next_sweep_at:
            self._next_sweep_at = now + EXPIRE_SWEEP_S
            async with self._write() as conn:
                expired = await self._expire(conn, now)
                await self._record(conn, [(row, {"error": _EXPIRED}) for row in expired], now)
        if limit <= 0:
            return []
        return [row_to_job(row) for row in await self._take(worker, limit, lease_s, now)]

    async def _expire(self, conn: AsyncConnection, now: float) -> list[Row[Any]]:
        """Fail the queued jobs whose deadline passed; their rows, as updated."""
        c = jobs.c
        overdue = (
            select(c.id)
            .where(in_state(JobStatus.QUEUED), c.deadline_at <= now)
            .limit(_EXPIRE_BATCH)
            .with_for_update(skip_locked=True)
        )
        expired = await conn.execute(
            update(jobs)
            .where(self._among(c.id, overdue))
            .values(
                status=JobStatus.FAILED.value,
                error=dumps(_EXPIRED),
                finished_at=now,
                event_seq=c.event_seq + 1,
            )
            .returning(*jobs.c)
        )
        return list(expired)

    async def _take(self, worker: str, limit: int, lease_s: float, now: float) -> list[Row[Any]]:
        """Lease up to ``limit`` runnable jobs to ``worker`` and record their events; their
        rows, in queue order. PostgreSQL: one statement (:data:`CLAIM`)."""
        params = {"now": now, "limit": limit, "worker": worker, "expires": now + lease_s}
        if self._sqlite:
            async with self._write() as conn:
                claimed = list(await conn.execute(take_sqlite(), params))
                changes = [(row, {"worker": worker, "attempt": row.attempts}) for row in claimed]
                await self._record(conn, changes, now)
        else:
            claimed = await self._alone(CLAIM, params)
        # RETURNING comes in no particular order.
        return sorted(claimed, key=lambda r: (-r.priority_rank, r.fair_seq, r.created_at, r.id))

    async def heartbeat(self, worker: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        wanted = set(job_ids)
        if not wanted:
            return set()
        now = self._clock()
        c = jobs.c
        mine = [c.id.in_(sorted(wanted)), c.status == _RUNNING, c.lease_owner == worker]
        async with self._write() as conn:
            if not self._sqlite:
                # Lock in id order, as complete_many does: two transactions that take the same
                # rows in the same order cannot deadlock.
                await conn.execute(select(c.id).where(*mine).order_by(c.id).with_for_update())
            held = await conn.execute(
                update(jobs).where(*mine).values(lease_expires_at=now + lease_s).returning(c.id)
            )
            return wanted - set(held.scalars())

    async def complete(
        self, job: Job, worker: str, result: Mapping[str, Any], cost_micro_usd: int
    ) -> Job | None:
        (done,) = await self.complete_many(worker, [Completion(job, result, cost_micro_usd)])
        return done

    async def complete_many(
        self, worker: str, completions: Sequence[Completion]
    ) -> list[Job | None]:
        if not completions:
            return []
        now = self._clock()
        finished = {c.job_id: c.finished(now) for c in completions}
        if self._sqlite:
            async with self._write() as conn:
                seqs = await self._complete_each(conn, worker, completions, now)
                changes = [
                    (finished[job_id], seq, {"attempt": finished[job_id].attempts})
                    for job_id, seq in seqs.items()
                ]
                await self._append(conn, changes, now)
            done = set(seqs)
        else:
            done = await self._complete_set(worker, completions, finished, now)
        return [finished[c.job_id] if c.job_id in done else None for c in completions]

    async def _complete_each(
        self, conn: AsyncConnection, worker: str, completions: Sequence[Completion], now: float
    ) -> dict[str, int]:
        """SQLite: one ``UPDATE`` per completion (in process, each is cheap); the new
        ``event_seq`` of each job updated (still leased to ``worker``), by id."""
        c = jobs.c
        done: dict[str, int] = {}
        for completion in completions:
            seq = (
                await conn.execute(
                    update(jobs)
                    .where(c.id == completion.job_id, c.status == _RUNNING, c.lease_owner == worker)
                    .values(
                        status=JobStatus.SUCCEEDED.value,
                        result=dumps(completion.result),
                        error=None,
                        cost_micro_usd=int(completion.cost_micro_usd),
                        finished_at=now,
                        lease_owner=None,
                        lease_expires_at=None,
                        event_seq=c.event_seq + 1,
                    )
                    .returning(c.event_seq)
                )
            ).scalar()
            if seq is not None:
                done[completion.job_id] = seq
        return done

    async def _complete_set(
        self,
        worker: str,
        completions: Sequence[Completion],
        finished: Mapping[str, Job],
        now: float,
    ) -> set[str]:
        """PostgreSQL: ``completions`` in one statement (:data:`COMPLETE`), whatever their
        number, events and webhook outbox rows included; the ids of the jobs updated (still
        leased to ``worker``)."""
        done = [
            {"id": c.job_id, "result": c.result, "cost": int(c.cost_micro_usd)} for c in completions
        ]
        outbox = [
            outbox_row(job, job.webhook_url, now)
            for job in finished.values()
            if job.webhook_url is not None
        ]
        params = {
            "done": orjson.dumps(done).decode(),
            "outbox": orjson.dumps(outbox).decode(),
            "worker": worker,
            "now": now,
        }
        return {row.id for row in await self._alone(self._completion(), params)}

    def _completion(self) -> Executable:
        """PostgreSQL's completion statement (:data:`COMPLETE_CLAUSES`)."""
        return COMPLETE

    async def fail(self, job_id: str, worker: str, failure: Failure) -> Job | None:
        now = self._clock()
        async with self._write() as conn:
            row = await self._lock(conn, job_id, worker=worker)
            if row is None:
                return None
            job = row_to_job(row)
            entry = {**failure.error, "attempt": job.attempts, "at": now}
            errors = (*job.errors, entry)
            retry = failure.retry_at is not None and not failure.dead
            if retry and job.attempts < job.max_attempts:
                after = dataclasses.replace(
                    job,
                    status=JobStatus.QUEUED,
                    run_after=float(failure.retry_at or now),
                    error=entry,
                    errors=errors,
                )
                detail: dict[str, Any] = {"retry_at": after.run_after}
            else:
                # Out of attempts: dead even if the caller asked for a retry.
                dead = failure.dead or retry
                status = JobStatus.DEAD if dead else JobStatus.FAILED
                after = dataclasses.replace(
                    job, status=status, finished_at=now, error=entry, errors=errors
                )
                detail = {}
            detail |= {"attempt": job.attempts, "code": entry.get("code")}
            await self._save(conn, row, after, now, detail)
        return after

    async def release(self, worker: str, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        now = self._clock()
        c = jobs.c
        async with self._write() as conn:
            released = await conn.execute(
                update(jobs)
                .where(
                    c.id.in_(sorted(set(job_ids))), c.status == _RUNNING, c.lease_owner == worker
                )
                .values(
                    status=_QUEUED,
                    attempts=c.attempts - 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    event_seq=c.event_seq + 1,
                )
                .returning(*jobs.c)
            )
            detail = {"reason": "released", "worker": worker}
            await self._record(conn, [(row, detail) for row in released], now)

    async def recover(self) -> int:
        now = self._clock()
        c = jobs.c
        async with self._write() as conn:
            lost = (
                await conn.execute(
                    select(jobs)
                    .where(in_state(JobStatus.RUNNING), c.lease_expires_at < now)
                    .order_by(c.id)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for row in lost:
                job = row_to_job(row)
                entry = {**_worker_lost(row.lease_owner), "attempt": job.attempts, "at": now}
                errors = (*job.errors, entry)
                if job.attempts < job.max_attempts:
                    after = dataclasses.replace(
                        job, status=JobStatus.QUEUED, error=entry, errors=errors
                    )
                else:
                    after = dataclasses.replace(
                        job, status=JobStatus.DEAD, finished_at=now, error=entry, errors=errors
                    )
                detail = {"reason": "lease_expired", "worker": row.lease_owner}
                await self._save(conn, row, after, now, detail)
        return len(lost)

    # -- the client side ----------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        async with self._engine.connect() as conn:
            return await self._get(conn, job_id)

    async def _get(self, conn: AsyncConnection, job_id: str) -> Job | None:
        row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
        return None if row is None else row_to_job(row)

    async def list_jobs(
        self,
        *,
        team_id: str | None,
        key_id: str | None = None,
        status: JobStatus | None = None,
        batch_id: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> list[Job]:
        """Newest first. ``team_id=None`` lists the jobs of keys without a team (narrowed to
        ``key_id`` when given); ``after`` is the last id of the previous page (an unknown id
        gives an empty page)."""
        c = jobs.c
        filters: list[ColumnElement[bool]] = [
            c.team_id.is_(None) if team_id is None else c.team_id == team_id
        ]
        if key_id is not None:
            filters.append(c.key_id == key_id)
        if status is not None:
            filters.append(c.status == status.value)
        if batch_id is not None:
            filters.append(c.batch_id == batch_id)
        async with self._engine.connect() as conn:
            if after is not None:
                cursor = (
                    await conn.execute(select(c.created_at).where(c.id == after, *filters))
                ).first()
                if cursor is None:
                    return []
                filters.append(
                    or_(
                        c.created_at < cursor.created_at,
                        (c.created_at == cursor.created_at) & (c.id < after),
                    )
                )
            result = await conn.execute(
                select(jobs)
                .where(*filters)
                .order_by(c.created_at.desc(), c.id.desc())
                .limit(max(limit, 0))
            )
            return [row_to_job(row) for row in result]

    async def cancel(self, job_id: str) -> Job | None:
        now = self._clock()
        async with self._write() as conn:
            row = await self._lock(conn, job_id)
            if row is None:
                return None
            job = row_to_job(row)
            if job.status.final:
                return job
            after = dataclasses.replace(job, status=JobStatus.CANCELLED, finished_at=now)
            await self._save(conn, row, after, now, {"from": job.status.value})
        return after

    async def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        e = job_events.c
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(job_events).where(e.job_id == job_id, e.seq > after_seq).order_by(e.seq)
            )
            return [
                JobEvent(
                    job_id=row.job_id,
                    seq=row.seq,
                    status=JobStatus(row.status),
                    at=row.at,
                    detail=orjson.loads(row.detail),
                )
                for row in result
            ]

    async def event_seqs(self, job_ids: Sequence[str]) -> dict[str, int]:
        if not job_ids:
            return {}
        c = jobs.c
        async with self._engine.connect() as conn:
            result = await conn.execute(select(c.id, c.event_seq).where(c.id.in_(list(job_ids))))
            return {row.id: row.event_seq for row in result}

    # -- operations ---------------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[Job]:
        """Dead jobs, most recently dead first."""
        c = jobs.c
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(jobs)
                .where(in_state(JobStatus.DEAD))
                .order_by(c.finished_at.desc(), c.id)
                .limit(limit)
            )
            return [row_to_job(row) for row in result]

    async def replay(self, job_id: str) -> Job | None:
        """A dead or failed job queued again now, with no deadline (an operator asking for a
        replay wants it run), attempts from zero and a new fairness tag; ``errors`` and the
        events are kept. Jobs in any other state are returned unchanged."""
        now = self._clock()
        async with self._write() as conn:
            row = await self._lock(conn, job_id)
            if row is None:
                return None
            job = row_to_job(row)
            if job.status not in (JobStatus.DEAD, JobStatus.FAILED):
                return job
            after = dataclasses.replace(
                job,
                status=JobStatus.QUEUED,
                attempts=0,
                run_after=now,
                deadline_at=None,
                started_at=None,
                finished_at=None,
                result=None,
                error=None,
            )
            (tag,) = await self._next_tags(conn, [after], now)
            detail = {"reason": "replayed", "from": job.status.value}
            await self._save(conn, row, after, now, detail, fair_seq=tag)
        return after

    async def discard(self, job_id: str) -> bool:
        """Delete a dead job for good, with its events, its idempotency key (free again) and
        its webhook outbox and delivery history (an undelivered ``job.dead`` is dropped)."""
        async with self._write() as conn:
            row = await self._lock(conn, job_id)
            if row is None or row.status != JobStatus.DEAD.value:
                return False
            outbox = select(webhook_outbox.c.event_id).where(webhook_outbox.c.job_id == job_id)
            await conn.execute(
                delete(webhook_deliveries).where(webhook_deliveries.c.event_id.in_(outbox))
            )
            await conn.execute(delete(webhook_outbox).where(webhook_outbox.c.job_id == job_id))
            await conn.execute(delete(job_events).where(job_events.c.job_id == job_id))
            await conn.execute(delete(job_idempotency).where(job_idempotency.c.job_id == job_id))
            await conn.execute(delete(jobs).where(jobs.c.id == job_id))
        return True

    async def purge(self, finished_before: float, limit: int) -> int:
        c = jobs.c
        async with self._write() as conn:
            picked = (
                select(c.id)
                .where(
                    c.status.in_(_PURGED),
                    c.finished_at < finished_before,
                    c.batch_id.is_(None),
                )
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            ids = list((await conn.execute(picked)).scalars())
            if not ids:
                return 0
            outbox = select(webhook_outbox.c.event_id).where(webhook_outbox.c.job_id.in_(ids))
            await conn.execute(
                delete(webhook_deliveries).where(webhook_deliveries.c.event_id.in_(outbox))
            )
            await conn.execute(delete(webhook_outbox).where(webhook_outbox.c.job_id.in_(ids)))
            await conn.execute(delete(job_events).where(job_events.c.job_id.in_(ids)))
            await conn.execute(delete(job_idempotency).where(job_idempotency.c.job_id.in_(ids)))
            await conn.execute(delete(jobs).where(c.id.in_(ids)))
        return len(ids)

    async def depth(self) -> list[QueueDepth]:
        """Every priority, most important first (zeros when empty). ``queued`` counts every
        queued job, including retries waiting for their ``run_after``; the age is the oldest
        one's time since submission."""
        c = jobs.c
        now = self._clock()
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(c.priority_rank, func.count(), func.min(c.created_at))
                .where(in_state(JobStatus.QUEUED))
                .group_by(c.priority_rank)
            )
            found = {rank: (count, oldest) for rank, count, oldest in result}
        out = []
        for priority in sorted(Priority, key=lambda p: -p.rank):
            count, oldest = found.get(priority.rank, (0, None))
            age = 0.0 if oldest is None else max(0.0, now - oldest)
            out.append(QueueDepth(priority=priority, queued=int(count), oldest_age_s=age))
        return out

    # -- the webhook outbox -------------------------------------------------------------------

    async def due_webhooks(self, limit: int) -> list[OutboxItem]:
        """Due items, oldest first, each leased for :data:`WEBHOOK_LEASE_S`: until the lease
        ends or :meth:`record_delivery` closes the attempt, no other caller gets the item."""
        if limit <= 0:
            return []
        now = self._clock()
        o = webhook_outbox.c
        async with self._write() as conn:
            due = (
                select(o.event_id)
                .where(
                    o.done == false(),
                    o.next_attempt_at <= now,
                    or_(o.leased_until.is_(None), o.leased_until <= now),
                )
                .order_by(o.created_at, o.event_id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            result = await conn.execute(
                update(webhook_outbox)
                .where(self._among(o.event_id, due))
                .values(leased_until=now + WEBHOOK_LEASE_S)
                .returning(*webhook_outbox.c)
            )
            leased = sorted(result, key=lambda r: (r.created_at, r.event_id))
            traceparents: dict[str, str] = {}
            if leased:  # where each job was submitted, for its deliveries' spans to link to
                traced = await conn.execute(
                    select(jobs.c.id, jobs.c.traceparent).where(
                        jobs.c.id.in_({row.job_id for row in leased}),
                        jobs.c.traceparent.is_not(None),
                    )
                )
                traceparents = {row.id: row.traceparent for row in traced}
        return [
            OutboxItem(
                event_id=row.event_id,
                job_id=row.job_id,
                url=row.url,
                event_type=row.event_type,
                payload=orjson.loads(row.payload),
                created_at=row.created_at,
                attempts=row.attempts,
                traceparent=traceparents.get(row.job_id),
            )
            for row in leased
        ]

    async def record_delivery(self, record: DeliveryRecord, next_attempt_at: float | None) -> None:
        """Append ``record`` (recording one attempt twice keeps the first) and end the lease:
        due again at ``next_attempt_at``, or done for good when it is None."""
        o = webhook_outbox.c
        row = {
            "event_id": record.event_id,
            "attempt": int(record.attempt),
            "at": float(record.at),
            "status_code": record.status_code,
            "outcome": record.outcome,
            "error": record.error,
        }
        add = self._insert(webhook_deliveries).values(row).on_conflict_do_nothing()
        attempts = case((o.attempts < record.attempt, record.attempt), else_=o.attempts)
        if next_attempt_at is None:
            close = update(webhook_outbox).values(attempts=attempts, leased_until=None, done=true())
        else:
            close = update(webhook_outbox).values(
                attempts=attempts, leased_until=None, next_attempt_at=float(next_attempt_at)
            )
        async with self._write() as conn:
            await conn.execute(add)
            await conn.execute(close.where(o.event_id == record.event_id))

    async def deliveries(self, job_id: str) -> list[DeliveryRecord]:
        """Every delivery attempt of the job's webhook events, in the order they were made."""
        d = webhook_deliveries.c
        query = (
            select(webhook_deliveries)
            .join(webhook_outbox, webhook_outbox.c.event_id == d.event_id)
            .where(webhook_outbox.c.job_id == job_id)
            .order_by(d.at, d.event_id, d.attempt)
        )
        async with self._engine.connect() as conn:
            return [
                DeliveryRecord(
                    event_id=row.event_id,
                    attempt=row.attempt,
                    at=row.at,
                    status_code=row.status_code,
                    outcome=row.outcome,
                    error=row.error,
                )
                for row in await conn.execute(query)
            ]

    # -- one job's transition -----------------------------------------------------------------

    async def _lock(
        self, conn: AsyncConnection, job_id: str, *, worker: str | None = None
    ) -> Row[Any] | None:
        """The job's row, locked until the transaction ends; with ``worker``, only while it
        holds the job's lease."""
        query = select(jobs).where(jobs.c.id == job_id)
        if worker is not None:
            query = query.where(jobs.c.status == _RUNNING, jobs.c.lease_owner == worker)
        return (await conn.execute(query.with_for_update())).first()

    async def _save(
        self,
        conn: AsyncConnection,
        before: Row[Any],
        after: Job,
        now: float,
        detail: Mapping[str, Any],
        *,
        fair_seq: int | None = None,
    ) -> None:
        """Write ``after`` over the locked row ``before`` (ending any lease) and record it."""
        seq = before.event_seq + 1
        values = {
            "status": after.status.value,
            "attempts": after.attempts,
            "run_after": after.run_after,
            "deadline_at": after.deadline_at,
            "started_at": after.started_at,
            "finished_at": after.finished_at,
            "result": dumps_or_none(after.result),
            "error": dumps_or_none(after.error),
            "errors": dumps(list(after.errors)),
            "lease_owner": None,
            "lease_expires_at": None,
            "event_seq": seq,
        }
        if fair_seq is not None:
            values["fair_seq"] = fair_seq
        await conn.execute(update(jobs).where(jobs.c.id == after.id).values(values))
        await self._append(conn, [(after, seq, detail)], now)

    async def _record(
        self,
        conn: AsyncConnection,
        changes: Sequence[tuple[Row[Any], Mapping[str, Any]]],
        now: float,
    ) -> None:
        """Record changes already written (rows returned by the UPDATE that made them)."""
        await self._append(
            conn, [(row_to_job(row), row.event_seq, detail) for row, detail in changes], now
        )

    async def _append(
        self,
        conn: AsyncConnection,
        changes: Sequence[tuple[Job, int, Mapping[str, Any]]],
        now: float,
    ) -> None:
        """Append each change's event and, for final states with a webhook, its outbox row."""
        if not changes:
            return
        events = [event_row(job, seq, now, detail) for job, seq, detail in changes]
        if len(events) == 1:
            await conn.execute(insert(job_events).values(events[0]))
        else:
            await self._insert_many(conn, job_events, events)
        outbox = [
            outbox_row(job, job.webhook_url, now)
            for job, _, _ in changes
            if job.status.final and job.webhook_url is not None
        ]
        if outbox:
            await conn.execute(insert(webhook_outbox), outbox)


def _forget_statement(
    running: set[asyncio.Future[list[Row[Any]]]],
) -> Callable[[asyncio.Future[list[Row[Any]]]], None]:
    """A done callback for :meth:`SqlJobQueue._alone`'s tasks: drop the reference, and mark
    the error of one whose caller went away as seen (the statement did not happen)."""

    def forget(task: asyncio.Future[list[Row[Any]]]) -> None:
        running.discard(task)
        if not task.cancelled():
            task.exception()

    return forget


# An expired job's error; OpenAI-shaped, plus its HTTP-like status.
_EXPIRED: dict[str, Any] = {
    "message": (
        "the job was not started before its deadline_at: submit it again with a later "
        "deadline, or add worker capacity"
    ),
    "type": "timeout_error",
    "param": None,
    "code": "expired",
    "status": 504,
}


def _worker_lost(worker: str | None) -> dict[str, Any]:
    return {
        "message": (
            f"worker {worker!r} stopped renewing its lease on this attempt (it crashed, was "
            "killed, or lost the database); the attempt counts as failed"
        ),
        "type": "api_error",
        "param": None,
        "code": "worker_lost",
        "status": 500,
    }
