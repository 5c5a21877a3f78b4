"""The batch seam: OpenAI Batch API files and batches, stored beside the job queue.

A batch is a row that points at its input file; each of its requests is an ordinary job
(``Job.batch_id``) that the job queue stores, runs, retries and dead-letters like any other.
:class:`BatchStore` keeps the rest: uploaded and generated files (bytes included), the batch
rows, and a cheap count of a batch's jobs by status for progress.

One backend: :mod:`headrace.queue.batches_sql` (SQLite embedded, PostgreSQL scaled out), on
the job queue's own database. Status changes are compare-and-set on the stored status
(:meth:`BatchStore.save_batch`), so two processes that refresh one batch at the same moment
cannot both finalize it: the loser's write, output files included, does not happen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from headrace.domain import JobStatus


class BatchStatus(StrEnum):
    """OpenAI's batch statuses. ``finalizing`` is never stored: a batch's output files and
    its final status are written in one transaction (``finalizing_at`` is still set)."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file's description; its bytes are read separately (:meth:`BatchStore.file_content`)
    so that listing files never loads them."""

    id: str  # "file-<hex>"
    key_id: str
    team_id: str | None
    purpose: str  # "batch" (uploads), "batch_output" (what a batch writes)
    filename: str
    bytes: int
    created_at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class RequestCounts:
    """``completed``: requests that succeeded (output file); ``failed``: requests that
    failed, expired or were cancelled (error file). Once final, they add up to ``total``."""

    total: int
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch. Times are unix seconds (None until the batch gets there)."""

    id: str  # "batch_<hex>"
    key_id: str
    team_id: str | None
    endpoint: str  # "/v1/chat/completions" or "/v1/embeddings"
    input_file_id: str
    completion_window: str  # "24h"
    status: BatchStatus
    created_at: float
    expires_at: float
    request_counts: RequestCounts
    metadata: Mapping[str, str] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    # OpenAI batch errors ({code, message, param, line}) when the batch itself failed.
    errors: Sequence[Mapping[str, Any]] | None = None
    usage: Mapping[str, Any] | None = None  # OpenAI's batch usage, once the batch ended


@dataclass(frozen=True, slots=True)
class NewFile:
    """A file to store with its bytes."""

    file: StoredFile
    content: bytes


class BatchStore(Protocol):
    """Files and batches (see the module docstring). Scoping is the caller's: every method
    takes or returns whole rows, and :class:`~headrace.jobs.batches.BatchService` checks that
    the caller's team owns them."""

    # -- files --------------------------------------------------------------------------------

    async def put_file(self, new: NewFile) -> None: ...

    async def get_file(self, file_id: str) -> StoredFile | None: ...

    async def file_content(self, file_id: str) -> bytes | None: ...

    async def list_files(
        self,
        *,
        team_id: str | None,
        key_id: str | None = None,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> list[StoredFile]:
        """Newest first, as :meth:`JobQueue.list_jobs` (``team_id=None``: keys without a team,
        narrowed to ``key_id``); ``after`` is the last id of the previous page."""
        ...

    async def delete_file(self, file_id: str) -> bool: ...

    # -- batches ------------------------------------------------------------------------------

    async def put_batch(self, batch: Batch) -> None: ...

    async def get_batch(self, batch_id: str) -> Batch | None: ...

    async def list_batches(
        self,
        *,
        team_id: str | None,
        key_id: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> list[Batch]:
        """Newest first, scoped and paged as :meth:`list_files`."""
        ...

    async def save_batch(
        self, batch: Batch, *, expect: BatchStatus, files: Sequence[NewFile] = ()
    ) -> bool:
        """Write ``batch`` over the stored one if that one's status is still ``expect``, and
        store ``files`` in the same transaction; False (nothing written) when it is not."""
        ...

    async def job_counts(self, batch_id: str) -> Mapping[JobStatus, int]:
        """How many of the batch's jobs are in each status (absent: none)."""
        ...
