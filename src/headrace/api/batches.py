"""``/v1/files`` and ``/v1/batches``: OpenAI's Batch API, so the official SDKs' batch calls work.

Wire shapes are OpenAI's ``File`` and ``Batch`` objects (times in integer unix seconds); the
work is :class:`~headrace.jobs.batches.BatchService`'s. A batch's requests run as jobs: jobs
must be enabled on the gateway (they are, in ``headrace serve``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from headrace.api.admin import json_response
from headrace.api.context import (
    PRIORITY_HEADER,
    authenticated_call,
    call_of,
    json_body,
    runtime,
)
from headrace.api.wire import invalid
from headrace.domain import Principal, Priority
from headrace.errors import InvalidRequestError, NotFoundError
from headrace.jobs.batches import BatchService
from headrace.queue.batch_base import Batch, StoredFile
from headrace.wiring import Runtime

router = APIRouter()


class BatchCreation(BaseModel):
    """The body of ``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=16),
        ]
        | None
    ) = None
    # Accepted for the SDKs' sake and ignored: Headrace's files do not expire.
    output_expires_after: dict[str, Any] | None = None


async def _caller(request: Request) -> tuple[Principal, BatchService, Runtime]:
    call = await authenticated_call(request)
    assert call.principal is not None
    rt = runtime(request)
    service = rt.batches
    if service is None:
        raise NotFoundError(
            "Batches are not enabled on this gateway: they run as jobs, and jobs are off."
        )
    return call.principal, service, rt


def _limit(limit: int) -> None:
    if not 1 <= limit <= 100:
        raise InvalidRequestError("limit must be between 1 and 100.", param="limit")


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


# -- files ------------------------------------------------------------------------------------


@router.post("/v1/files", tags=["batches"])
async def upload_file(request: Request) -> Response:
    """Upload a batch input file: ``multipart/form-data`` with ``file`` and ``purpose=batch``.

    The whole upload is one request body, so ``server.max_body_bytes`` (8 MiB by default)
    bounds a file; larger ones get 413.
    """
    principal, batches, _ = await _caller(request)
    async with request.form() as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError(
                "Send the file as the 'file' field of a multipart/form-data body.", param="file"
            )
        if not isinstance(purpose, str):
            raise InvalidRequestError(
                "Missing required parameter: 'purpose' (send purpose=batch).", param="purpose"
            )
        content = await upload.read()
        stored = await batches.upload(
            principal, filename=upload.filename or "", purpose=purpose, content=content
        )
    return json_response(file_object(stored))


@router.get("/v1/files", tags=["batches"])
async def list_files(
    request: Request, purpose: str | None = None, after: str | None = None, limit: int = 20
) -> Response:
    """Your team's files, newest first; page with ``after`` (the last id you saw)."""
    principal, batches, _ = await _caller(request)
    _limit(limit)
    found = await batches.files(principal, purpose=purpose, after=after, limit=limit + 1)
    return json_response(_page([file_object(f) for f in found[:limit]], len(found) > limit))


@router.get("/v1/files/{file_id}", tags=["batches"])
async def get_file(request: Request, file_id: str) -> Response:
    principal, batches, _ = await _caller(request)
    return json_response(file_object(await batches.file(principal, file_id)))


@router.get("/v1/files/{file_id}/content", tags=["batches"])
async def file_content(request: Request, file_id: str) -> Response:
    """The file's bytes: a batch's output or error file is JSON Lines."""
    principal, batches, _ = await _caller(request)
    stored, content = await batches.content(principal, file_id)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{stored.filename}"'},
    )


@router.delete("/v1/files/{file_id}", tags=["batches"])
async def delete_file(request: Request, file_id: str) -> Response:
    principal, batches, _ = await _caller(request)
    await batches.delete_file(principal, file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


# -- batches ----------------------------------------------------------------------------------


@router.post("/v1/batches", tags=["batches"])
async def create_batch(request: Request) -> Response:
    """Create a batch from an uploaded file: every line is checked first (400 naming the bad
    ones in ``error.errors``), then each becomes a job. The jobs run at low priority unless
    ``X-Headrace-Priority`` says otherwise."""
    principal, batches, rt = await _caller(request)
    try:
        creation = BatchCreation.model_validate(await json_body(request))
    except ValidationError as exc:
        raise invalid(exc) from None
    # The call's controls took the header (or the key's default): only the header counts here.
    priority = call_of(request).controls.priority if PRIORITY_HEADER in request.headers else None
    batch = await batches.create(
        principal,
        input_file_id=creation.input_file_id,
        endpoint=creation.endpoint,
        completion_window=creation.completion_window,
        metadata=creation.metadata or {},
        priority=priority or Priority.LOW,
    )
    if rt.on_job_submitted is not None:
        rt.on_job_submitted()
    return json_response(batch_object(batch))


@router.get("/v1/batches", tags=["batches"])
async def list_batches(request: Request, after: str | None = None, limit: int = 20) -> Response:
    """Your team's batches, newest first; page with ``after`` (the last id you saw)."""
    principal, batches, _ = await _caller(request)
    _limit(limit)
    found = await batches.batches(principal, after=after, limit=limit + 1)
    return json_response(_page([batch_object(b) for b in found[:limit]], len(found) > limit))


@router.get("/v1/batches/{batch_id}", tags=["batches"])
async def get_batch(request: Request, batch_id: str) -> Response:
    """The batch, with its progress brought up to date (and its files written once done)."""
    principal, batches, _ = await _caller(request)
    return json_response(batch_object(await batches.get(principal, batch_id)))


@router.post("/v1/batches/{batch_id}/cancel", tags=["batches"])
async def cancel_batch(request: Request, batch_id: str) -> Response:
    """Cancel the requests not yet started; running ones finish. ``cancelling`` until then."""
    principal, batches, _ = await _caller(request)
    return json_response(batch_object(await batches.cancel(principal, batch_id)))


# -- OpenAI's objects -------------------------------------------------------------------------


def _seconds(at: float | None) -> int | None:
    return None if at is None else int(at)


def file_object(stored: StoredFile) -> dict[str, Any]:
    """OpenAI's ``File`` (``status`` is deprecated there; a stored file is ``processed``)."""
    return {
        "id": stored.id,
        "object": "file",
        "bytes": stored.bytes,
        "created_at": int(stored.created_at),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def batch_object(batch: Batch) -> dict[str, Any]:
    """OpenAI's ``Batch``."""
    counts = batch.request_counts
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None
        if batch.errors is None
        else {"object": "list", "data": [dict(e) for e in batch.errors]},
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status.value,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "in_progress_at": _seconds(batch.in_progress_at),
        "expires_at": _seconds(batch.expires_at),
        "finalizing_at": _seconds(batch.finalizing_at),
        "completed_at": _seconds(batch.completed_at),
        "failed_at": _seconds(batch.failed_at),
        "expired_at": _seconds(batch.expired_at),
        "cancelling_at": _seconds(batch.cancelling_at),
        "cancelled_at": _seconds(batch.cancelled_at),
        "request_counts": {
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "metadata": dict(batch.metadata),
        "usage": None if batch.usage is None else dict(batch.usage),
    }
