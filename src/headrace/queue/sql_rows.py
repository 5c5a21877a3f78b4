"""How a job maps to the job tables' rows and back: shared by the SQL queue backends.

:func:`job_to_row` gives one Python type per column (psycopg sends a list as an array of
one type); the webhook payload is :func:`headrace.queue.base.job_view`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy import Row

from headrace.domain import Job, JobKind, JobStatus, Priority
from headrace.queue.base import job_view

__all__ = [
    "dumps",
    "dumps_or_none",
    "event_row",
    "job_to_row",
    "loads_or_none",
    "outbox_row",
    "row_to_job",
    "tenant_of",
]


def tenant_of(job: Job) -> str:
    """The fairness group: the job's team, or its key when the key has no team."""
    return job.team_id or job.key_id


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def dumps_or_none(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else dumps(dict(value))


def loads_or_none(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


def job_to_row(job: Job, fair_seq: int) -> dict[str, Any]:
    # One Python type per column: psycopg sends a list as an array of one type.
    return {
        "id": job.id,
        "kind": job.kind.value,
        "body": dumps(dict(job.body)),
        "key_id": job.key_id,
        "team_id": job.team_id,
        "tenant": tenant_of(job),
        "priority": job.priority.value,
        "priority_rank": job.priority.rank,
        "fair_seq": fair_seq,
        "status": job.status.value,
        "attempts": int(job.attempts),
        "max_attempts": int(job.max_attempts),
        "created_at": float(job.created_at),
        "run_after": float(job.run_after),
        "deadline_at": None if job.deadline_at is None else float(job.deadline_at),
        "started_at": None if job.started_at is None else float(job.started_at),
        "finished_at": None if job.finished_at is None else float(job.finished_at),
        "result": dumps_or_none(job.result),
        "error": dumps_or_none(job.error),
        "errors": dumps([dict(e) for e in job.errors]),
        "cost_micro_usd": int(job.cost_micro_usd),
        "metadata": dumps(dict(job.metadata)),
        "webhook_url": job.webhook_url,
        "batch_id": job.batch_id,
        "idempotency_key": job.idempotency_key,
        "lease_owner": None,
        "lease_expires_at": None,
        "event_seq": 1,
        "traceparent": job.traceparent,
    }


def row_to_job(row: Row[Any]) -> Job:
    return Job(
        id=row.id,
        kind=JobKind(row.kind),
        body=orjson.loads(row.body),
        key_id=row.key_id,
        team_id=row.team_id,
        priority=Priority(row.priority),
        status=JobStatus(row.status),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        created_at=row.created_at,
        run_after=row.run_after,
        deadline_at=row.deadline_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        result=loads_or_none(row.result),
        error=loads_or_none(row.error),
        errors=tuple(orjson.loads(row.errors)),
        cost_micro_usd=row.cost_micro_usd,
        metadata=orjson.loads(row.metadata),
        webhook_url=row.webhook_url,
        batch_id=row.batch_id,
        idempotency_key=row.idempotency_key,
        traceparent=row.traceparent,
    )


def event_row(job: Job, seq: int, now: float, detail: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "seq": seq,
        "status": job.status.value,
        "at": now,
        "detail": dumps(dict(detail)),
    }


def outbox_row(job: Job, url: str, now: float) -> dict[str, Any]:
    return {
        "event_id": f"evt_{uuid.uuid4().hex}",
        "job_id": job.id,
        "url": url,
        "event_type": f"job.{job.status.value}",
        "payload": dumps(job_view(job)),
        "created_at": now,
        "attempts": 0,
        "next_attempt_at": now,
        "leased_until": None,
        "done": False,
    }
