"""The job-queue seam: durable job state plus dispatch to workers.

Two backends implement :class:`JobQueue`:

* :mod:`headrace.queue.sql` — the embedded default: jobs in a SQL table (SQLite, or
  PostgreSQL) claimed by the gateway's own in-process runner with leases and heartbeats, so
  the jobs of a crashed process are claimed again once their lease expires.
* :mod:`headrace.queue.procrastinate` — production: the same job table on PostgreSQL, with
  dispatch through Procrastinate; the job row and its Procrastinate job are inserted in one
  transaction, and ``headrace worker`` processes consume them.

Every state change is one transaction that also appends a :class:`~headrace.domain.JobEvent`
and, when the job reaches a final state and has a webhook, an outbox row: a job's state, its
history and its notification can never disagree.

Ordering: higher priority first; inside a priority, fair across teams (a team's n-th queued
job goes after every other team's (n-1)-th), then oldest first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from headrace.domain import Job, JobEvent, JobStatus, Priority


class IdempotencyConflictError(Exception):
    """The idempotency key was used before with a different request body."""

    def __init__(self, existing: Job) -> None:
        super().__init__(f"idempotency key reused with a different body (job {existing.id})")
        self.existing = existing


@dataclass(frozen=True, slots=True)
class Idempotency:
    """``key`` scoped to ``scope`` (the team, or the key when it has none)."""

    scope: str
    key: str
    body_hash: str  # SHA-256 of the canonical request body
    expires_at: float  # unix time after which the key may be reused


@dataclass(frozen=True, slots=True)
class Lease:
    """Who holds a running job, and for how long from now."""

    worker: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class Failure:
    """How an attempt failed: OpenAI-shaped ``error`` (with ``status``), and what happens next."""

    error: Mapping[str, Any]
    retry_at: float | None  # unix time of the next attempt; None: no retry (failed or dead)
    dead: bool = False  # out of attempts: dead letter (else ``failed`` when not retried)


@dataclass(frozen=True, slots=True)
class Completion:
    """A job's successful result, as a worker reports it: the job as it was claimed, the
    result and its cost. The queue writes the finished job (and its webhook payload) from
    these, without reading the row back."""

    job: Job
    result: Mapping[str, Any]
    cost_micro_usd: int

    @property
    def job_id(self) -> str:
        return self.job.id

    def finished(self, now: float) -> Job:
        """The job as this completion leaves it, finished at ``now``."""
        return dataclasses.replace(
            self.job,
            status=JobStatus.SUCCEEDED,
            result=self.result,
            error=None,
            cost_micro_usd=int(self.cost_micro_usd),
            finished_at=now,
        )


@dataclass(frozen=True, slots=True)
class QueueDepth:
    priority: Priority
    queued: int
    oldest_age_s: float  # 0 when empty


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A webhook event waiting to be delivered; ``event_id`` is stable across retries."""

    event_id: str
    job_id: str
    url: str
    event_type: str  # "job.succeeded", "job.failed", "job.dead", "job.cancelled"
    payload: Mapping[str, Any]
    created_at: float
    attempts: int
    # The job's: the ``traceparent`` of the request that submitted it, which each delivery's
    # span links to (None: submitted untraced).
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One delivery attempt of an outbox item, kept as the job's delivery history."""

    event_id: str
    attempt: int
    at: float
    status_code: int | None
    outcome: str  # "delivered", "retry", "failed", "gone"
    error: str | None = None


