"""BatchService: the OpenAI Batch API on the job machinery.

A batch is an uploaded JSONL file of requests; each line becomes one ordinary job
(``Job.batch_id`` set, the line's ``custom_id`` and number in the job's metadata), run by the
same workers, limits, retries and dead letters as any job. This service adds the batch's own
life around them:

- **create**: the input file is read and every line checked at once; one bad line refuses
  the whole batch with a 400 (:class:`BatchInputError`) that names each bad line in
  OpenAI's batch-error shape, so nothing runs and nothing is billed for a file that needs
  fixing. (OpenAI instead creates the batch and fails it while ``validating``; a client
  learns the same thing either way, Headrace's way one round trip sooner.) Then the batch row
  is stored as ``validating``, its jobs are submitted with one ``submit_many`` (one
  transaction), and it becomes ``in_progress``.
- **refresh** (on every read; there is no background finalizer): counts the batch's jobs by
  status; once every job is final it writes the output file (succeeded requests) and the
  error file (the others) and the final status, in one compare-and-set transaction.
- **cancel**: ``cancelling``, then the batch's queued jobs are cancelled; running ones finish
  and keep their results. ``cancelled`` once every job is final, with partial files.
- **expiry**: every job's deadline is the batch's ``expires_at`` (``completion_window``
  after creation): a job not started by then fails with code ``expired``; a batch with such
  jobs ends ``expired``, those lines in the error file with code ``batch_expired``.

A crash between the batch row and its jobs leaves a ``validating`` batch: a refresh that
finds its jobs promotes it to ``in_progress``; one that finds none after
:data:`STALE_VALIDATING_S` fails it.

Scope: as jobs, a key sees its team's files and batches (its own without a team); anyone
else's are "not found".

One module past 400 lines: the service, and the two file formats only it reads and writes
(input lines, output and error lines) as small functions at the end; those would move to a
module of their own if anything else needed them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import orjson

from headrace.domain import Job, JobKind, JobStatus, Principal, Priority
from headrace.errors import ConflictError, HeadraceError, InvalidRequestError, NotFoundError
from headrace.jobs.service import JobOptions, JobService
from headrace.queue.batch_base import (
    Batch,
    BatchStatus,
    BatchStore,
    NewFile,
    RequestCounts,
    StoredFile,
)

__all__ = [
    "COMPLETION_WINDOWS",
    "ENDPOINTS",
    "MAX_CUSTOM_ID_CHARS",
    "MAX_REQUESTS",
    "STALE_VALIDATING_S",
    "BatchInputError",
    "BatchService",
]

ENDPOINTS: Mapping[str, JobKind] = {
    "/v1/chat/completions": JobKind.CHAT,
    "/v1/embeddings": JobKind.EMBEDDINGS,
}
COMPLETION_WINDOWS: Mapping[str, float] = {"24h": 86_400.0}  # OpenAI offers only 24h
MAX_REQUESTS = 50_000  # lines per input file, as OpenAI
MAX_CUSTOM_ID_CHARS = 512  # a job metadata value
MAX_REPORTED_ERRORS = 100  # bad lines listed in a 400 (all are counted)
STALE_VALIDATING_S = 600.0  # a batch validating this long without jobs was interrupted
LIST_PAGE = 1000  # jobs read per query when finalizing or cancelling

FILE_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"


class BatchInputError(InvalidRequestError):
    """The input file has bad lines: 400, with every bad line (up to
    :data:`MAX_REPORTED_ERRORS`) in ``error.errors``, OpenAI's batch ``errors`` object:
    ``{"object": "list", "data": [{"code", "message", "param", "line"}]}``."""

    default_code = "invalid_batch_input"

    def __init__(self, file_id: str, errors: Sequence[Mapping[str, Any]]) -> None:
        first = errors[0]
        where = f"Line {first['line']} of {file_id}" if first.get("line") else file_id
        more = len(errors) - 1
        message = f"{where}: {first['message']}"
        if more:
            message += f" ({more} more bad line{'s' if more > 1 else ''}: see error.errors)"
        super().__init__(
            message + " Fix the file, upload it again and create the batch from the new file.",
            param="input_file_id",
        )
        self.errors = [dict(e) for e in errors[:MAX_REPORTED_ERRORS]]

    def to_openai(self) -> dict[str, Any]:
        body = super().to_openai()
        body["error"]["errors"] = {"object": "list", "data": self.errors}
        return body


@dataclass(frozen=True, slots=True)
class _Line:
    number: int  # 1-based, as an editor shows it
    custom_id: str
    body: Mapping[str, Any]


class BatchService:
    def __init__(
        self,
        jobs: JobService,
        store: BatchStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs = jobs
        self._store = store
        self._clock = clock

    @property
    def store(self) -> BatchStore:
        return self._store

    # -- files --------------------------------------------------------------------------------

    async def upload(
        self, principal: Principal, *, filename: str, purpose: str, content: bytes
    ) -> StoredFile:
        """Store an input file. Its lines are checked when a batch is created from it."""
        if purpose != FILE_PURPOSE:
            raise InvalidRequestError(
                f"Headrace stores files for the Batch API only, not purpose {purpose!r}: "
                "upload with purpose=batch.",
                param="purpose",
                code="unsupported_purpose",
            )
        if not content:
            raise InvalidRequestError("The file is empty.", param="file", code="empty_file")
        stored = StoredFile(
            id=f"file-{uuid.uuid4().hex}",
            key_id=principal.key_id,
            team_id=principal.team_id,
            purpose=purpose,
            filename=_base_name(filename),
            bytes=len(content),
            created_at=self._clock(),
        )
        await self._store.put_file(NewFile(stored, content))
        return stored

    async def file(self, principal: Principal, file_id: str) -> StoredFile:
        found = await self._store.get_file(file_id)
        if found is None or not _owns(principal, found.team_id, found.key_id):
            raise NotFoundError(f"No file {file_id!r} for this API key's team.", param="file_id")
        return found

    async def content(self, principal: Principal, file_id: str) -> tuple[StoredFile, bytes]:
        found = await self.file(principal, file_id)
        content = await self._store.file_content(file_id)
        if content is None:  # deleted in between
            raise NotFoundError(f"No file {file_id!r} for this API key's team.", param="file_id")
        return found, content

    async def files(
        self,
        principal: Principal,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> list[StoredFile]:
        return await self._store.list_files(
            team_id=principal.team_id,
            key_id=None if principal.team_id else principal.key_id,
            purpose=purpose,
            after=after,
            limit=limit,
        )

    async def delete_file(self, principal: Principal, file_id: str) -> None:
        """Delete a file. Batches made from it are not affected (their jobs hold the
        requests); a batch's output file deleted is gone for good."""
        await self.file(principal, file_id)
        await self._store.delete_file(file_id)

    # -- batches ------------------------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
        priority: Priority = Priority.LOW,
    ) -> Batch:
        """Check the input file, store the batch and submit one job per line (see the module
        docstring). ``priority``: the jobs' (bulk work yields to interactive jobs)."""
        kind = ENDPOINTS.get(endpoint)
        if kind is None:
            raise InvalidRequestError(
                f"Headrace runs batches for {' and '.join(ENDPOINTS)}, not {endpoint!r}.",
                param="endpoint",
                code="unsupported_endpoint",
            )
        window_s = COMPLETION_WINDOWS.get(completion_window)
        if window_s is None:
            raise InvalidRequestError(
                f"completion_window must be {' or '.join(COMPLETION_WINDOWS)}, "
                f"not {completion_window!r}.",
                param="completion_window",
            )
        source, content = await self.content(principal, input_file_id)
        if source.purpose != FILE_PURPOSE:
            raise InvalidRequestError(
                f"File {input_file_id} has purpose {source.purpose!r}; a batch's input must be "
                "uploaded with purpose=batch.",
                param="input_file_id",
            )
        now = self._clock()
        batch_id = f"batch_{uuid.uuid4().hex}"
        expires_at = now + window_s
        lines, errors = _read_lines(content, endpoint)
        jobs: list[Job] = []
        for line in lines:
            options = JobOptions(
                priority=priority,
                deadline_at=expires_at,
                metadata={"custom_id": line.custom_id, "batch_line": str(line.number)},
            )
            try:
                jobs.append(
                    self._jobs.new_job(principal, kind, line.body, options, batch_id=batch_id)
                )
            except HeadraceError as exc:
                param = exc.param or ""
                param = param if param.startswith("body") else f"body.{param}".rstrip(".")
                code = exc.code or "invalid_value"
                errors.append(_error(code, exc.message, line.number, param))
        if errors:
            raise BatchInputError(source.id, sorted(errors, key=lambda e: e.get("line") or 0))
        batch = Batch(
            id=batch_id,
            key_id=principal.key_id,
            team_id=principal.team_id,
            endpoint=endpoint,
            input_file_id=source.id,
            completion_window=completion_window,
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=expires_at,
            request_counts=RequestCounts(total=len(jobs)),
            metadata=dict(metadata),
        )
        await self._store.put_batch(batch)
        try:
            await self._jobs.queue.submit_many(jobs)
        except Exception:
            failed = dataclasses.replace(
                batch,
                status=BatchStatus.FAILED,
                failed_at=self._clock(),
                errors=[_error("submission_failed", "The batch's requests could not be queued.")],
            )
            # Best effort: the client must see the original error, and a batch left
            # validating without jobs is failed by a later refresh anyway.
            with contextlib.suppress(Exception):
                await self._store.save_batch(failed, expect=BatchStatus.VALIDATING)
            raise
        started = dataclasses.replace(
            batch, status=BatchStatus.IN_PROGRESS, in_progress_at=self._clock()
        )
        if await self._store.save_batch(started, expect=BatchStatus.VALIDATING):
            return started
        # Someone got there first: a refresh that promoted it, or a cancel.
        current = await self._store.get_batch(batch_id)
        assert current is not None  # batches are never deleted
        if current.status is BatchStatus.CANCELLING:
            await self._cancel_queued(current)
        return await self.refresh(current)

    async def get(self, principal: Principal, batch_id: str) -> Batch:
        """The batch, refreshed from its jobs."""
        return await self.refresh(await self._visible(principal, batch_id))

    async def batches(
        self, principal: Principal, *, after: str | None = None, limit: int = 20
    ) -> list[Batch]:
        """The team's batches, newest first, each refreshed."""
        found = await self._store.list_batches(
            team_id=principal.team_id,
            key_id=None if principal.team_id else principal.key_id,
            after=after,
            limit=limit,
        )
        return [await self.refresh(batch) for batch in found]

    async def cancel(self, principal: Principal, batch_id: str) -> Batch:
        """``cancelling`` at once; ``cancelled`` when the requests already running end. A
        cancelled or cancelling batch is returned as it is; an ended one is a 409."""
        batch = await self._visible(principal, batch_id)
        while batch.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            if batch.status.final:
                raise ConflictError(
                    f"Batch {batch_id} is already {batch.status.value}: only a validating or "
                    "in-progress batch can be cancelled.",
                    code="batch_not_cancellable",
                )
            cancelling = dataclasses.replace(
                batch, status=BatchStatus.CANCELLING, cancelling_at=self._clock()
            )
            if await self._store.save_batch(cancelling, expect=batch.status):
                batch = cancelling
                break
            batch = await self._visible(principal, batch_id)  # it moved on: look again
        if batch.status is BatchStatus.CANCELLING:
            await self._cancel_queued(batch)
        return await self.refresh(batch)

    async def refresh(self, batch: Batch) -> Batch:
        """Bring ``batch`` up to date with its jobs: progress counts, or the end (files and
        final status) once every job is final. Idempotent; safe to run concurrently."""
        if batch.status.final:
            return batch
        counts = await self._store.job_counts(batch.id)
        now = self._clock()
        submitted = sum(counts.values())
        total = batch.request_counts.total
        # The jobs went in with one transaction before in_progress_at was set: a job missing
        # after that was deleted (a discarded dead letter), and counts as failed.
        committed = batch.in_progress_at is not None or now - batch.created_at > STALE_VALIDATING_S
        if batch.status is BatchStatus.VALIDATING:
            return await self._refresh_validating(batch, submitted=submitted, stale=committed)
        if batch.status is BatchStatus.CANCELLING and counts.get(JobStatus.QUEUED):
            await self._cancel_queued(batch)  # a running job failed and was queued to retry
            counts = await self._store.job_counts(batch.id)
        finished = sum(n for status, n in counts.items() if status.final)
        missing = max(0, total - submitted) if committed else 0
        if finished + missing < total:
            succeeded = counts.get(JobStatus.SUCCEEDED, 0)
            progress = RequestCounts(total, succeeded, finished - succeeded + missing)
            if progress == batch.request_counts:
                return batch
            return await self._save(dataclasses.replace(batch, request_counts=progress), batch)
        return await self._finish(batch, now)

    async def _refresh_validating(self, batch: Batch, *, submitted: int, stale: bool) -> Batch:
        now = self._clock()
        if submitted >= batch.request_counts.total:  # its creator stopped after the jobs
            started = dataclasses.replace(batch, status=BatchStatus.IN_PROGRESS, in_progress_at=now)
            return await self._save(started, batch)
        if stale and not submitted:
            failed = dataclasses.replace(
                batch,
                status=BatchStatus.FAILED,
                failed_at=now,
                errors=[
                    _error(
                        "submission_interrupted",
                        "The gateway stopped before queueing this batch's requests; "
                        "create the batch again.",
                    )
                ],
            )
            return await self._save(failed, batch)
        return batch

    # -- the end ------------------------------------------------------------------------------

    async def _finish(self, batch: Batch, now: float) -> Batch:
        jobs = sorted(await self._batch_jobs(batch), key=_line_of)
        cancelling = batch.status is BatchStatus.CANCELLING
        succeeded = [job for job in jobs if job.status is JobStatus.SUCCEEDED]
        others = [job for job in jobs if job.status is not JobStatus.SUCCEEDED]
        if cancelling:
            status = BatchStatus.CANCELLED
        elif any(_expired(job) for job in others):
            status = BatchStatus.EXPIRED
        else:
            status = BatchStatus.COMPLETED
        files: list[NewFile] = []
        output_id = error_id = None
        if succeeded:
            output = self._output_file(batch, "output", (_output_line(job) for job in succeeded))
            output_id = output.file.id
            files.append(output)
        if others:
            errors = (_error_line(job, cancelling=cancelling) for job in others)
            error = self._output_file(batch, "error", errors)
            error_id = error.file.id
            files.append(error)
        ended = dataclasses.replace(
            batch,
            status=status,
            request_counts=RequestCounts(
                batch.request_counts.total,
                len(succeeded),
                batch.request_counts.total - len(succeeded),
            ),
            output_file_id=output_id,
            error_file_id=error_id,
            finalizing_at=now,
            completed_at=now if status is BatchStatus.COMPLETED else None,
            expired_at=now if status is BatchStatus.EXPIRED else None,
            cancelled_at=now if status is BatchStatus.CANCELLED else None,
            usage=_usage(job.result for job in succeeded if job.result is not None),
        )
        return await self._save(ended, batch, files)

    def _output_file(self, batch: Batch, which: str, lines: Iterable[Mapping[str, Any]]) -> NewFile:
        content = b"".join(orjson.dumps(line) + b"\n" for line in lines)
        stored = StoredFile(
            id=f"file-{uuid.uuid4().hex}",
            key_id=batch.key_id,
            team_id=batch.team_id,
            purpose=OUTPUT_PURPOSE,
            filename=f"{batch.id}_{which}.jsonl",
            bytes=len(content),
            created_at=self._clock(),
        )
        return NewFile(stored, content)

    async def _save(self, after: Batch, before: Batch, files: Sequence[NewFile] = ()) -> Batch:
        """Compare-and-set ``before`` → ``after``; on a lost race, whatever won."""
        if await self._store.save_batch(after, expect=before.status, files=files):
            return after
        return await self._store.get_batch(before.id) or before

    async def _batch_jobs(
        self, batch: Batch, status: JobStatus | None = None, *, first_page_only: bool = False
    ) -> list[Job]:
        found: list[Job] = []
        after = None
        while True:
            page = await self._jobs.queue.list_jobs(
                team_id=batch.team_id,
                key_id=None if batch.team_id else batch.key_id,
                status=status,
                batch_id=batch.id,
                after=after,
                limit=LIST_PAGE,
            )
            found += page
            if first_page_only or len(page) < LIST_PAGE:
                return found
            after = page[-1].id

    async def _cancel_queued(self, batch: Batch) -> None:
        """Cancel the batch's queued jobs, a page at a time (each page is queued jobs that are
        left, so the loop ends when none is; ``seen`` guards against one that stays)."""
        seen: set[str] = set()
        while True:
            page = await self._batch_jobs(batch, JobStatus.QUEUED, first_page_only=True)
            fresh = [job for job in page if job.id not in seen]
            if not fresh:
                return
            for job in fresh:
                seen.add(job.id)
                await self._jobs.queue.cancel(job.id)

    async def _visible(self, principal: Principal, batch_id: str) -> Batch:
        batch = await self._store.get_batch(batch_id)
        if batch is None or not _owns(principal, batch.team_id, batch.key_id):
            raise NotFoundError(f"No batch {batch_id!r} for this API key's team.", param="batch_id")
        return batch


