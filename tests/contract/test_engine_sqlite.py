"""The SQLite engine puts a file in WAL mode even while another connection holds its lock.

SQLite refuses that switch at once ("database is locked", no ``busy_timeout`` wait) when a
writer holds the file, which is what gateways, workers or ``headrace migrate`` opening one new
file together run into.
"""

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from headrace.store import engine as engine_module
from headrace.store.engine import create_engine


def _file_held_by_a_writer(path: Path) -> sqlite3.Connection:
    """A rollback-journal database file with a write transaction open on it."""
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("CREATE TABLE t (x INTEGER)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    return writer


async def test_the_switch_to_wal_waits_for_a_writer_to_finish(tmp_path: Path) -> None:
    path = tmp_path / "held.db"
    writer = _file_held_by_a_writer(path)
    asyncio.get_running_loop().call_later(0.2, writer.execute, "COMMIT")
    engine = create_engine(f"sqlite:///{path}")
    try:
        async with engine.connect() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            rows = (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one()
        assert (mode, rows) == ("wal", 1)
    finally:
        await engine.dispose()
        writer.close()


async def test_the_switch_gives_up_after_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "SQLITE_BUSY_TIMEOUT_MS", 100)
    writer = _file_held_by_a_writer(tmp_path / "held.db")
    engine = create_engine(f"sqlite:///{tmp_path / 'held.db'}")
    try:
        with pytest.raises(OperationalError, match="database is locked"):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
        writer.close()