class JobQueue(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def check(self) -> None:
        """Raise if the backend cannot be reached (``/health/ready``)."""
        ...

    # -- submission ---------------------------------------------------------------------------

    async def submit(
        self, job: Job, idempotency: Idempotency | None = None, *, lease: Lease | None = None
    ) -> tuple[Job, bool]:
        """Store and enqueue ``job`` atomically; ``(job, True)`` when new.

        With ``idempotency``: an unexpired record for ``(scope, key)`` with the same
        ``body_hash`` returns the job it made and ``False``; a different hash raises
        :class:`IdempotencyConflictError`. Concurrent submissions of one key create one job.

        With ``lease``: the job starts ``running`` at once, held by ``lease.worker`` (the
        caller runs it itself, as an idempotent synchronous request does); if the caller dies,
        :meth:`recover` queues it for a worker like any other.
        """
        ...

    async def submit_many(self, jobs: Sequence[Job]) -> None:
        """Store and enqueue many jobs in one transaction (a batch's lines)."""
        ...

    # -- the worker side ----------------------------------------------------------------------

    async def claim(self, worker: str, limit: int, lease_s: float) -> list[Job]:
        """Take up to ``limit`` runnable jobs (queued, ``run_after`` passed) in queue order.

        Each becomes ``running`` with ``attempts + 1`` and a lease held by ``worker`` until
        ``now + lease_s``. A queued job whose deadline passed is not returned: it becomes
        ``failed`` with error code ``expired`` (event and outbox as for any failure).
        """
        ...

    async def heartbeat(self, worker: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend the leases ``worker`` still holds; return the ids it no longer holds."""
        ...

    async def complete(
        self, job: Job, worker: str, result: Mapping[str, Any], cost_micro_usd: int
    ) -> Job | None:
        """``running`` → ``succeeded`` if ``worker`` holds the lease; None when it does not
        (the lease expired and another worker took the job: its result wins). ``job`` is the
        job as claimed (or submitted with a lease)."""
        ...

    async def complete_many(
        self, worker: str, completions: Sequence[Completion]
    ) -> list[Job | None]:
        """:meth:`complete` for many jobs in one transaction (a busy worker batches them);
        one answer per completion, in order."""
        ...

    async def fail(self, job_id: str, worker: str, failure: Failure) -> Job | None:
        """Record a failed attempt: back to ``queued`` at ``retry_at``, or ``dead``, or
        ``failed``. None when ``worker`` no longer holds the lease."""
        ...

    async def purge(self, finished_before: float, limit: int) -> int:
        """Delete up to ``limit`` jobs that ended (succeeded, failed or cancelled) before
        ``finished_before`` and belong to no batch, with their events, idempotency keys,
        webhook outbox rows and delivery history; how many. Dead letters stay until replayed
        or discarded."""
        ...

    async def release(self, worker: str, job_ids: Sequence[str]) -> None:
        """Give jobs back unfinished (graceful shutdown): ``queued`` again, attempt refunded."""
        ...

    async def recover(self) -> int:
        """Requeue ``running`` jobs whose lease expired (their worker died); return how many.

        A job that had used its last attempt goes to ``dead`` instead.
        """
        ...

    # -- the client side ----------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None: ...

    async def list_jobs(
        self,
        *,
        team_id: str | None,
        key_id: str | None = None,
        status: JobStatus | None = None,
        batch_id: str | None = None,
        after: str | None = None,  # a job id: page after it (newest first)
        limit: int = 20,
    ) -> list[Job]:
        """Jobs of one team (``team_id=None`` with ``key_id``: a key without a team)."""
        ...

    async def cancel(self, job_id: str) -> Job | None:
        """``queued`` or ``running`` → ``cancelled`` (a running job's worker learns it at its
        next heartbeat, stops, and its result is discarded). Final jobs are returned
        unchanged. None when there is no such job."""
        ...

    async def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]: ...

    async def event_seqs(self, job_ids: Sequence[str]) -> dict[str, int]:
        """The ``seq`` of each job's latest event, for those of ``job_ids`` that exist (one
        query: what :class:`~headrace.jobs.watch.JobWatch` polls for every stream open)."""
        ...

    # -- operations ---------------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[Job]: ...

    async def replay(self, job_id: str) -> Job | None:
        """A dead (or failed) job back to ``queued`` with fresh attempts; its history kept."""
        ...

    async def discard(self, job_id: str) -> bool:
        """Delete a dead job for good."""
        ...

    async def depth(self) -> list[QueueDepth]:
        """Queued jobs and the oldest one's age, per priority (the autoscaling signal)."""
        ...

    # -- the webhook outbox -------------------------------------------------------------------

    async def due_webhooks(self, limit: int) -> list[OutboxItem]:
        """Outbox items whose next attempt is due, oldest first, each leased for a while so
        two delivering processes do not send the same attempt at once."""
        ...

    async def record_delivery(self, record: DeliveryRecord, next_attempt_at: float | None) -> None:
        """Append to the delivery history; reschedule, or close the item (None)."""
        ...

    async def deliveries(self, job_id: str) -> list[DeliveryRecord]: ...


def job_view(job: Job) -> dict[str, Any]:
    """The job as its owner sees it: ``GET /v1/jobs/{id}``, the webhook payload, SSE events.

    ``result`` is set once succeeded; ``error`` is the last failure (None once succeeded) and
    ``errors`` every failed attempt. Times are unix seconds.
    """
    return {
        "id": job.id,
        "object": "job",
        "kind": job.kind.value,
        "status": job.status.value,
        "priority": job.priority.value,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "deadline_at": job.deadline_at,
        "result": None if job.result is None else dict(job.result),
        "error": None if job.error is None else dict(job.error),
        "errors": [dict(e) for e in job.errors],
        "cost_usd": job.cost_micro_usd / 1e6,
        "metadata": dict(job.metadata),
        "webhook_url": job.webhook_url,
        "batch_id": job.batch_id,
    }
