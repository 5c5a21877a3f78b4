"""A runner that sends a job back for a retry claims it again when it is due, not at its next
idle poll: serve's runner polls only every NUDGED_IDLE_POLL_S."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Any

from headrace.domain import ChatResponse, Job, JobKind, JobStatus, Principal, Role, Usage
from headrace.errors import OverloadedError
from headrace.queue.base import Completion, Failure
from headrace.worker.runner import NUDGED_IDLE_POLL_S, JobRunner

RETRY_S = 0.2
JOB = Job(
    id="j1",
    kind=JobKind.CHAT,
    body={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    key_id="k1",
)


class OneJobQueue:
    """Holds ``JOB``: claimable once its ``run_after`` has passed, until it is completed."""

    def __init__(self) -> None:
        self.job: Job | None = JOB
        self.claimed_at: list[float] = []
        self.failed_at: list[float] = []
        self.done = asyncio.Event()

    async def claim(self, worker: str, limit: int, lease_s: float) -> list[Job]:
        job = self.job
        if job is None or job.status is not JobStatus.QUEUED or job.run_after > time.time():
            return []
        self.claimed_at.append(time.monotonic())
        self.job = replace(job, status=JobStatus.RUNNING, attempts=job.attempts + 1)
        return [self.job]

    async def fail(self, job_id: str, worker: str, failure: Failure) -> Job | None:
        assert self.job is not None
        assert failure.retry_at is not None
        self.failed_at.append(time.monotonic())
        self.job = replace(self.job, status=JobStatus.QUEUED, run_after=failure.retry_at)
        return self.job

    async def complete_many(self, worker: str, completions: list[Completion]) -> list[Job]:
        self.job = None
        self.done.set()
        return [c.job for c in completions]

    async def heartbeat(self, worker: str, job_ids: list[str], lease_s: float) -> list[str]:
        return []

    async def recover(self) -> int:
        return 0


class FailsOnce:
    """The gateway: overloaded (503, transient) on the first call, then an answer."""

    calls = 0

    async def chat(self, call: Any, request: Any) -> ChatResponse:
        self.calls += 1
        if self.calls == 1:
            raise OverloadedError("busy")
        return ChatResponse(body={"choices": []}, usage=Usage())


class Ceiling(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b  # the longest backoff: exactly RETRY_S


async def principal_of(key_id: str) -> Principal:
    return Principal(key_id=key_id, role=Role.USER)


async def test_a_retried_job_is_claimed_when_due_not_at_the_next_idle_poll() -> None:
    queue = OneJobQueue()
    typed: Any = queue
    gateway: Any = FailsOnce()
    runner = JobRunner(
        typed,
        gateway,
        principal_of,
        idle_poll_s=NUDGED_IDLE_POLL_S * 10,  # the first idle wait alone: 2.5 s
        retry_base_s=RETRY_S,
        retry_cap_s=RETRY_S,
        rng=Ceiling(),
    )
    await runner.start()
    try:
        await asyncio.wait_for(queue.done.wait(), timeout=2.0)
    finally:
        await runner.stop(grace_s=1.0)
    assert len(queue.claimed_at) == 2
    waited = queue.claimed_at[1] - queue.failed_at[0]
    assert RETRY_S - 0.05 <= waited <= RETRY_S + 0.5
    assert runner.completed == 1
