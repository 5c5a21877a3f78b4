"""JobRunner: claims jobs and runs each through the GatewayService, many at once.

One claim loop takes up to ``concurrency - in flight`` jobs at a time; each job is a task on
this event loop, so thousands can wait on upstreams at once. A heartbeat loop extends the
leases of running jobs and stops the ones the queue no longer gives this worker (cancelled by
the client, or lease lost); a recovery loop requeues jobs whose worker died and, every
``PURGE_EVERY_S``, deletes the jobs past their retention. Results are written in batches:
those finishing within ``COMPLETION_BATCH_S`` share one transaction. On stop, the claim in
progress finishes, running jobs get ``grace_s`` to finish; the rest are cancelled and
released, attempt refunded.

Waking up. A runner with nothing to do polls the queue, from ``idle_poll_s / 8`` doubling to
``idle_poll_s``: :data:`IDLE_POLL_S` for ``headrace worker``, whose jobs are submitted
elsewhere; ``serve``'s own runner, which every submission to that process wakes at once
(:meth:`JobRunner.nudge`), waits :data:`NUDGED_IDLE_POLL_S` and so costs an idle gateway
next to nothing (on SQLite each poll is a write transaction through aiosqlite's thread). A
job this runner sends back for a retry wakes it at its retry time, whatever the poll. Each
claim, completion and failure it commits nudges the process's job watch
(:mod:`headrace.jobs.watch`), so the event streams of its jobs hear of them at once.

Failures: a transient error (429, 5xx, timeouts, the gateway overloaded) is retried with
exponential backoff and full jitter, honouring ``Retry-After``; after ``max_attempts`` the job
is dead, with every attempt's error in its history. A permanent error (400, 402, 403, 404)
fails the job at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
import structlog

from headrace.api.wire import chat_request, embedding_body, embedding_request
from headrace.domain import Call, Job, JobKind, Principal, RequestControls
from headrace.errors import HeadraceError
from headrace.events.webhooks import next_retry_delay
from headrace.gateway.service import GatewayService
from headrace.observability.tracing import Tracing
from headrace.queue.base import Completion, Failure, JobQueue

log = structlog.get_logger("headrace")

PrincipalOf = Callable[[str], Awaitable[Principal | None]]
TRANSIENT_STATUSES = frozenset({408, 409, 429, 499, 500, 502, 503, 504})
COMPLETION_BATCH_S = 0.005  # results wait at most this long to share a transaction
CLAIM_GATHER_S = 0.02  # after a claim that found fewer jobs than it asked for
STOP_CLAIM_S = 10.0  # how long stop() lets a claim in progress finish
PURGE_EVERY_S = 600.0  # how often a runner deletes the jobs past their retention
PURGE_BATCH = 1000  # jobs per purge transaction
IDLE_POLL_S = 0.25  # longest wait between claims with nothing to do (headrace worker)
NUDGED_IDLE_POLL_S = 2.0  # the same for serve's runner, which its submissions wake


class JobRunner:
    def __init__(
        self,
        queue: JobQueue,
        gateway: GatewayService,
        principal_of: PrincipalOf,
        *,
        worker_id: str | None = None,
        concurrency: int = 1000,
        claim_batch: int = 200,
        lease_s: float = 60.0,
        heartbeat_s: float = 15.0,
        idle_poll_s: float = IDLE_POLL_S,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_webhook: Callable[[], None] | None = None,
        on_jobs_changed: Callable[[list[str]], None] | None = None,
        retention_s: float | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self._queue = queue
        self._gateway = gateway
        self._principal_of = principal_of
        self._concurrency = concurrency
        self._claim_batch = claim_batch
        self._lease_s = lease_s
        self._heartbeat_s = heartbeat_s
        self._idle_poll_s = idle_poll_s
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._on_webhook = on_webhook  # a job ended with a webhook to send (the outbox's nudge)
        # jobs this runner changed, once committed (the job watch's nudge: their streams)
        self._on_jobs_changed = on_jobs_changed
        self._retention_s = retention_s
        self._tracing = tracing
        self._next_purge_at = 0.0
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self._completions: list[tuple[Completion, asyncio.Future[Job | None]]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self.completed = 0
        self.failed = 0

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def nudge(self) -> None:
        """A job was just submitted in this process: claim now instead of at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._claim_loop(), name="jobs-claim"),
            loop.create_task(self._heartbeat_loop(), name="jobs-heartbeat"),
            loop.create_task(self._recover_loop(), name="jobs-recover"),
        ]

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop claiming; let running jobs finish for ``grace_s``; release the rest."""
        self._stopping = True
        self._wake.set()
        self._slot_freed.set()
        for task in self._loops[1:]:
            task.cancel()
        if self._loops:
            # The claim loop (the first) ends at its next turn: a claim cut off mid-statement
            # would lease jobs that nobody runs until their leases expire.
            await asyncio.wait({self._loops[0]}, timeout=STOP_CLAIM_S)
            self._loops[0].cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=grace_s)
        unfinished = list(self._inflight)
        for job_id in unfinished:
            self._inflight[job_id].cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        if unfinished:
            await self._queue.release(self.worker_id, unfinished)
            log.info("jobs_released", worker=self.worker_id, jobs=len(unfinished))

    # -- loops --------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        idle = self._idle_poll_s / 8
        while not self._stopping:
            free = self._concurrency - len(self._inflight)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                jobs = await self._queue.claim(
                    self.worker_id, min(free, self._claim_batch), self._lease_s
                )
            except Exception as exc:  # the database blinked: keep the loop alive
                log.warning("jobs_claim_failed", error=repr(exc))
                jobs = []
                idle = self._idle_poll_s
            self._changed([job.id for job in jobs])
            for job in jobs:
                task = asyncio.get_running_loop().create_task(self._run(job))
                self._inflight[job.id] = task
                task.add_done_callback(functools.partial(self._done, job.id))
            if jobs:
                idle = self._idle_poll_s / 8
                if len(jobs) < self._claim_batch:
                    # The queue is running dry: let the next jobs gather for a moment rather
                    # than pay a claim transaction for each one or two.
                    await asyncio.sleep(CLAIM_GATHER_S)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), idle)
            idle = min(idle * 2, self._idle_poll_s)

    def _done(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(job_id, None)
        self._slot_freed.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            if not self._inflight:
                continue
            try:
                gone = await self._queue.heartbeat(
                    self.worker_id, list(self._inflight), self._lease_s
                )
            except Exception as exc:
                log.warning("jobs_heartbeat_failed", error=repr(exc))
                continue
            for job_id in gone:  # cancelled by its client, or its lease went to another worker
                task = self._inflight.get(job_id)
                if task is not None:
                    task.cancel()

    async def _recover_loop(self) -> None:
        while True:
            try:
                recovered = await self._queue.recover()
            except Exception as exc:
                log.warning("jobs_recover_failed", error=repr(exc))
            else:
                if recovered:
                    log.info("jobs_recovered", jobs=recovered)
                    self._wake.set()
            await self.purge()
            await asyncio.sleep(self._lease_s / 2)

    async def purge(self) -> int:
        """Delete the jobs past their retention (at most every :data:`PURGE_EVERY_S`, in
        transactions of :data:`PURGE_BATCH`); how many. Every runner does it; they skip each
        other's rows."""
        now = self._clock()
        if self._retention_s is None or now < self._next_purge_at:
            return 0
        self._next_purge_at = now + PURGE_EVERY_S
        purged = 0
        try:
            while True:
                deleted = await self._queue.purge(now - self._retention_s, PURGE_BATCH)
                purged += deleted
                if deleted < PURGE_BATCH:
                    break
        except Exception as exc:
            log.warning("jobs_purge_failed", error=repr(exc))
        if purged:
            log.info("jobs_purged", jobs=purged, retention_s=self._retention_s)
        return purged

    # -- one job ------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        try:
            result, cost = await self._execute(job)
        except asyncio.CancelledError:
            raise
        except HeadraceError as exc:
            await self._fail(job, exc.status, exc.to_openai()["error"], exc.headers)
            return
        except Exception as exc:
            log.exception("job_crashed", job=job.id)
            error = {"message": f"Internal error: {exc!r}", "type": "api_error", "code": None}
            await self._fail(job, 500, error, {})
            return
        try:
            finished = await self._complete(Completion(job, result, cost))
        except Exception as exc:  # the database stayed away: the lease lapses, the job reruns
            log.error("job_result_not_saved", job=job.id, error=repr(exc))
            return
        if finished is not None:
            self.completed += 1
            self._webhook_written(finished)

    async def _complete(self, completion: Completion) -> Job | None:
        """Queue the completion for the next batch (one transaction for many jobs)."""
        done: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._completions.append((completion, done))
        if len(self._completions) >= self._claim_batch:
            self._flush_completions()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(
                COMPLETION_BATCH_S, self._flush_completions
            )
        return await asyncio.shield(done)

    def _flush_completions(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._completions = self._completions, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._write_completions(batch))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write_completions(
        self, batch: list[tuple[Completion, asyncio.Future[Job | None]]]
    ) -> None:
        # A result is never dropped for a database blip: retry the write while the job is
        # still ours (its task waits here, so the heartbeat keeps renewing its lease).
        delay = 0.1
        deadline = time.monotonic() + 10 * self._lease_s
        while True:
            try:
                jobs = await self._queue.complete_many(self.worker_id, [c for c, _ in batch])
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    return
                log.warning("jobs_complete_retry", error=repr(exc), jobs=len(batch))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._heartbeat_s)
        self._changed([job.id for job in jobs if job is not None])
        for (_, done), job in zip(batch, jobs, strict=True):
            if not done.done():
                done.set_result(job)

    async def _execute(self, job: Job) -> tuple[Mapping[str, Any], int]:
        """Run the job's request through the gateway: its answer and cost (traced as a job
        span when tracing is on)."""
        if self._tracing is None:
            return await self._answer(job)
        operation = "chat" if job.kind is JobKind.CHAT else "embeddings"
        span = self._tracing.start_job(
            job.id, operation, job.attempts, job.priority.value, job.traceparent
        )
        with Tracing.running(span):
            return await self._answer(job)

    async def _answer(self, job: Job) -> tuple[Mapping[str, Any], int]:
        principal = await self._principal_of(job.key_id)
        if principal is None:
            raise _KeyGone(job.key_id)
        call = Call(
            request_id=f"{job.id}-{job.attempts}",
            principal=principal,
            controls=RequestControls(priority=job.priority),
        )
        if job.kind is JobKind.CHAT:
            answer = await self._gateway.chat(call, chat_request(dict(job.body)))
            return answer.body, call.cost_micro_usd or 0
        request, encoding = embedding_request(dict(job.body))
        vectors = await self._gateway.embed(call, request)
        body = orjson.loads(
            orjson.dumps(embedding_body(vectors, encoding), option=orjson.OPT_SERIALIZE_NUMPY)
        )
        return body, call.cost_micro_usd or 0

    async def _fail(
        self, job: Job, status: int, error: Mapping[str, Any], headers: Mapping[str, str]
    ) -> None:
        detail = {**error, "status": status}
        retry_at: float | None = None
        dead = False
        if status in TRANSIENT_STATUSES:
            if job.attempts < job.max_attempts:
                delay = next_retry_delay(
                    job.attempts,
                    base_s=self._retry_base_s,
                    cap_s=self._retry_cap_s,
                    retry_after_s=_seconds(headers.get("Retry-After")),
                    rng=self._rng,
                )
                retry_at = self._clock() + delay
            else:
                dead = True
        failure = Failure(detail, retry_at=retry_at, dead=dead)
        after = await self._queue.fail(job.id, self.worker_id, failure)
        if after is None:
            return
        self._changed([after.id])
        if retry_at is not None:  # claim it again when it is due, not at the next idle poll
            delay = max(0.0, retry_at - self._clock())
            asyncio.get_running_loop().call_later(delay, self._wake.set)
            return
        self.failed += 1
        self._webhook_written(after)

    def _changed(self, job_ids: list[str]) -> None:
        if job_ids and self._on_jobs_changed is not None:
            self._on_jobs_changed(job_ids)

    def _webhook_written(self, job: Job) -> None:
        if job.webhook_url is not None and job.status.final and self._on_webhook is not None:
            self._on_webhook()


class _KeyGone(HeadraceError):
    status = 403
    type = "permission_error"
    default_code = "key_revoked"

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"The API key {key_id} that submitted this job was revoked, expired or deleted."
        )


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
