"""Usage while the PostgreSQL server itself stops and starts again: none lost, none doubled.

The tests beside this one cut a proxy in front of the shared server; this one stops a
PostgreSQL server of its own mid-load (:mod:`tests.private_postgres`) and starts it again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from headrace.store.sql import SqlStore
from tests.contract.test_usage_replay_pg import (
    assert_exactly_once,
    finish,
    load,
    until,
    writer_for,
)
from tests.private_postgres import PrivatePostgres


@pytest.fixture
async def sink(private_postgres: PrivatePostgres) -> AsyncIterator[SqlStore]:
    """The writer's store on the private server (migrated)."""
    store = SqlStore(private_postgres.url)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


async def test_the_server_stopped_and_started_mid_load_loses_and_doubles_nothing(
    sink: SqlStore, private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    server = private_postgres
    spool = tmp_path / "spool"
    writer = writer_for(sink, spool)
    await writer.start()
    n = 30_000

    await load(writer, 0, 10_000)
    await until(lambda: writer.pending == 0, 30, "the first records stored")
    server.stop()  # terminates every connection; new ones are refused
    await load(writer, 10_000, 20_000)
    await until(lambda: writer.spooling, 30, "the writer noticed the server stopped")
    server.start()
    await load(writer, 20_000, n)
    await finish(writer, spool)

    assert writer.spooled > 0
    assert writer.replayed >= writer.spooled
    assert writer.unspooled == 0
    counts = SqlStore(server.url, migrate_on_start=False)  # connections of its own
    await counts.start()
    try:
        await assert_exactly_once(counts, n)
    finally:
        await counts.aclose()
