"""The statements of :class:`~headrace.queue.sql.SqlJobQueue` that are built once, not per call.

- :func:`in_state`: the status test that lets the planner use the schema's partial indexes.
- :func:`tags_query`: the fairness tags of a submission, one round trip.
- :func:`json_insert`: PostgreSQL's many-row insert from one JSON array.
- :func:`take_sqlite`: SQLite's claim.
- :data:`CLAIM` and :data:`COMPLETE`: PostgreSQL's claim and batch completion, each one
  statement that is its own transaction. Their clauses :data:`CLAIM_EVENTS` and
  :data:`COMPLETE_CLAUSES` are shared with :mod:`headrace.queue.procrastinate`, whose claim
  and completion also keep procrastinate's queue.

What each statement does, and why it is shaped so, is in :mod:`headrace.queue.sql`'s
docstring (transactions, ordering and fairness, deadlines).
"""

from __future__ import annotations

import functools

from sqlalchemy import (
    ColumnElement,
    Executable,
    Float,
    Integer,
    Table,
    Text,
    bindparam,
    cast,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql

from headrace.domain import JobStatus
from headrace.store.schema import jobs

__all__ = [
    "CLAIM",
    "CLAIM_EVENTS",
    "COMPLETE",
    "COMPLETE_CLAUSES",
    "in_state",
    "json_insert",
    "tags_query",
    "take_sqlite",
]


@functools.lru_cache(maxsize=256)
def tags_query(ranks: int, lanes: int) -> Executable:
    """The fairness tags' one round trip for ``ranks`` priorities and ``lanes`` (tenant,
    priority) pairs: the smallest tag per priority and the largest per lane, each a scalar
    subquery that reads one end of an index range (ORDER BY ... LIMIT 1 rather than MIN/MAX:
    an index read whatever the statistics say). Built once per shape."""
    c = jobs.c
    queued = in_state(JobStatus.QUEUED)
    now = bindparam("now", type_=Float())
    heads = [
        select(c.fair_seq)
        .where(queued, c.priority_rank == bindparam(f"rank_{i}"), c.run_after <= now)
        .order_by(c.fair_seq)
        .limit(1)
        .scalar_subquery()
        for i in range(ranks)
    ]
    lasts = [
        select(c.fair_seq)
        .where(
            c.tenant == bindparam(f"tenant_{i}"),
            queued,
            c.priority_rank == bindparam(f"lane_rank_{i}"),
        )
        .order_by(c.fair_seq.desc())
        .limit(1)
        .scalar_subquery()
        for i in range(lanes)
    ]
    return select(*heads, *lasts)


@functools.cache
def json_insert(table: Table, names: tuple[str, ...]) -> Executable:
    """PostgreSQL: ``INSERT INTO table (names) SELECT names FROM
    json_populate_recordset(NULL::table, :rows)``, ``:rows`` one JSON array of row objects
    (built once per table and columns)."""
    rows = cast(bindparam("rows", type_=Text()), postgresql.JSON())
    source = func.json_populate_recordset(
        literal_column(f"CAST(NULL AS {table.name})"), rows
    ).table_valued(*names)
    return postgresql.insert(table).from_select(
        list(names), select(*(source.c[name] for name in names))
    )


@functools.cache
def take_sqlite() -> Executable:
    """SQLite's claim: the runnable jobs in queue order, leased (one writer at a time: no
    row locks)."""
    c = jobs.c
    now_ = bindparam("now", type_=Float())
    runnable = (
        select(c.id)
        .where(
            in_state(JobStatus.QUEUED),
            c.run_after <= now_,
            or_(c.deadline_at.is_(None), c.deadline_at > now_),
        )
        .order_by(c.priority_rank.desc(), c.fair_seq, c.created_at)
        .limit(bindparam("limit", type_=Integer()))
    )
    return (
        update(jobs)
        .where(c.id.in_(runnable))
        .values(
            status=JobStatus.RUNNING.value,
            attempts=c.attempts + 1,
            started_at=now_,
            lease_owner=bindparam("worker", type_=Text()),
            lease_expires_at=bindparam("expires", type_=Float()),
            event_seq=c.event_seq + 1,
        )
        .returning(*jobs.c)
    )


# PostgreSQL: the claim events of the rows a claim's ``taken`` clause returns, written as
# orjson writes the detail elsewhere (a data-modifying WITH clause: it runs even unread).
CLAIM_EVENTS = (
    "claimed AS ("
    " INSERT INTO job_events (job_id, seq, status, at, detail)"
    " SELECT id, event_seq, 'running', :now,"
    " '{\"worker\":' || to_json(CAST(:worker AS text)) || ',\"attempt\":' || attempts || '}'"
    " FROM taken)"
)

# PostgreSQL's claim, one statement, its own transaction: lease the runnable jobs in queue
# order (the array form, see SqlJobQueue._among) and append their events.
CLAIM = text(
    "WITH taken AS ("  # noqa: S608 - built from constants
    " UPDATE jobs SET status = 'running', attempts = jobs.attempts + 1, started_at = :now,"
    " lease_owner = :worker, lease_expires_at = :expires, event_seq = jobs.event_seq + 1"
    " WHERE jobs.id = ANY(ARRAY("
    "  SELECT id FROM jobs WHERE status = 'queued' AND run_after <= :now"
    "  AND (deadline_at IS NULL OR deadline_at > :now)"
    "  ORDER BY priority_rank DESC, fair_seq, created_at LIMIT :limit FOR UPDATE SKIP LOCKED))"
    " RETURNING jobs.*), " + CLAIM_EVENTS + " SELECT * FROM taken"
)

# PostgreSQL's completion of many jobs, the WITH clauses of one statement that is its own
# transaction: lock the rows still leased to the worker in id order (as heartbeat locks them:
# two transactions that take the same rows in the same order cannot deadlock; the join of
# the UPDATE locks in whatever order its plan reads), set them succeeded from one JSON array
# of {id, result, cost}, append their events and insert the outbox rows (built from the
# claimed jobs) of those updated. ``finished`` holds the ids done; a backend may add clauses.
# The result arrives as ``json``, whose text is kept as sent: stored as is, not encoded twice.
COMPLETE_CLAUSES = (
    "WITH done AS MATERIALIZED ("
    " SELECT * FROM json_to_recordset(CAST(:done AS json)) AS d(id text, result json, cost bigint)"
    "), locked AS MATERIALIZED ("
    " SELECT id FROM jobs WHERE id = ANY(ARRAY(SELECT id FROM done))"
    " AND status = 'running' AND lease_owner = :worker ORDER BY id FOR UPDATE"
    "), finished AS ("
    " UPDATE jobs SET status = 'succeeded', result = CAST(done.result AS text), error = NULL,"
    " cost_micro_usd = done.cost, finished_at = :now, lease_owner = NULL,"
    " lease_expires_at = NULL, event_seq = jobs.event_seq + 1"
    " FROM done WHERE jobs.id = done.id AND jobs.id = ANY(ARRAY(SELECT id FROM locked))"
    " RETURNING jobs.id, jobs.event_seq, jobs.attempts"
    "), events AS ("
    " INSERT INTO job_events (job_id, seq, status, at, detail)"
    " SELECT id, event_seq, 'succeeded', :now, '{\"attempt\":' || attempts || '}' FROM finished"
    "), outbox AS ("
    " INSERT INTO webhook_outbox"
    " SELECT item.* FROM json_populate_recordset(NULL::webhook_outbox, CAST(:outbox AS json))"
    " AS item WHERE item.job_id = ANY(ARRAY(SELECT id FROM finished)))"
)
COMPLETE = text(COMPLETE_CLAUSES + " SELECT id FROM finished")  # noqa: S608 - constants


def in_state(status: JobStatus) -> ColumnElement[bool]:
    """``jobs.status = '<status>'``, the value inline rather than a bound parameter: only then
    can the planner use the partial indexes (``WHERE status = 'queued'``, ...) of the schema."""
    return jobs.c.status == literal_column(f"'{status.value}'")
