"""OutboxDispatcher: delivers the webhook events that job state changes wrote to the outbox.

At least once: an item stays due until a delivery succeeds or fails for good, and its
``event_id`` never changes, so a receiver deduplicates by the ``webhook-id`` header. Retries
back off exponentially with full jitter, honouring ``Retry-After``, up to ``max_attempts``;
every attempt is kept as the job's delivery history.

Polling: every ``poll_s`` while there is work; after each pass that found nothing the wait
doubles, up to ``idle_poll_s``, so an idle process costs next to nothing. :meth:`nudge` (the
worker calls it when a job it finished has a webhook) starts a pass at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from headrace.events.webhooks import DeliveryAttempt, WebhookSender, next_retry_delay
from headrace.observability.tracing import Tracing, delivered
from headrace.queue.base import DeliveryRecord, JobQueue, OutboxItem

log = structlog.get_logger("headrace")


class OutboxDispatcher:
    def __init__(
        self,
        queue: JobQueue,
        sender: WebhookSender,
        secret: str,
        *,
        max_attempts: int = 12,
        poll_s: float = 0.2,
        idle_poll_s: float = 1.0,
        batch: int = 100,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._queue = queue
        self._sender = sender
        self._secret = secret
        self._max_attempts = max_attempts
        self._poll_s = poll_s
        self._idle_poll_s = max(idle_poll_s, poll_s)
        self._batch = batch
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._tracing = tracing
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def nudge(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="webhook-outbox")

    async def stop(self, grace_s: float = 30.0) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._sender.aclose()

    async def deliver_due(self) -> int:
        """One pass: deliver every item that is due now; return how many were attempted."""
        items = await self._queue.due_webhooks(self._batch)
        await asyncio.gather(*(self._deliver(item) for item in items))
        return len(items)

    async def _loop(self) -> None:
        wait_s = self._poll_s
        while True:
            self._wake.clear()
            try:
                attempted = await self.deliver_due()
            except Exception as exc:
                log.warning("webhook_outbox_failed", error=repr(exc))
                attempted = 0
            if attempted:
                wait_s = self._poll_s
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_s)
            wait_s = self._poll_s if self._wake.is_set() else min(wait_s * 2, self._idle_poll_s)

    async def _deliver(self, item: OutboxItem) -> None:
        number = item.attempts + 1
        if self._tracing is None:
            attempt = await self._post(item)
        else:
            span = self._tracing.start_delivery(
                item.event_type,
                event_id=item.event_id,
                job_id=item.job_id,
                attempt=number,
                url=item.url,
                submitted_in=item.traceparent,
            )
            with Tracing.running(span):
                attempt = await self._post(item)
                delivered(span, attempt.status_code, attempt.outcome.value, attempt.error)
        next_at: float | None = None
        if not attempt.outcome.final and number < self._max_attempts:
            next_at = self._clock() + next_retry_delay(
                number,
                base_s=self._retry_base_s,
                cap_s=self._retry_cap_s,
                retry_after_s=attempt.retry_after_s,
                rng=self._rng,
            )
        record = DeliveryRecord(
            event_id=item.event_id,
            attempt=number,
            at=attempt.attempted_at.timestamp(),
            status_code=attempt.status_code,
            outcome=attempt.outcome.value,
            error=attempt.error,
        )
        await self._queue.record_delivery(record, next_at)
        log.info(
            "webhook_attempt",
            event_id=item.event_id,
            job=item.job_id,
            attempt=number,
            outcome=attempt.outcome.value,
            status=attempt.status_code,
            retry_at=next_at,
        )

    async def _post(self, item: OutboxItem) -> DeliveryAttempt:
        """One attempt at ``item``: its event, signed, POSTed to its URL."""
        return await self._sender.deliver(
            item.url,
            self._secret,
            item.event_id,
            item.event_type,
            item.payload,
            created_at=datetime.fromtimestamp(item.created_at, UTC),
        )
