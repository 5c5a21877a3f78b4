"""The async engine the SQL store and the migrations share: SQLite (WAL) or PostgreSQL.

SQLite goes through aiosqlite with the WAL journal (readers never wait for the writer) and
real transactions: pysqlite's legacy mode would run DDL outside any transaction, so a
migration that failed half way would leave a half-changed schema behind. PostgreSQL goes
through psycopg 3.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

# Execution options for a connection whose transaction writes first thing (migrations): on
# SQLite it takes the write lock at BEGIN, so two of them queue instead of one failing with
# "database is locked" half way. Ignored by PostgreSQL.
SQLITE_BEGIN_IMMEDIATE = {"sqlite_begin": "BEGIN IMMEDIATE"}

SQLITE_BUSY_TIMEOUT_MS = 5000  # how long a SQLite statement waits for another's lock
WAL_RETRY_S = 0.01

PING_AFTER_IDLE_S = 2.0  # a pooled PostgreSQL connection idle this long is pinged before use

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg"}


def async_url(url: str) -> URL:
    """``url`` with the async driver Headrace uses when none is named.

    ``postgresql://`` (and ``postgres://``) become ``postgresql+psycopg://``, ``sqlite://``
    becomes ``sqlite+aiosqlite://``; a URL that names a driver is kept as it is.
    """
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    parsed = make_url(url)
    if "+" not in parsed.drivername and parsed.drivername in _ASYNC_DRIVERS:
        parsed = parsed.set(drivername=_ASYNC_DRIVERS[parsed.drivername])
    return parsed


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def create_engine(url: str) -> AsyncEngine:
    """An engine for ``url``; for a SQLite file, its directory is created if missing."""
    parsed = async_url(url)
    if not is_sqlite(parsed):
        engine = create_async_engine(parsed)
        event.listen(engine.sync_engine, "checkin", _mark_idle)
        event.listen(engine.sync_engine, "checkout", _pinger(engine.sync_engine.dialect))
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(parsed)
    event.listen(engine.sync_engine, "connect", _sqlite_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def _mark_idle(_dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        record.info["idle_since"] = time.monotonic()


def _pinger(dialect: Dialect) -> Callable[[Any, Any, Any], None]:
    """The checkout hook: a pre-ping, but only of a connection that sat in the pool for
    ``PING_AFTER_IDLE_S``.

    SQLAlchemy's ``pool_pre_ping`` costs a ``SELECT 1`` round trip on every checkout: a
    fifth of a busy job worker's transactions. A connection used moments ago is alive or its
    failure is caught where it is used (the error invalidates the pool, and every caller
    retries or answers 503); one that waited longer (a database restart, a firewall that
    drops idle connections) is checked first, and replaced if dead. The ping is the
    dialect's own (``do_ping``), which leaves no transaction open: a bare ``SELECT 1`` on
    psycopg would, and the next user could then not switch the connection to autocommit
    (the job queue's one-statement calls do).
    """

    def ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError(f"stale pooled connection: {exc!r}") from exc

    return ping_if_idle


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy's documented recipe for transactional DDL on (aio)sqlite: switch the driver's
    # own transaction handling off and emit BEGIN ourselves (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """Put the database file in WAL mode, waiting for others that open it at the same time.

    The switch needs the file's exclusive lock. SQLite answers "database is locked" at once,
    without waiting out ``busy_timeout``, when this connection read the file while another
    holds the write lock (waiting could deadlock), which is what several engines or processes
    opening a new file together run into. So a locked switch is retried, sleeping on the
    event loop between tries, until another connection has made the file WAL or
    ``busy_timeout`` has passed.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        cursor.execute("PRAGMA journal_mode")
        if str(cursor.fetchone()[0]).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        await_only(asyncio.sleep(WAL_RETRY_S))  # the connect event runs in SQLAlchemy's greenlet


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))