# -- the input file ---------------------------------------------------------------------------


def _read_lines(content: bytes, endpoint: str) -> tuple[list[_Line], list[dict[str, Any]]]:
    """The file's requests and the errors of its bad lines (OpenAI's batch error codes).

    Blank lines are skipped; line numbers count every line. Each line must be a JSON object
    ``{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {...}}``
    with a ``custom_id`` unique in the file.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        return [], [_error("invalid_file_encoding", "The file is not UTF-8.", line)]
    lines: list[_Line] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(lines) + len(errors) >= MAX_REQUESTS:
            errors.append(
                _error(
                    "too_many_requests",
                    f"A batch holds at most {MAX_REQUESTS} requests; split the file.",
                    number,
                )
            )
            break
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            errors.append(_error("invalid_json_line", "This line is not valid JSON.", number))
            continue
        problem = _line_problem(request, endpoint, seen)
        if problem is not None:
            errors.append({**problem, "line": number})
            continue
        seen[request["custom_id"]] = number
        lines.append(_Line(number, request["custom_id"], request["body"]))
    if not lines and not errors:
        errors.append(_error("empty_file", "The file has no requests."))
    return lines, errors


def _line_problem(request: Any, endpoint: str, seen: Mapping[str, int]) -> dict[str, Any] | None:
    """What is wrong with one parsed line, as an OpenAI batch error (without its line)."""
    if not isinstance(request, dict):
        return _error("invalid_json_line", "Each line must be a JSON object.")
    return _custom_id_problem(request.get("custom_id"), seen) or _call_problem(request, endpoint)


def _custom_id_problem(custom_id: object, seen: Mapping[str, int]) -> dict[str, Any] | None:
    if not isinstance(custom_id, str) or not custom_id:
        return _error(
            "missing_required_parameter", "custom_id must be a non-empty string.", param="custom_id"
        )
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return _error(
            "invalid_value",
            f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters.",
            param="custom_id",
        )
    if custom_id in seen:
        return _error(
            "duplicate_custom_id",
            f"custom_id {custom_id!r} is already used on line {seen[custom_id]}; "
            "each request needs its own.",
            param="custom_id",
        )
    return None


def _call_problem(request: Mapping[str, Any], endpoint: str) -> dict[str, Any] | None:
    if request.get("method") != "POST":
        return _error("invalid_method", "method must be POST.", param="method")
    if request.get("url") != endpoint:
        return _error(
            "mismatched_endpoint",
            f"url is {request.get('url')!r}, but this batch's endpoint is {endpoint!r}; every "
            "line must call the batch's endpoint.",
            param="url",
        )
    if not isinstance(request.get("body"), dict):
        return _error("missing_required_parameter", "body must be a JSON object.", param="body")
    return None


def _error(
    code: str, message: str, line: int | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


# -- the output files (OpenAI's batch output format) ------------------------------------------


def _line_of(job: Job) -> int:
    return int(job.metadata.get("batch_line", "0"))


def _request_ids(job: Job) -> tuple[str, str]:
    """The line's ``id`` (``batch_req_<hex>``, from the job's) and the request id the runner
    gave the job's last attempt (as in the gateway's logs)."""
    return f"batch_req_{job.id.removeprefix('job_')}", f"{job.id}-{job.attempts}"


def _output_line(job: Job) -> dict[str, Any]:
    line_id, request_id = _request_ids(job)
    return {
        "id": line_id,
        "custom_id": job.metadata.get("custom_id"),
        "response": {
            "status_code": 200,
            "request_id": request_id,
            "body": dict(job.result or {}),
        },
        "error": None,
    }


def _expired(job: Job) -> bool:
    return job.status is JobStatus.FAILED and (job.error or {}).get("code") == "expired"


def _error_line(job: Job, *, cancelling: bool) -> dict[str, Any]:
    """A request that answered with an error carries that answer (``response``, its status
    code and OpenAI error body); one that never ran carries ``error`` instead."""
    line_id, request_id = _request_ids(job)
    line: dict[str, Any] = {"id": line_id, "custom_id": job.metadata.get("custom_id")}
    failure = dict(job.error or {})
    if job.status is JobStatus.CANCELLED:
        if cancelling:
            error = _line_error("batch_cancelled", "The batch was cancelled before this ran.")
        else:
            error = _line_error("request_cancelled", f"Job {job.id} was cancelled.")
        return {**line, "response": None, "error": error}
    if _expired(job):
        error = _line_error(
            "batch_expired",
            "This request had not started when the batch's completion window ended.",
        )
        return {**line, "response": None, "error": error}
    if isinstance(failure.get("status"), int):
        error_body = {name: failure.get(name) for name in ("message", "type", "param", "code")}
        response = {
            "status_code": failure["status"],
            "request_id": request_id,
            "body": {"error": error_body},
        }
        return {**line, "response": response, "error": None}
    error = _line_error(
        str(failure.get("code") or "request_failed"),
        str(failure.get("message") or f"Job {job.id} ended {job.status.value}."),
    )
    return {**line, "response": None, "error": error}


def _line_error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _usage(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """OpenAI's batch ``usage``: the tokens of the requests that succeeded."""
    prompt = completion = cached = reasoning = 0
    for result in results:
        usage = _mapping(result.get("usage"))
        prompt += _count(usage, "prompt_tokens")
        completion += _count(usage, "completion_tokens")
        cached += _count(_mapping(usage.get("prompt_tokens_details")), "cached_tokens")
        reasoning += _count(_mapping(usage.get("completion_tokens_details")), "reasoning_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _count(usage: Mapping[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) else 0


def _owns(principal: Principal, team_id: str | None, key_id: str) -> bool:
    if principal.team_id is not None:
        return team_id == principal.team_id
    return team_id is None and key_id == principal.key_id


def _base_name(filename: str) -> str:
    """The name without any directory a client sent (``C:\\x\\in.jsonl`` → ``in.jsonl``)."""
    name = PureWindowsPath(PurePosixPath(filename).name).name
    # It goes back out in a Content-Disposition header: no quotes, no control characters.
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '"\\')
    return name[:255] or "upload.jsonl"
