"""The usage writer: one record per request, off the request path, never lost, never doubled.

``record()`` runs on the request path and only appends to a deque. One background task takes
batches from it and hands them to the sink (the store's ``write_usage``). While the sink fails
(database down, slow, timing out), batches go to a spool of append-only JSON-lines files
instead, and the spool is replayed once a retry succeeds.

Exactly once, end to end:

- a record's ``id`` is made once per request, before the record reaches the writer, and
  travels with it into the spool and back;
- the sink inserts only ids it has not stored and adds only the rows it inserted to the
  per-day aggregates, in the same transaction (see ``UsageStore.write_usage``): a record
  written twice is stored and counted once;
- so every doubt resolves by writing again: a batch whose write timed out (perhaps after its
  commit) is spooled and replayed, and a replay cut short by a crash starts the file again;
- a spool file is deleted only after every record in it was written.

Never lost: a batch that the sink refuses is appended to the spool and fsynced before the
writer moves on; a record that finds the buffer full (``max_buffer``) is appended to the spool
by ``record()`` itself and fsynced on the task's next tick; a record that even the spool
cannot take is logged as an error with the record as JSON (``usage_record_unspooled``), to be
recovered from the logs. ``aclose()`` empties the buffer into the sink or the spool. What a
crash of the process can lose is what is still only in memory: the buffer, normally one
flush interval of records. That is the price of keeping the database off the request path.

Spool files are named ``usage-<UTC time>-<pid>-<seq>.jsonl``: sortable, and distinct per
process, so processes sharing a data directory never write to the same file. A writer holds an
exclusive ``flock`` on the file it appends to, and replay takes the same lock before reading a
file: files that another live process writes or replays are skipped, and the files of a
process that ended (crashed, or stopped while the database was down) are replayed by the next
writer started on the directory. A torn last line (a write cut by a crash) is skipped with a
warning; it never reached the spool's fsync, so its record was still only in memory. The files
themselves (appending, fsync, locking, reading back) are :mod:`headrace.accounting.spool`.

Call ``record()`` on the event loop's thread: the writer is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import orjson
import structlog

from headrace.accounting.spool import Spool, decode, encode, load, remove
from headrace.domain import UsageRecord

log = structlog.get_logger("headrace")


class UsageSink(Protocol):
    """Where usage records go: the store's usage seam (structural, so no import of it)."""

    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        """Store the records whose ids are new, in one transaction; return how many were new.

        Must be idempotent by ``UsageRecord.id``: the writer writes a batch again whenever it
        could not see the outcome of a write.
        """
        ...


