"""JobService: what a client may do with jobs — submit, look, list, cancel, follow.

A job is a chat-completions or embeddings request body that a worker runs later through the
same :class:`~headrace.gateway.service.GatewayService` as a synchronous request. Submission
checks what can be checked at once (the body's shape, through the ``validate`` callable the
edge passes in; the webhook URL against SSRF) so that a job accepted with 202 fails later only
for reasons that arise later.

Scope: a key sees the jobs of its team (or its own, for a key without a team); another
team's job is "not found", never "forbidden", so ids cannot be probed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from headrace.domain import Job, JobEvent, JobKind, JobStatus, Principal, Priority
from headrace.errors import (
    ConflictError,
    HeadraceError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
)
from headrace.events.ssrf import validate_webhook_url
from headrace.jobs.watch import POLL_INTERVAL_S, JobWatch
from headrace.observability.tracing import current_traceparent
from headrace.queue.base import Failure, Idempotency, IdempotencyConflictError, JobQueue, Lease
from headrace.queue.grouping import GroupCommit

Validate = Callable[[JobKind, Mapping[str, Any]], None]
INLINE_LEASE_S = 600.0  # an idempotent request holds its job this long; then workers may take it
IDEMPOTENT_RECHECK_S = 15.0  # a repeat of an in-flight request reads it again at least this often
SUBMIT_BATCH = 500  # submissions written in one transaction, at most


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What the client may say about a job besides its request body."""

    priority: Priority = Priority.NORMAL
    webhook_url: str | None = None
    deadline_at: float | None = None  # unix time
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobPolicy:
    max_attempts: int = 5
    idempotency_ttl_s: float = 86_400.0
    allow_private_webhooks: bool = False
    allow_webhook_hosts: frozenset[str] = frozenset()


def body_hash(kind: JobKind, body: Mapping[str, Any], options: JobOptions | None = None) -> str:
    """SHA-256 of the canonical JSON of what was submitted (key order does not matter)."""
    canonical: dict[str, Any] = {"kind": kind.value, "body": body}
    if options is not None:
        canonical["options"] = {
            "priority": options.priority.value,
            "webhook_url": options.webhook_url,
            "deadline_at": options.deadline_at,
            "metadata": dict(options.metadata),
        }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def scope_of(principal: Principal) -> str:
    """The tenant a key acts for: its team, or the key itself."""
    return f"team:{principal.team_id}" if principal.team_id else f"key:{principal.key_id}"


