"""``/v1/jobs``: submit (202 at once), look, list, cancel, follow (SSE), delivery history; and
``/admin/dead-letters`` for operators."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from headrace.api import sse
from headrace.api.admin import admin_only, json_response
from headrace.api.context import authenticated_call, json_body, runtime
from headrace.api.wire import invalid
from headrace.domain import JobKind, JobStatus, Principal, Priority
from headrace.errors import InvalidRequestError, NotFoundError
from headrace.jobs.service import JobOptions, JobService
from headrace.queue.base import job_view
from headrace.wiring import Runtime

router = APIRouter()

IDEMPOTENCY_HEADER = "idempotency-key"
KEEPALIVE_S = 15.0  # an SSE comment this often while a job's stream has nothing to say


class JobSubmission(BaseModel):
    """The body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["chat.completions", "embeddings"] = "chat.completions"
    body: dict[str, Any]
    priority: Priority = Priority.NORMAL
    webhook_url: str | None = None
    deadline: datetime | float | None = Field(None, description="ISO 8601 or unix seconds.")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] = Field(
        default_factory=dict, max_length=16
    )


def _jobs(rt: Runtime) -> JobService:
    if rt.jobs is None:
        raise NotFoundError("Jobs are not enabled on this gateway.")
    return rt.jobs


async def _caller(request: Request) -> tuple[Principal, JobService, Runtime]:
    call = await authenticated_call(request)
    assert call.principal is not None
    rt = runtime(request)
    return call.principal, _jobs(rt), rt


def _deadline(value: datetime | float | None) -> float | None:
    if value is None or isinstance(value, float | int):
        return value
    return value.timestamp()


@router.post("/v1/jobs", tags=["jobs"], status_code=202)
async def submit_job(request: Request) -> Response:
    """Queue a chat or embeddings request; 202 with the job at once (200 for a repeat of an
    ``Idempotency-Key`` with the same submission)."""
    principal, jobs, rt = await _caller(request)
    try:
        submission = JobSubmission.model_validate(await json_body(request))
    except ValidationError as exc:
        raise invalid(exc) from None
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not 0 < len(key) <= 255:
        raise InvalidRequestError(
            "Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key"
        )
    job, created = await jobs.submit(
        principal,
        JobKind(submission.kind),
        submission.body,
        JobOptions(
            priority=submission.priority,
            webhook_url=submission.webhook_url,
            deadline_at=_deadline(submission.deadline),
            metadata=submission.metadata,
        ),
        idempotency_key=key,
    )
    if created and rt.on_job_submitted is not None:
        rt.on_job_submitted()
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        orjson.dumps(job_view(job)),
        status_code=202 if created else 200,
        media_type="application/json",
        headers=headers,
    )


@router.get("/v1/jobs/{job_id}", tags=["jobs"])
async def get_job(request: Request, job_id: str) -> Response:
    principal, jobs, _ = await _caller(request)
    return json_response(job_view(await jobs.get(principal, job_id)))


@router.get("/v1/jobs", tags=["jobs"])
async def list_jobs(
    request: Request,
    status: JobStatus | None = None,
    batch_id: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Field(ge=1, le=100)] = 20,
) -> Response:
    """Your team's jobs, newest first; page with ``after`` (the last id you saw)."""
    principal, jobs, _ = await _caller(request)
    if not 1 <= limit <= 100:
        raise InvalidRequestError("limit must be between 1 and 100.", param="limit")
    found = await jobs.list_jobs(
        principal, status=status, batch_id=batch_id, after=after, limit=limit + 1
    )
    page = found[:limit]
    return json_response(
        {
            "object": "list",
            "data": [job_view(job) for job in page],
            "has_more": len(found) > limit,
            "last_id": page[-1].id if page else None,
        }
    )


@router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
async def cancel_job(request: Request, job_id: str) -> Response:
    principal, jobs, _ = await _caller(request)
    return json_response(job_view(await jobs.cancel(principal, job_id)))