class UsageWriter:
    """Batches usage records to a sink, spooling to disk while the sink fails.

    ``batch_size``: records per ``write_usage`` call. ``flush_interval_s``: longest a record
    waits in memory while the sink is up. ``max_buffer``: records held in memory; beyond that,
    ``record()`` appends to the spool. ``retry_interval_s``: first wait before the sink is tried
    again after a failure, doubled per failed retry up to ``max_retry_interval_s``.
    ``write_timeout_s``: a sink call that takes longer counts as failed. ``close_timeout_s``:
    how long ``aclose()`` gives the sink before it spools the rest. ``spool_file_bytes``: a
    spool file is closed after about this size, so a replay deletes as it goes.

    Counters (records): ``written`` to the sink from memory, ``spooled`` to the spool,
    ``replayed`` from the spool to the sink, ``unspooled`` logged because the spool failed.
    """

    def __init__(
        self,
        sink: UsageSink,
        spool_dir: Path,
        *,
        batch_size: int = 2000,
        flush_interval_s: float = 1.0,
        max_buffer: int = 100_000,
        retry_interval_s: float = 1.0,
        max_retry_interval_s: float = 30.0,
        write_timeout_s: float = 10.0,
        close_timeout_s: float = 10.0,
        spool_file_bytes: int = 16 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._spool = Spool(spool_dir, spool_file_bytes)
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._max_buffer = max_buffer
        self._retry_interval_s = retry_interval_s
        self._max_retry_interval_s = max_retry_interval_s
        self._write_timeout_s = write_timeout_s
        self._close_timeout_s = close_timeout_s
        self._clock = clock

        self._buffer: deque[UsageRecord] = deque()
        self._inflight: list[UsageRecord] = []  # taken from the buffer, not yet stored anywhere
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._abandoned: set[asyncio.Future[int]] = set()  # timed-out writes still cleaning up
        self._spooling = False  # the sink failed: batches go to the spool until a retry works
        self._replay_due = True  # the spool may hold files (a previous run's, at first)
        self._retry_at = 0.0
        self._backoff = retry_interval_s
        self._closing = False
        self._close_deadline = 0.0
        self._close_recovery_tried = False
        self._closed = False
        self._close_lock = asyncio.Lock()

        self.written = 0
        self.spooled = 0
        self.replayed = 0
        self.unspooled = 0

    @property
    def pending(self) -> int:
        """Records only in memory: buffered, or taken for a write that has not finished."""
        return len(self._buffer) + len(self._inflight)

    @property
    def spooling(self) -> bool:
        """True while the sink is failing and records go to the spool (a degraded state)."""
        return self._spooling

    @property
    def flush_interval_s(self) -> float:
        return self._flush_interval_s

    @property
    def spool_dir(self) -> Path:
        return self._spool.directory

    def record(self, record: UsageRecord) -> None:
        """Take one record. O(1), never awaits; does I/O only when the buffer is full."""
        buffer = self._buffer
        if len(buffer) < self._max_buffer and not self._closed:
            buffer.append(record)
            if len(buffer) >= self._batch_size:
                self._wakeup.set()
            return
        if self._closed:
            log.warning("usage_record_after_close", record_id=record.id, hint="spooled")
        self._spill([record])

    async def start(self) -> None:
        """Start the background task; it first replays what a previous run left in the spool."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="headrace-usage-writer"
            )

    async def flush(self) -> None:
        """Write what is buffered now to the sink (or the spool, if that fails); return after.

        For tests and for reads that must see every record so far (usage right now).
        """
        if self._task is None or self._task.done():
            await self._drain()
            if self._spool.dirty:
                await self._sync()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(waiter)
        self._wakeup.set()
        await waiter

    async def aclose(self) -> None:
        """Write what is in memory to the sink (or the spool, if that fails) and stop."""
        async with self._close_lock:
            if not self._closed:
                await self._close()

    async def _close(self) -> None:
        self._closing = True
        self._close_deadline = self._clock() + self._close_timeout_s
        self._wakeup.set()
        try:
            if self._task is not None:
                await asyncio.shield(self._task)
            else:
                await self._drain()
        except asyncio.CancelledError:
            # The task may still be syncing the current file: fsync it here, but leave it open.
            self._closed = True
            self._spill_memory(close=False)
            raise
        self._closed = True
        self._spill_memory()  # anything recorded while the task finished
        try:
            await self._spool.close()
        except OSError as exc:
            log.error("usage_spool_close_failed", error=repr(exc))
        if self._abandoned:  # their batches are spooled; let them release their connections
            await asyncio.wait(
                self._abandoned, timeout=max(0.0, self._close_deadline - self._clock())
            )

    # -- the background task ----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                await self._tick()
                if self._closing and not self._buffer:
                    return
        finally:
            self._release(self._flush_waiters)

    async def _tick(self) -> None:
        waiters: list[asyncio.Future[None]] = []
        try:
            await self._wait()
            if self._replay_due and self._recovery_due():
                await self._recover()
            waiters, self._flush_waiters = self._flush_waiters, []
            await self._drain()
            if self._spool.dirty:
                await self._sync()
        except Exception:  # a bug here must not stop the writer: memory would only grow
            log.exception("usage_writer_error")
            await asyncio.sleep(self._flush_interval_s)
        finally:
            self._release(waiters)

    def _recovery_due(self) -> bool:
        """Time to try the sink again: at the retry time, or once more when closing (a clean
        shutdown writes to the database if it is back, within ``close_timeout_s``, rather
        than leaving everything in the spool until the next start)."""
        if not self._closing:
            return self._clock() >= self._retry_at
        if self._close_recovery_tried:
            return False
        self._close_recovery_tried = True
        return True

    @staticmethod
    def _release(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        if self._closing or self._flush_waiters or len(self._buffer) >= self._batch_size:
            return
        timeout = self._flush_interval_s
        if self._replay_due:
            timeout = max(0.0, min(timeout, self._retry_at - self._clock()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        self._wakeup.clear()

    async def _drain(self) -> None:
        """Write what is buffered now (not what arrives meanwhile) in batches."""
        remaining = len(self._buffer)
        while remaining > 0 and self._buffer:
            if self._closing and not self._spooling and self._clock() >= self._close_deadline:
                log.warning("usage_close_timeout", pending=len(self._buffer))
                self._spooling = True
            batch = self._take()
            remaining -= len(batch)
            if self._spooling:
                await self._to_spool(batch)
            else:
                await self._to_sink(batch)

    def _take(self) -> list[UsageRecord]:
        popleft = self._buffer.popleft
        self._inflight = [popleft() for _ in range(min(self._batch_size, len(self._buffer)))]
        return self._inflight

    async def _to_sink(self, batch: list[UsageRecord]) -> None:
        if not await self._write(batch):
            self._enter_spooling()
            await self._to_spool(batch)
            return
        self._inflight = []
        self.written += len(batch)

    async def _write(self, batch: Sequence[UsageRecord]) -> bool:
        timeout = self._write_timeout_s
        if self._closing:
            timeout = max(0.0, min(timeout, self._close_deadline - self._clock()))
        # The write runs as its own task so that a timeout takes effect on time: a cancelled
        # driver may spend seconds cleaning up (psycopg tries to cancel the query on the
        # server, up to 10 s against a database that does not answer). That clean-up goes on
        # in the background; if the batch commits after all, its replay inserts nothing.
        write = asyncio.ensure_future(self._sink.write_usage(batch))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(write)
        except Exception as exc:  # any failure of the sink: the batch goes to the spool
            if not write.done():
                write.cancel()
                self._abandoned.add(write)
                write.add_done_callback(self._forget)
            log.warning("usage_sink_failed", error=repr(exc), records=len(batch))
            return False
        self._backoff = self._retry_interval_s
        return True

    def _forget(self, write: asyncio.Future[int]) -> None:
        self._abandoned.discard(write)
        if not write.cancelled() and write.exception() is not None:
            log.debug("usage_abandoned_write_failed", error=repr(write.exception()))

    def _enter_spooling(self) -> None:
        if not self._spooling:
            log.warning(
                "usage_spooling", spool_dir=str(self._spool.directory), retry_in_s=self._backoff
            )
        self._spooling = True
        self._replay_due = True
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, self._max_retry_interval_s)

    async def _to_spool(self, batch: list[UsageRecord]) -> None:
        try:
            self._spool.append(encode(batch))
        except OSError as exc:
            self._inflight = []
            self._lost(batch, exc)
            return
        self._inflight = []
        self.spooled += len(batch)
        self._replay_due = True
        await self._sync()

    async def _sync(self) -> None:
        try:
            await self._spool.sync()
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the pages: the file is retired
            # (replaying what did reach the disk is harmless) and the failure is loud.
            log.error("usage_spool_sync_failed", error=repr(exc))

    def _spill(self, records: list[UsageRecord], *, close: bool = True) -> None:
        """Append to the spool from outside the task (buffer full, or after close).

        Once closed, no task is left to fsync: the file is fsynced here, and closed too
        (``close``) so that the next writer on the directory can replay it.
        """
        try:
            self._spool.append(encode(records))
            if self._closed:
                self._spool.sync_now(close=close)
        except OSError as exc:
            self._lost(records, exc)
            return
        self.spooled += len(records)
        self._replay_due = True

    def _spill_memory(self, *, close: bool = True) -> None:
        records = [*self._inflight, *self._buffer]
        self._inflight = []
        self._buffer.clear()
        if records:
            self._spill(records, close=close)

    def _lost(self, records: Iterable[UsageRecord], exc: OSError) -> None:
        for record in records:
            self.unspooled += 1
            line = orjson.dumps(record._asdict()).decode()
            log.error("usage_record_unspooled", error=repr(exc), record=line)

    # -- replay -----------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Replay every closed spool file; leave spooling mode as soon as the sink takes one."""
        self._replay_due = False  # a spill from now on sets it again
        try:
            await self._spool.rotate()
        except OSError as exc:
            log.error("usage_spool_sync_failed", error=repr(exc))
        for path in self._spool.closed_files():
            if not await self._replay_file(path):
                self._replay_due = True
                return
        self._spooling = False
        self._retry_at = self._clock() + self._retry_interval_s

    async def _replay_file(self, path: Path) -> bool:
        """Write one file's records to the sink and delete it; False if that stopped short."""
        claimed = await load(path)
        if claimed is None:
            return True  # another process writes or replays it, or it is gone
        fd, lines = claimed
        try:
            count = 0
            for start in range(0, len(lines), self._batch_size):
                if self._closing and self._clock() >= self._close_deadline:
                    return False
                batch = decode(path, lines[start : start + self._batch_size], start)
                if batch:
                    if not await self._write(batch):
                        self._enter_spooling()
                        return False
                    self._spooling = False
                    self.replayed += len(batch)
                    count += len(batch)
                if self._buffer:  # keep new records moving meanwhile (to the sink, if it is up)
                    await self._drain()
                    if self._spooling:
                        return False
            remove(path)
        finally:
            os.close(fd)
        log.info("usage_spool_replayed", file=path.name, records=count)
        return True