class JobService:
    def __init__(
        self,
        queue: JobQueue,
        validate: Validate,
        policy: JobPolicy | None = None,
        *,
        events_poll_s: float = POLL_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._queue = queue
        self._validate = validate
        self._policy = policy or JobPolicy()
        self._clock = clock
        self._pending: set[asyncio.Future[None]] = set()
        # Plain submissions (no Idempotency-Key) arriving together share one transaction.
        self._submissions = GroupCommit(self._submit_many, max_batch=SUBMIT_BATCH)
        self._watch = JobWatch(queue, interval_s=events_poll_s)

    @property
    def queue(self) -> JobQueue:
        return self._queue

    def new_job(
        self,
        principal: Principal,
        kind: JobKind,
        body: Mapping[str, Any],
        options: JobOptions,
        *,
        batch_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """A checked job, not yet submitted (raises 400 for a bad body or webhook URL)."""
        self._validate(kind, body)
        if body.get("stream"):
            raise InvalidRequestError(
                "A job cannot stream; drop 'stream' and read the result from the job "
                "(or follow GET /v1/jobs/{id}/events).",
                param="body.stream",
            )
        webhook = options.webhook_url
        if webhook is not None:
            webhook = validate_webhook_url(
                webhook,
                allow_private=self._policy.allow_private_webhooks,
                allow_hosts=self._policy.allow_webhook_hosts,
            )
        now = self._clock()
        if options.deadline_at is not None and options.deadline_at <= now:
            raise InvalidRequestError("The deadline is already past.", param="deadline")
        return Job(
            id=f"job_{uuid.uuid4().hex}",
            kind=kind,
            body=dict(body),
            key_id=principal.key_id,
            team_id=principal.team_id,
            priority=options.priority,
            max_attempts=self._policy.max_attempts,
            created_at=now,
            run_after=now,
            deadline_at=options.deadline_at,
            metadata=dict(options.metadata),
            webhook_url=webhook,
            batch_id=batch_id,
            idempotency_key=idempotency_key,
            traceparent=current_traceparent(),
        )

    async def submit(
        self,
        principal: Principal,
        kind: JobKind,
        body: Mapping[str, Any],
        options: JobOptions,
        idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """Store and enqueue a job; ``(job, created)``. A repeated ``Idempotency-Key`` with the
        same submission returns the first job (``created`` False); with a different one, 409."""
        job = self.new_job(principal, kind, body, options, idempotency_key=idempotency_key)
        claim = None
        if idempotency_key is not None:
            claim = Idempotency(
                scope=scope_of(principal),
                key=idempotency_key,
                body_hash=body_hash(kind, body, options),
                expires_at=job.created_at + self._policy.idempotency_ttl_s,
            )
        if claim is None:
            return await self._submissions.add(job), True
        try:
            return await self._queue.submit(job, claim)
        except IdempotencyConflictError as exc:
            raise ConflictError(
                f"The Idempotency-Key {idempotency_key!r} was used for a different request "
                f"(job {exc.existing.id}); use a new key for a new request.",
                code="idempotency_key_reused",
            ) from None

    async def _submit_many(self, jobs: list[Job]) -> list[Job]:
        await self._queue.submit_many(jobs)
        return jobs

    async def once(
        self,
        principal: Principal,
        kind: JobKind,
        body: Mapping[str, Any],
        idempotency_key: str,
        run: Callable[[], Awaitable[tuple[Mapping[str, Any], int]]],
    ) -> tuple[Mapping[str, Any], bool]:
        """Run a synchronous request at most once per ``Idempotency-Key``: ``(body, replayed)``.

        The first request becomes a job that this process runs inline (leased to it, so no
        worker takes it); a repeat waits for that job and returns its stored answer (or its
        error) without calling the upstream again, so it is not billed twice. If the first
        request's client goes away, the job is handed to the workers, and a retry with the same
        key gets the answer when they finish it.
        """
        job = self.new_job(
            principal,
            kind,
            body,
            JobOptions(metadata={"source": f"/v1/{kind.value}"}),
            idempotency_key=idempotency_key,
        )
        claim = Idempotency(
            scope=scope_of(principal),
            key=idempotency_key,
            body_hash=body_hash(kind, body),
            expires_at=job.created_at + self._policy.idempotency_ttl_s,
        )
        worker = f"inline-{uuid.uuid4().hex[:12]}"
        try:
            job, created = await self._queue.submit(job, claim, lease=Lease(worker, INLINE_LEASE_S))
        except IdempotencyConflictError as exc:
            raise ConflictError(
                f"The Idempotency-Key {idempotency_key!r} was used for a different request "
                f"(job {exc.existing.id}); use a new key for a new request.",
                code="idempotency_key_reused",
            ) from None
        if not created:
            return await self._stored_answer(job.id), True
        try:
            result, cost = await run()
        except HeadraceError as exc:
            failure = Failure({**exc.to_openai()["error"], "status": exc.status}, retry_at=None)
            await self._queue.fail(job.id, worker, failure)
            self.nudge([job.id])
            raise
        except BaseException:
            # The client went away mid-call: let a worker finish the job for its retry.
            release = asyncio.ensure_future(self._queue.release(worker, [job.id]))
            self._pending.add(release)
            release.add_done_callback(self._pending.discard)
            raise
        await self._queue.complete(job, worker, result, cost)
        self.nudge([job.id])
        return result, False

    async def _stored_answer(self, job_id: str) -> Mapping[str, Any]:
        """The first request's answer (or its error), once it has one: a repeat waits on the
        watch, as event streams do, not on a poll of its own."""
        deadline = self._clock() + INLINE_LEASE_S
        while True:
            # The seq before the job: a change between the two reads wakes the wait at once.
            seq = (await self._queue.event_seqs([job_id])).get(job_id, 0)
            job = await self._queue.get(job_id)
            if job is None:
                raise NotFoundError("The request with this Idempotency-Key was discarded.")
            if job.status is JobStatus.SUCCEEDED and job.result is not None:
                return job.result
            if job.status.final:
                raise _stored_error(job)
            left = deadline - self._clock()
            if left <= 0:
                raise OverloadedError(
                    "The first request with this Idempotency-Key is still running; retry later.",
                    headers={"Retry-After": "5"},
                )
            await self._watch.changed(job_id, seq, min(left, IDEMPOTENT_RECHECK_S))

    async def get(self, principal: Principal, job_id: str) -> Job:
        job = await self._queue.get(job_id)
        if job is None or not _visible(principal, job):
            raise NotFoundError(f"No job {job_id!r} for this API key's team.", param="job_id")
        return job

    async def list_jobs(
        self,
        principal: Principal,
        *,
        status: JobStatus | None = None,
        batch_id: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> list[Job]:
        return await self._queue.list_jobs(
            team_id=principal.team_id,
            key_id=None if principal.team_id else principal.key_id,
            status=status,
            batch_id=batch_id,
            after=after,
            limit=limit,
        )

    async def cancel(self, principal: Principal, job_id: str) -> Job:
        await self.get(principal, job_id)
        job = await self._queue.cancel(job_id)
        if job is None:
            raise NotFoundError(f"No job {job_id!r} for this API key's team.", param="job_id")
        self.nudge([job_id])
        return job

    async def events(self, principal: Principal, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        await self.get(principal, job_id)
        return await self._queue.events(job_id, after_seq)

    def nudge(self, job_ids: Iterable[str]) -> None:
        """These jobs just changed in this process (their transaction committed): whoever
        follows them hears it now, not at the watch's next turn."""
        self._watch.nudge(job_ids)

    async def next_event(self, job_id: str, after_seq: int, timeout_s: float) -> bool:
        """Wait until the job has an event after ``after_seq`` (or is gone): True; False
        after ``timeout_s``. Whoever follows a job waits here, not on a poll of its own."""
        return await self._watch.changed(job_id, after_seq, timeout_s)


class _StoredError(HeadraceError):
    """The error the first request with an Idempotency-Key got, returned again."""


def _stored_error(job: Job) -> HeadraceError:
    error = dict(job.error or {})
    stored = _StoredError(
        str(error.get("message") or f"The first request ended {job.status.value}."),
        param=error.get("param"),
        code=error.get("code"),
    )
    stored.status = int(error.get("status") or 500)  # type: ignore[misc]
    stored.type = str(error.get("type") or "api_error")  # type: ignore[misc]
    return stored


def _visible(principal: Principal, job: Job) -> bool:
    if principal.team_id is not None:
        return job.team_id == principal.team_id
    return job.team_id is None and job.key_id == principal.key_id
