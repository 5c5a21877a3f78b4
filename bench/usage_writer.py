"""Usage writer benchmark: records/s into PostgreSQL and SQLite, and record()'s cost.

    .venv/bin/python bench/usage_writer.py [--database-url URL] [--records 100000]
        [--batch-sizes 500,2000,5000] [--repeat 3] [--quick]

Runs in this process, no servers. For each backend and batch size, ``--records`` usage
records (uuid4 ids, the current time, 50 keys in 10 teams, 4 models: what the gateway writes)
go through ``UsageWriter.record()`` as fast as the event loop takes them, 1,000 per loop turn;
the figure is records / time from the first ``record()`` to the last record stored, the median
of ``--repeat`` runs (tables emptied before each). Then a steady 10,000 records/s into
PostgreSQL for a few seconds: how far behind the writer falls. Then the cost of ``record()``
on the request path, in ns per call: the usual case (a deque append) and the degraded one
(buffer full: a line appended to the spool file).

PostgreSQL: ``--database-url`` or ``HEADRACE_TEST_DATABASE_URL``; the run creates a database
``hr_bench_<hex>`` on that server and drops it at the end. Without a URL, PostgreSQL is
skipped. SQLite: a file in a temporary directory (WAL, as the embedded default runs it).
Goal (the usage issue): >= 10,000 records/s into PostgreSQL at the default batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _report import Goal, Table, fmt, goals_table, percentile
from headrace.accounting.usage import UsageWriter
from headrace.domain import UsageRecord
from headrace.store.engine import async_url
from headrace.store.sql import SqlStore

DEFAULT_BATCH = 500  # UsageConfig.batch_size
GOAL_RECORDS_PER_S = 10_000
MODELS = ("gpt-4o-mini", "gpt-4o", "claude-3-5-haiku", "local-smollm2")


def make_records(n: int) -> list[UsageRecord]:
    now = time.time()
    return [
        UsageRecord(
            id=uuid.uuid4().hex,
            request_id=uuid.uuid4().hex,
            created_at=now,
            operation="chat",
            key_id=f"key_{i % 50:02d}",
            team_id=f"team_{i % 10}",
            model=MODELS[i % len(MODELS)],
            requested_model=MODELS[i % len(MODELS)],
            deployment="primary",
            prompt_tokens=120 + i % 400,
            completion_tokens=30 + i % 200,
            cached_tokens=0,
            cost_micro_usd=90 + i % 300,
            baseline_cost_micro_usd=90 + i % 300,
            latency_ms=250.0,
        )
        for i in range(n)
    ]


class TimedSink:
    """The store, with the wall time of each ``write_usage`` call kept, and an event set once
    ``target`` records went in."""

    def __init__(self, store: SqlStore, target: int) -> None:
        self.store = store
        self.calls_s: list[float] = []
        self.target = target
        self.written = 0
        self.done = asyncio.Event()

    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        started = time.perf_counter()
        try:
            new = await self.store.write_usage(records)
        finally:
            self.calls_s.append(time.perf_counter() - started)
        self.written += len(records)
        if self.written >= self.target:
            self.done.set()
        return new


@dataclass(frozen=True, slots=True)
class Run:
    records_per_s: float
    calls: int
    call_ms_mean: float
    call_ms_max: float
    cpu_us_per_record: float  # this process: writer, SQLAlchemy, driver (not the server)
    spooled: int


async def empty(url: str) -> None:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            for table in ("usage_records", "usage_daily"):
                await conn.execute(sqlalchemy.text(f"DELETE FROM {table}"))
    finally:
        await engine.dispose()


async def one_run(url: str, batch_size: int, records: list[UsageRecord], spool: Path) -> Run:
    store = SqlStore(url)
    await store.start()  # migrates a new database
    await empty(url)
    sink = TimedSink(store, len(records))
    writer = UsageWriter(sink, spool, batch_size=batch_size, max_buffer=len(records))
    await writer.start()
    await asyncio.sleep(0.05)  # past the start-up replay of an empty spool
    cpu0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, len(records), 1000):
        for record in records[start : start + 1000]:
            writer.record(record)
        await asyncio.sleep(0)
    await asyncio.wait_for(sink.done.wait(), timeout=300)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await writer.aclose()
    stored = await store.count_usage_records()
    totals = sum(row.requests for row in await store.usage_summary([]))
    await store.aclose()
    if stored != len(records) or totals != len(records):
        raise RuntimeError(f"stored {stored}, aggregated {totals}, of {len(records)} records")
    return Run(
        records_per_s=len(records) / elapsed,
        calls=len(sink.calls_s),
        call_ms_mean=1000 * statistics.fmean(sink.calls_s),
        call_ms_max=1000 * max(sink.calls_s),
        cpu_us_per_record=1e6 * cpu / len(records),
        spooled=writer.spooled,
    )


async def throughput(
    backend: str, url: str, batch_size: int, n: int, repeat: int, spool: Path
) -> list[Run]:
    await one_run(url, batch_size, make_records(min(n, 5000)), spool)  # warm-up
    return [await one_run(url, batch_size, make_records(n), spool) for _ in range(repeat)]


@dataclass(frozen=True, slots=True)
class Steady:
    offered_per_s: float
    most_pending: int
    lag_s: float  # from the last record() to the last record stored
    stall_p99_ms: float  # how late a 1 ms timer fired on the event loop meanwhile
    stall_max_ms: float


async def steady(url: str, batch_size: int, rate: int, seconds: float, spool: Path) -> Steady:
    """Records at ``rate``/s for ``seconds``, and how late the event loop runs meanwhile.

    The writer shares the loop with the requests: the Python side of a batch write
    (SQLAlchemy compiling and binding, the driver) runs on it between awaits, and a request
    ready meanwhile waits. The 1 ms ticker measures that wait.
    """
    store = SqlStore(url)
    await store.start()  # migrates a new database
    await empty(url)
    records = make_records(int(rate * seconds))
    gc.collect()  # what earlier runs left is not this run's to collect
    gc.freeze()
    sink = TimedSink(store, len(records))
    writer = UsageWriter(sink, spool, batch_size=batch_size)
    await writer.start()
    stalls: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append(time.perf_counter() - before - 0.001)

    ticking = asyncio.create_task(ticker())
    tick_s = 0.01
    per_tick = int(rate * tick_s)
    most_pending = 0
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, len(records), per_tick)):
        delay = t0 + i * tick_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for record in records[start : start + per_tick]:
            writer.record(record)
        most_pending = max(most_pending, writer.pending)
    offered_s = time.perf_counter() - t0
    last = time.perf_counter()
    await asyncio.wait_for(sink.done.wait(), timeout=300)
    lag_s = time.perf_counter() - last
    stop.set()
    await ticking
    gc.unfreeze()
    await writer.aclose()
    await store.aclose()
    return Steady(
        offered_per_s=len(records) / offered_s,
        most_pending=most_pending,
        lag_s=lag_s,
        stall_p99_ms=1000 * percentile(stalls, 0.99),
        stall_max_ms=1000 * max(stalls),
    )


async def record_cost(spool: Path, n: int = 200_000, repeat: int = 5) -> tuple[float, float, float]:
    """ns per ``record()`` call: buffered, and spilling to the spool (the buffer full)."""

    class NoSink:
        async def write_usage(self, records: Sequence[UsageRecord]) -> int:
            return 0

    records = make_records(n)

    def loop_ns(writer: UsageWriter | None, batch: list[UsageRecord]) -> float:
        record = writer.record if writer is not None else (lambda r: None)
        t0 = time.perf_counter_ns()
        for r in batch:
            record(r)
        return (time.perf_counter_ns() - t0) / len(batch)

    buffered = []
    for _ in range(repeat):
        writer = UsageWriter(NoSink(), spool, batch_size=DEFAULT_BATCH, max_buffer=n + 1)
        buffered.append(loop_ns(writer, records))
    baseline = min(loop_ns(None, records) for _ in range(repeat))
    spilling = []
    for _ in range(repeat):
        writer = UsageWriter(NoSink(), spool, max_buffer=0)
        spilling.append(loop_ns(writer, records[:20_000]))
        await writer.aclose()
    return statistics.median(buffered), baseline, statistics.median(spilling)


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new database on the server of ``server_url`` for this run, dropped afterwards."""
    server = async_url(server_url).set(drivername="postgresql+psycopg")
    name = f"hr_bench_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(
        server, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.NullPool
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def spread(runs: list[Run]) -> str:
    low, high = min(r.records_per_s for r in runs), max(r.records_per_s for r in runs)
    return f"{fmt(low, 0)}-{fmt(high, 0)}"


