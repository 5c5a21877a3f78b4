"""The access log: one JSON line per request, written without a flush per line.

structlog writes and flushes every line, which measured about 25 µs per request in the
gateway, a quarter of a cache hit's time. Access lines are the hot log: they are rendered
with orjson in the same shape as structlog's JSON lines (``event``, ``level``, ``timestamp``,
then the fields) into the process's buffered stdout, and flushed at most ``flush_interval_s``
later (and when the process stops). Other logs keep going through structlog.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from typing import BinaryIO

import orjson


class AccessLog:
    def __init__(self, stream: BinaryIO | None = None, *, flush_interval_s: float = 0.2) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._interval = flush_interval_s
        self._pending: asyncio.TimerHandle | None = None

    def write(self, fields: dict[str, object]) -> None:
        line = {
            "event": "request",
            "level": "info",
            "timestamp": datetime.now(UTC).isoformat(),
            **fields,
        }
        self._stream.write(orjson.dumps(line) + b"\n")
        if self._pending is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._pending = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        self._pending = None
        self._stream.flush()
