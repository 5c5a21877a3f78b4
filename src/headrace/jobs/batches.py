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

The lines of the files themselves (reading the input, writing the output and error lines)
are pure functions in :mod:`headrace.jobs.batch_lines`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import orjson

from headrace.domain import Job, JobKind, JobStatus, Principal, Priority
from headrace.errors import ConflictError, HeadraceError, InvalidRequestError, NotFoundError
from headrace.jobs.batch_lines import (
    batch_error,
    batch_usage,
    error_line,
    expired,
    line_number,
    output_line,
    read_lines,
)
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
    "STALE_VALIDATING_S",
    "BatchInputError",
    "BatchService",
]

ENDPOINTS: Mapping[str, JobKind] = {
    "/v1/chat/completions": JobKind.CHAT,
    "/v1/embeddings": JobKind.EMBEDDINGS,
}
COMPLETION_WINDOWS: Mapping[str, float] = {"24h": 86_400.0}  # OpenAI offers only 24h
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
        lines, errors = read_lines(content, endpoint)
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
                errors.append(batch_error(code, exc.message, line.number, param))
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
                errors=[
                    batch_error("submission_failed", "The batch's requests could not be queued.")
                ],
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
                    batch_error(
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
        jobs = sorted(await self._batch_jobs(batch), key=line_number)
        cancelling = batch.status is BatchStatus.CANCELLING
        succeeded = [job for job in jobs if job.status is JobStatus.SUCCEEDED]
        others = [job for job in jobs if job.status is not JobStatus.SUCCEEDED]
        if cancelling:
            status = BatchStatus.CANCELLED
        elif any(expired(job) for job in others):
            status = BatchStatus.EXPIRED
        else:
            status = BatchStatus.COMPLETED
        files: list[NewFile] = []
        output_id = error_id = None
        if succeeded:
            output = self._output_file(batch, "output", (output_line(job) for job in succeeded))
            output_id = output.file.id
            files.append(output)
        if others:
            errors = (error_line(job, cancelling=cancelling) for job in others)
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
            usage=batch_usage(job.result for job in succeeded if job.result is not None),
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
        left, so the loop ends when none is; ``seen`` guards against one that stays). Streams
        following them hear of each page at once (the job watch's nudge)."""
        seen: set[str] = set()
        while True:
            page = await self._batch_jobs(batch, JobStatus.QUEUED, first_page_only=True)
            fresh = [job.id for job in page if job.id not in seen]
            if not fresh:
                return
            for job_id in fresh:
                seen.add(job_id)
                await self._jobs.queue.cancel(job_id)
            self._jobs.nudge(fresh)

    async def _visible(self, principal: Principal, batch_id: str) -> Batch:
        batch = await self._store.get_batch(batch_id)
        if batch is None or not _owns(principal, batch.team_id, batch.key_id):
            raise NotFoundError(f"No batch {batch_id!r} for this API key's team.", param="batch_id")
        return batch


# -- scope and names ------------------------------------------------------------------------


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