@router.get("/v1/jobs/{job_id}/deliveries", tags=["jobs"])
async def job_deliveries(request: Request, job_id: str) -> Response:
    """Every webhook delivery attempt for the job, oldest first."""
    principal, jobs, _ = await _caller(request)
    await jobs.get(principal, job_id)
    records = await jobs.queue.deliveries(job_id)
    return json_response(
        {
            "object": "list",
            "data": [
                {
                    "event_id": r.event_id,
                    "attempt": r.attempt,
                    "at": r.at,
                    "status_code": r.status_code,
                    "outcome": r.outcome,
                    "error": r.error,
                }
                for r in records
            ],
        }
    )


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"])
async def job_events(request: Request, job_id: str) -> Response:
    """Server-sent events: one ``job.<status>`` event per status change, from the start (or
    after ``Last-Event-ID``); the stream ends after the final one (at once when resumed past
    it), or if the job is deleted.

    Between changes the stream waits on the process's :class:`~headrace.jobs.watch.JobWatch`
    (one poll for every open stream) and sends a comment every :data:`KEEPALIVE_S`, which
    keeps proxies from closing an idle stream and finds a client that left."""
    principal, jobs, _ = await _caller(request)
    ended = (await jobs.get(principal, job_id)).status.final
    last = request.headers.get("last-event-id", "0")
    after = int(last) if last.isdigit() else 0

    async def stream() -> AsyncIterator[bytes]:
        seen = after
        while True:
            try:
                events = await jobs.events(principal, job_id, seen)
            except NotFoundError:
                return  # the job was deleted since the stream began
            for event in events:
                seen = event.seq
                payload = {
                    "job_id": event.job_id,
                    "status": event.status.value,
                    "at": event.at,
                    **dict(event.detail),
                }
                yield (
                    f"id: {event.seq}\nevent: job.{event.status.value}\n".encode()
                    + b"data: "
                    + orjson.dumps(payload)
                    + b"\n\n"
                )
                if event.status.final:
                    return
            # A job final before the stream began has nothing more to say (resumed past its end).
            if ended or await request.is_disconnected():
                return
            if not await jobs.next_event(job_id, seen, KEEPALIVE_S):
                yield b": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers=sse.HEADERS)


# -- dead letters (operators) ----------------------------------------------------------------


@router.get("/admin/dead-letters", tags=["admin"])
async def dead_letters(request: Request, limit: int = 100) -> Response:
    _, rt = await admin_only(request)
    found = await _jobs(rt).queue.dead_letters(limit)
    return json_response({"object": "list", "data": [job_view(job) for job in found]})


@router.post("/admin/dead-letters/replay", tags=["admin"])
async def replay_all(request: Request) -> Response:
    _, rt = await admin_only(request)
    queue = _jobs(rt).queue
    replayed = [job.id for job in await queue.dead_letters(10_000)]
    for job_id in replayed:
        await queue.replay(job_id)
    if replayed and rt.on_job_submitted is not None:
        rt.on_job_submitted()
    return json_response({"replayed": replayed})


@router.post("/admin/dead-letters/{job_id}/replay", tags=["admin"])
async def replay_one(request: Request, job_id: str) -> Response:
    _, rt = await admin_only(request)
    job = await _jobs(rt).queue.replay(job_id)
    if job is None:
        raise NotFoundError(f"No dead or failed job {job_id!r}.", param="job_id")
    if rt.on_job_submitted is not None:
        rt.on_job_submitted()
    return json_response(job_view(job))


@router.delete("/admin/dead-letters/{job_id}", tags=["admin"])
async def discard(request: Request, job_id: str) -> Response:
    _, rt = await admin_only(request)
    if not await _jobs(rt).queue.discard(job_id):
        raise NotFoundError(f"No dead job {job_id!r}.", param="job_id")
    return json_response({"id": job_id, "object": "job.deleted", "deleted": True})
