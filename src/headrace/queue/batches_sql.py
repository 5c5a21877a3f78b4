"""Files and batches in SQL (SQLAlchemy 2 async Core): SQLite embedded, PostgreSQL scaled out.

:class:`SqlBatchStore` implements :class:`~headrace.queue.batch_base.BatchStore` on the
``files`` and ``batches`` tables (revision 0004) and reads the ``jobs`` table for progress.
It is meant to share the job queue's engine (:func:`store_beside`): one pool, one database,
and on SQLite one file whose writers queue on its write lock (``BEGIN IMMEDIATE`` and
``busy_timeout``, as the queue's: see :mod:`headrace.queue.sql`).

Compare-and-set. :meth:`SqlBatchStore.save_batch` is ``UPDATE batches ... WHERE id = :id AND
status = :expect``, then the files' INSERT only if a row was updated, in one transaction: a
batch finalized by two processes at once gets one set of output files.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Row, Table, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from headrace.domain import JobStatus
from headrace.queue.base import JobQueue
from headrace.queue.batch_base import Batch, BatchStatus, NewFile, RequestCounts, StoredFile
from headrace.queue.sql import SqlJobQueue
from headrace.queue.sql_rows import dumps
from headrace.store.engine import SQLITE_BEGIN_IMMEDIATE, create_engine, is_sqlite
from headrace.store.schema import batches, jobs
from headrace.store.schema import files as files_table

__all__ = ["SqlBatchStore", "store_beside"]

# Every column but the bytes: what listing and looking at files reads.
_FILE_COLUMNS = [c for c in files_table.c if c.name != "content"]


class SqlBatchStore:
    """Files and batches in the store's SQL database (see the module docstring).

    ``engine_or_url``: an engine made by :func:`headrace.store.engine.create_engine` and
    shared (not disposed here), or an async URL (its own engine, disposed in
    :meth:`aclose`). The schema is the migrations' (the store's or the queue's start, or
    ``headrace migrate``): this class neither creates nor checks it.
    """

    def __init__(self, engine_or_url: AsyncEngine | str) -> None:
        if isinstance(engine_or_url, str):
            self._engine = create_engine(engine_or_url)
            self._owns_engine = True
        else:
            self._engine = engine_or_url
            self._owns_engine = False
        self._writer = self._engine.execution_options(**SQLITE_BEGIN_IMMEDIATE)
        self._write_lock = asyncio.Lock() if is_sqlite(self._engine.url) else None

    async def aclose(self) -> None:
        if self._owns_engine:
            await self._engine.dispose()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        if self._write_lock is None:
            async with self._engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._writer.begin() as conn:
            yield conn

    # -- files --------------------------------------------------------------------------------

    async def put_file(self, new: NewFile) -> None:
        async with self._write() as conn:
            await conn.execute(insert(files_table).values(_file_row(new)))

    async def get_file(self, file_id: str) -> StoredFile | None:
        async with self._engine.connect() as conn:
            query = select(*_FILE_COLUMNS).where(files_table.c.id == file_id)
            row = (await conn.execute(query)).first()
        return None if row is None else _row_to_file(row)

    async def file_content(self, file_id: str) -> bytes | None:
        async with self._engine.connect() as conn:
            query = select(files_table.c.content).where(files_table.c.id == file_id)
            content = await conn.scalar(query)
        return None if content is None else bytes(content)

    async def list_files(
        self,
        *,
        team_id: str | None,
        key_id: str | None = None,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> list[StoredFile]:
        filters = _scope(files_table, team_id, key_id)
        if purpose is not None:
            filters.append(files_table.c.purpose == purpose)
        async with self._engine.connect() as conn:
            rows = await _page(conn, files_table, _FILE_COLUMNS, filters, after=after, limit=limit)
        return [_row_to_file(row) for row in rows]

    async def delete_file(self, file_id: str) -> bool:
        async with self._write() as conn:
            result = await conn.execute(delete(files_table).where(files_table.c.id == file_id))
        return bool(result.rowcount)

    # -- batches ------------------------------------------------------------------------------

    async def put_batch(self, batch: Batch) -> None:
        async with self._write() as conn:
            await conn.execute(insert(batches).values(_batch_row(batch)))

    async def get_batch(self, batch_id: str) -> Batch | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(batches).where(batches.c.id == batch_id))).first()
        return None if row is None else _row_to_batch(row)

    async def list_batches(
        self,
        *,
        team_id: str | None,
        key_id: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> list[Batch]:
        filters = _scope(batches, team_id, key_id)
        async with self._engine.connect() as conn:
            rows = await _page(conn, batches, list(batches.c), filters, after=after, limit=limit)
        return [_row_to_batch(row) for row in rows]

    async def save_batch(
        self, batch: Batch, *, expect: BatchStatus, files: Sequence[NewFile] = ()
    ) -> bool:
        values = _batch_row(batch)
        for fixed in ("id", "team_id", "key_id", "created_at"):
            del values[fixed]
        async with self._write() as conn:
            result = await conn.execute(
                update(batches)
                .where(batches.c.id == batch.id, batches.c.status == expect.value)
                .values(values)
            )
            if not result.rowcount:
                return False
            if files:
                await conn.execute(insert(files_table), [_file_row(new) for new in files])
        return True

    async def job_counts(self, batch_id: str) -> Mapping[JobStatus, int]:
        """One ``GROUP BY`` over ``ix_jobs_batch_id``: no job body or result is read."""
        c = jobs.c
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(c.status, func.count()).where(c.batch_id == batch_id).group_by(c.status)
            )
            return {JobStatus(status): int(count) for status, count in result}


def store_beside(queue: JobQueue) -> SqlBatchStore:
    """A batch store on ``queue``'s database, sharing its engine (the queue disposes it).

    The batch's rows must live where its jobs live: :meth:`SqlBatchStore.job_counts` reads
    the ``jobs`` table. Only the SQL queue exists today; another backend needs its own store.
    """
    if not isinstance(queue, SqlJobQueue):
        raise TypeError(f"batches need the SQL job queue, not {type(queue).__name__}")
    return SqlBatchStore(queue.engine)


def _scope(table: Table, team_id: str | None, key_id: str | None) -> list[ColumnElement[bool]]:
    c = table.c
    filters: list[ColumnElement[bool]] = [
        c.team_id.is_(None) if team_id is None else c.team_id == team_id
    ]
    if key_id is not None:
        filters.append(c.key_id == key_id)
    return filters


async def _page(
    conn: AsyncConnection,
    table: Table,
    columns: Sequence[Any],
    filters: list[ColumnElement[bool]],
    *,
    after: str | None,
    limit: int,
) -> list[Row[Any]]:
    """Rows newest first (``created_at DESC, id DESC``), after the row ``after`` when given
    (an id outside ``filters`` gives an empty page)."""
    c = table.c
    if after is not None:
        cursor = (await conn.execute(select(c.created_at).where(c.id == after, *filters))).first()
        if cursor is None:
            return []
        filters = [
            *filters,
            or_(
                c.created_at < cursor.created_at,
                (c.created_at == cursor.created_at) & (c.id < after),
            ),
        ]
    result = await conn.execute(
        select(*columns)
        .where(*filters)
        .order_by(c.created_at.desc(), c.id.desc())
        .limit(max(limit, 0))
    )
    return list(result)


def _file_row(new: NewFile) -> dict[str, Any]:
    f = new.file
    return {
        "id": f.id,
        "team_id": f.team_id,
        "key_id": f.key_id,
        "purpose": f.purpose,
        "filename": f.filename,
        "bytes": int(f.bytes),
        "created_at": float(f.created_at),
        "content": new.content,
    }


def _row_to_file(row: Row[Any]) -> StoredFile:
    return StoredFile(
        id=row.id,
        key_id=row.key_id,
        team_id=row.team_id,
        purpose=row.purpose,
        filename=row.filename,
        bytes=row.bytes,
        created_at=row.created_at,
    )


def _batch_row(batch: Batch) -> dict[str, Any]:
    counts = batch.request_counts
    return {
        "id": batch.id,
        "team_id": batch.team_id,
        "key_id": batch.key_id,
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status.value,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "failed_at": batch.failed_at,
        "expired_at": batch.expired_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "expires_at": batch.expires_at,
        "total": counts.total,
        "completed": counts.completed,
        "failed": counts.failed,
        "metadata": dumps(dict(batch.metadata)),
        "errors": None if batch.errors is None else dumps([dict(e) for e in batch.errors]),
        "usage": None if batch.usage is None else dumps(dict(batch.usage)),
    }


def _row_to_batch(row: Row[Any]) -> Batch:
    return Batch(
        id=row.id,
        key_id=row.key_id,
        team_id=row.team_id,
        endpoint=row.endpoint,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=BatchStatus(row.status),
        created_at=row.created_at,
        expires_at=row.expires_at,
        request_counts=RequestCounts(total=row.total, completed=row.completed, failed=row.failed),
        metadata=orjson.loads(row.metadata),
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        in_progress_at=row.in_progress_at,
        finalizing_at=row.finalizing_at,
        completed_at=row.completed_at,
        failed_at=row.failed_at,
        expired_at=row.expired_at,
        cancelling_at=row.cancelling_at,
        cancelled_at=row.cancelled_at,
        errors=None if row.errors is None else orjson.loads(row.errors),
        usage=None if row.usage is None else orjson.loads(row.usage),
    )
