"""Usage through a PostgreSQL outage: every record stored once, none lost, none doubled.

The writer's store reaches PostgreSQL through a TCP proxy (:mod:`tests.fakes.tcp_proxy`).
Mid-load the proxy is cut (connections reset, new ones refused) or stalled (connections open,
nothing gets through); records keep coming; then it is restored. The counts are read over a
direct connection: the stored records and the per-day aggregates' request totals must both
equal the number of records handed to ``record()``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from headrace.accounting.usage import UsageWriter
from headrace.domain import UsageRecord
from headrace.store.sql import SqlStore
from tests.fakes.tcp_proxy import TcpProxy

DAY = 1_780_000_000.0


def make_record(i: int) -> UsageRecord:
    return UsageRecord(
        id=f"rec-{i:08d}",
        request_id=f"req-{i}",
        created_at=DAY + i % 7 * 86_400,  # a week of days
        operation="chat",
        key_id=f"key-{i % 5}",
        team_id=f"team-{i % 2}" if i % 3 else None,
        model=("gpt-a", "gpt-b")[i % 2],
        requested_model="gpt-a",
        deployment="d1",
        prompt_tokens=100,
        completion_tokens=20,
        cost_micro_usd=30,
        baseline_cost_micro_usd=30,
    )


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


@dataclass
class Rig:
    direct: SqlStore  # straight to PostgreSQL: the counts
    proxied: SqlStore  # through the proxy: the writer's sink
    proxy: TcpProxy


@pytest.fixture
async def rig(fresh_database_url: str) -> AsyncIterator[Rig]:
    direct = SqlStore(fresh_database_url)
    await direct.start()  # migrates the fresh database
    url = sqlalchemy.make_url(fresh_database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    proxied = SqlStore(through, migrate_on_start=False)
    await proxied.start()
    try:
        yield Rig(direct, proxied, proxy)
    finally:
        await proxied.aclose()
        await proxy.aclose()
        await direct.aclose()


def writer_for(sink: SqlStore, spool: Path, **options: Any) -> UsageWriter:
    values: dict[str, Any] = {
        "batch_size": 500,
        "flush_interval_s": 0.05,
        "retry_interval_s": 0.2,
        "max_retry_interval_s": 1.0,
        "write_timeout_s": 2.0,
    }
    values.update(options)
    return UsageWriter(sink, spool, **values)


async def load(writer: UsageWriter, start: int, stop: int) -> None:
    """``record()`` as requests would call it: in bursts, with the loop running between."""
    for i in range(start, stop):
        writer.record(make_record(i))
        if i % 250 == 0:
            await asyncio.sleep(0.005)


async def assert_exactly_once(direct: SqlStore, n: int) -> None:
    """``n`` records stored, counted on a connection of their own, and in the aggregates."""
    assert await direct.count_usage_records() == n
    rows = await direct.usage_summary([])
    assert sum(row.requests for row in rows) == n
    assert sum(row.prompt_tokens for row in rows) == 100 * n
    by_day = await direct.usage_summary(["day"])
    assert sum(row.requests for row in by_day) == n


async def finish(writer: UsageWriter, spool: Path) -> None:
    await until(
        lambda: not writer.spooling and not list(spool.glob("usage-*.jsonl")),
        60,
        "the spool replayed after the database came back",
    )
    await writer.aclose()
    assert writer.pending == 0


async def test_a_cut_mid_load_loses_and_doubles_nothing(rig: Rig, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    writer = writer_for(rig.proxied, spool)
    await writer.start()
    n = 30_000

    await load(writer, 0, 10_000)
    await rig.proxy.cut()  # PostgreSQL is gone: connections reset, new ones refused
    await load(writer, 10_000, 20_000)
    await until(lambda: writer.spooling, 30, "the writer noticed the outage")
    await asyncio.sleep(0.5)  # a few failed retries
    rig.proxy.restore()
    await load(writer, 20_000, n)
    await finish(writer, spool)

    assert writer.spooled > 0
    assert writer.replayed >= writer.spooled
    assert writer.unspooled == 0
    await assert_exactly_once(rig.direct, n)


async def test_a_stalled_database_times_out_into_the_spool(rig: Rig, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    writer = writer_for(rig.proxied, spool, write_timeout_s=1.0)
    await writer.start()
    n = 12_000

    await load(writer, 0, 4_000)
    rig.proxy.stall()  # connections stay open, answers never come
    await load(writer, 4_000, 8_000)
    await until(lambda: writer.spooling, 30, "the write timed out into the spool")
    await rig.proxy.cut()  # the black hole ends as outages do: the connections are dead
    rig.proxy.restore()
    await load(writer, 8_000, n)
    await finish(writer, spool)

    assert writer.spooled > 0
    await assert_exactly_once(rig.direct, n)


async def test_records_spooled_by_a_previous_run_are_replayed_at_start(
    rig: Rig, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    await rig.proxy.cut()
    first = writer_for(rig.proxied, spool)
    await first.start()
    await load(first, 0, 5_000)
    await first.aclose()  # the database never came back during this run
    assert first.spooled == 5_000
    assert await rig.direct.count_usage_records() == 0

    rig.proxy.restore()
    second = writer_for(rig.proxied, spool)
    await second.start()
    await load(second, 5_000, 6_000)
    await finish(second, spool)
    assert second.replayed == 5_000
    await assert_exactly_once(rig.direct, 6_000)