async def measure(args: argparse.Namespace, postgres: str | None, tmp: Path) -> list[Table]:
    backends = []
    if postgres:
        backends.append(("postgresql", postgres))
    backends.append(("sqlite", f"sqlite+aiosqlite:///{tmp / 'usage.db'}"))
    table = Table(
        f"Throughput through UsageWriter, {args.records:,} records per run, "
        f"median of {args.repeat}",
        [
            "backend",
            "batch",
            "records/s",
            "min-max",
            "sink calls",
            "ms/call mean",
            "ms/call max",
            "CPU us/record",
            "spooled",
        ],
    )
    goals = []
    for backend, url in backends:
        for batch in args.batch_sizes:
            runs = await throughput(backend, url, batch, args.records, args.repeat, tmp / "spool")
            mid = sorted(runs, key=lambda r: r.records_per_s)[len(runs) // 2]
            table.add(
                backend,
                str(batch),
                fmt(mid.records_per_s, 0),
                spread(runs),
                str(mid.calls),
                fmt(mid.call_ms_mean, 1),
                fmt(mid.call_ms_max, 1),
                fmt(mid.cpu_us_per_record, 1),
                str(mid.spooled),
            )
            if backend == "postgresql" and batch == DEFAULT_BATCH:
                goals.append(
                    Goal(
                        f"records/s into PostgreSQL, batch {batch}",
                        mid.records_per_s,
                        GOAL_RECORDS_PER_S,
                        "records/s",
                        at_least=True,
                        digits=0,
                    )
                )
    table.notes.append(
        "records/s: from the first record() to the last record stored (and the per-day "
        "aggregates updated); CPU: this process only (writer, SQLAlchemy, driver), not the "
        "database server"
    )
    tables = [table]
    steady_table = Table(
        f"Steady {GOAL_RECORDS_PER_S:,} records/s for {args.steady_s:g} s, with the event loop "
        "timed by a 1 ms ticker",
        [
            "backend",
            "batch",
            "offered/s",
            "most pending",
            "last stored after (ms)",
            "loop stall p99 (ms)",
            "loop stall max (ms)",
        ],
    )
    for backend, url in backends:
        for batch in args.batch_sizes:
            run = await steady(url, batch, GOAL_RECORDS_PER_S, args.steady_s, tmp / "spool")
            steady_table.add(
                backend,
                str(batch),
                fmt(run.offered_per_s, 0),
                f"{run.most_pending:,}",
                fmt(1000 * run.lag_s, 0),
                fmt(run.stall_p99_ms, 1),
                fmt(run.stall_max_ms, 1),
            )
    steady_table.notes.append(
        "loop stall: how late a 1 ms timer fired, i.e. what a request ready meanwhile would wait"
    )
    tables.append(steady_table)
    buffered, baseline, spilling = await record_cost(tmp / "spool-cost")
    cost = Table("record() on the request path", ["case", "ns/call"])
    cost.add("buffered (the usual case)", fmt(buffered, 0))
    cost.add("  of which the benchmark's loop and call", fmt(baseline, 0))
    cost.add("buffer full: a line appended to the spool file", fmt(spilling, 0))
    cost.notes.append("median of 5 loops of 200,000 calls (spool: 20,000), pre-built records")
    tables.append(cost)
    if goals:
        tables.append(goals_table(goals))
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("HEADRACE_TEST_DATABASE_URL"),
        help="a PostgreSQL server to create the benchmark's database on "
        "(default: HEADRACE_TEST_DATABASE_URL; none: PostgreSQL is skipped)",
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument(
        "--batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[500, 2000, 5000],
        help="comma-separated",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steady-s", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="20,000 records, 1 run, 2 s steady")
    args = parser.parse_args()
    if args.quick:
        args.records, args.repeat, args.steady_s = 20_000, 1, 2.0
    started = time.monotonic()
    print(f"Headrace usage writer benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"code: {_procs.Code().describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.database_url:
            with fresh_database(args.database_url) as postgres:
                where = sqlalchemy.make_url(postgres)
                print(
                    f"PostgreSQL: database {where.database} on {where.host}:{where.port or 5432} "
                    "(created for this run, dropped after)"
                )
                print(f"SQLite: {tmp}/usage.db (WAL)\n")
                tables = asyncio.run(measure(args, postgres, Path(tmp)))
        else:
            print("PostgreSQL: skipped (no --database-url, HEADRACE_TEST_DATABASE_URL unset)")
            print(f"SQLite: {tmp}/usage.db (WAL)\n")
            tables = asyncio.run(measure(args, None, Path(tmp)))
    for table in tables:
        print(table.render())
        print()
    print(f"(finished in {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
