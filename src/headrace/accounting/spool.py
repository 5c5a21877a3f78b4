"""The usage writer's spool: append-only JSON-lines files of usage records, one directory.

:class:`~headrace.accounting.usage.UsageWriter` appends a batch here whenever the store cannot
take it (and a record that finds its buffer full), fsyncs off the event loop, and replays the
closed files once the store is back. What makes that exactly once across processes sharing a
directory (names, ``flock``, torn lines) is described in :mod:`headrace.accounting.usage`.

- :class:`Spool`: the file this process appends to, and the files it has closed.
- :func:`encode` and :func:`decode`: records to lines and back (a bad line is logged, not
  raised).
- :func:`load`: a closed file, locked, and its lines; :func:`remove` once it is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson
import structlog

from headrace.domain import UsageRecord

__all__ = ["Spool", "decode", "encode", "load", "remove"]

log = structlog.get_logger("headrace")

_PREFIX = "usage-"
_SUFFIX = ".jsonl"


class Spool:
    """Append-only JSON-lines files in one directory; one open file per process at a time.

    ``append`` runs on the event loop (a write to the page cache); ``sync`` fsyncs and closes
    retired files in a worker thread. Only one coroutine at a time may call ``sync``, ``rotate``
    and ``close`` (the writer's task, then ``aclose``), so no file is closed while it syncs.
    """

    def __init__(self, directory: Path, max_file_bytes: int) -> None:
        self.directory = directory
        self._max_file_bytes = max_file_bytes
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._dirty = False  # written since the last fsync
        self._new_entry = False  # a file was created since the last fsync of the directory
        self._retired: list[tuple[int, Path]] = []  # to fsync and close
        self._seq = 0
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def dirty(self) -> bool:
        return self._dirty or bool(self._retired)

    def append(self, payload: bytes) -> None:
        """Write whole lines to the current file, opening one first if needed (no fsync)."""
        if self._fd is None:
            self._open()
        fd = self._fd
        assert fd is not None
        self._dirty = True
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            self._retire()  # a partial line stays alone at the end of that file
            raise
        self._size += len(payload)
        if self._size >= self._max_file_bytes:
            self._retire()

    async def sync(self) -> None:
        """fsync what was appended (and a new file's directory entry); close retired files."""
        current = self._fd if self._dirty else None
        retired, self._retired = self._retired, []
        directory = self.directory if self._new_entry else None
        self._dirty = self._new_entry = False
        if current is None and not retired and directory is None:
            return
        try:
            await asyncio.to_thread(_fsync, current, [fd for fd, _ in retired], directory)
        except OSError:
            if current is not None and current == self._fd:
                self._retire()
            raise

    def sync_now(self, *, close: bool) -> None:
        """fsync (and ``close``) the current file on this thread: no task is left to do it."""
        fd = self._fd
        if fd is None:
            return
        if close:
            self._fd = self._path = None
        try:
            os.fsync(fd)
        finally:
            if close:
                os.close(fd)

    async def rotate(self) -> None:
        """Close the current file, so that it can be replayed and new lines go to a new one."""
        self._retire()
        await self.sync()

    async def close(self) -> None:
        await self.rotate()

    def closed_files(self) -> list[Path]:
        """Spool files, oldest first, except the one this process appends to."""
        own = {path for _, path in self._retired}
        if self._path is not None:
            own.add(self._path)
        return sorted(p for p in self.directory.glob(f"{_PREFIX}*{_SUFFIX}") if p not in own)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{_PREFIX}{stamp}-{os.getpid()}-{self._seq:06d}{_SUFFIX}"
        # Created under a name replay ignores, locked, then renamed: replay never sees the file
        # unlocked while this process still means to write to it.
        temporary = self.directory / f".{name}.new"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            temporary.rename(self.directory / name)
        except OSError:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        self._fd, self._path, self._size = fd, self.directory / name, 0
        self._new_entry = True

    def _retire(self) -> None:
        if self._fd is not None and self._path is not None:
            self._retired.append((self._fd, self._path))
        self._fd = self._path = None
        self._size = 0


def encode(records: Iterable[UsageRecord]) -> bytes:
    """One JSON object per line (``orjson`` refuses the named tuple itself)."""
    return b"".join(orjson.dumps(r._asdict(), option=orjson.OPT_APPEND_NEWLINE) for r in records)


def _fsync(current: int | None, retired: Sequence[int], directory: Path | None) -> None:
    try:
        for fd in retired:
            os.fsync(fd)
        if current is not None:
            os.fsync(current)
        if directory is not None:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        for fd in retired:
            with contextlib.suppress(OSError):
                os.close(fd)


async def load(path: Path) -> tuple[int, list[bytes]] | None:
    """A locked descriptor on ``path`` and its lines; None if it is locked elsewhere or gone.

    An unreadable file is logged and left where it is.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("usage_spool_unreadable", file=str(path), error=repr(exc))
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_nlink == 0:  # replayed and deleted while this opened it
            os.close(fd)
            return None
        data = await asyncio.to_thread(_read_all, fd)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        log.error("usage_spool_unreadable", file=str(path), error=repr(exc))
        return None
    return fd, _lines(path, data)


def _read_all(fd: int) -> bytes:
    with os.fdopen(os.dup(fd), "rb") as file:
        return file.read()


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _lines(path: Path, data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        log.warning(
            "usage_spool_torn_line",
            file=path.name,
            line=tail.decode("utf-8", "replace"),
            hint="a write cut short by a crash; its record had not been fsynced",
        )
    return lines


def decode(path: Path, lines: Sequence[bytes], first_line: int) -> list[UsageRecord]:
    records = []
    for number, line in enumerate(lines, start=first_line + 1):
        if not line:
            continue
        try:
            records.append(UsageRecord(**orjson.loads(line)))
        except (ValueError, TypeError) as exc:  # not JSON, or not a record's fields
            log.error(
                "usage_spool_bad_line",
                file=path.name,
                line_number=number,
                line=line.decode("utf-8", "replace"),
                error=repr(exc),
            )
    return records
