"""What following jobs costs the gateway: idle ``GET /v1/jobs/{id}/events`` streams, and how
soon a change reaches its stream. Two revisions, one after the other, in one run.

    .venv/bin/python bench/job_events.py                        # working tree against HEAD
    .venv/bin/python bench/job_events.py --baseline 13575d0 --streams 50,200
    .venv/bin/python bench/job_events.py --quick                # about 30 seconds
    .venv/bin/python bench/job_events.py --postgres             # SQLite, then PostgreSQL

For each revision and each stream count N, one ``headrace mock-upstream`` and one embedded
gateway (SQLite, ``jobs.run_in_process: false``: submitted jobs stay queued, as they do while
workers are busy) are started; this script submits N jobs, opens one event stream per job
(aiohttp, in this process) and then measures:

- the gateway's CPU, in % of a core, over ``--idle-s`` seconds while every stream waits (with
  ``--postgres``, the database server's too: a fresh database per gateway, migrated first);
- ``--changes`` times, one job cancelled through the API and the time from the cancel's
  answer to its ``job.cancelled`` event arriving on its stream (every other stream still
  open): p50, p90 and max.

The sides run one after the other, never at once: an idle stream cost the old code enough CPU
that two gateways would measure each other. bench/README.md ("Following jobs") has results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _phases import CHAT
from _procs import Code, Launcher, Server
from _report import Table, fmt, percentile
from _tenants import fresh_postgres
from jobs import DEFAULT_DATABASE_URL, Cpu

AUTH = {"Authorization": f"Bearer {_procs.ADMIN_KEY}"}
CONFIG = "jobs: {run_in_process: false}\n"


@dataclass(frozen=True, slots=True)
class Figures:
    backend: str
    streams: int
    cpu_percent: float  # the gateway's, of one core, all streams idle
    db_cpu_percent: float  # PostgreSQL's server processes for the database (nan: SQLite)
    latency_ms: list[float]  # cancel answered -> its event on the stream


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


class Follower:
    """One event stream per job; the time each ``job.cancelled`` event arrived."""

    def __init__(self, session: aiohttp.ClientSession, url: str, job_ids: list[str]) -> None:
        self._session = session
        self._url = url
        self.opened = {job_id: asyncio.Event() for job_id in job_ids}
        self.arrived = {job_id: asyncio.Event() for job_id in job_ids}
        self.cancelled_at: dict[str, float] = {}

    async def follow(self, job_id: str) -> None:
        path = f"{self._url}/v1/jobs/{job_id}/events"
        async with self._session.get(path, headers=AUTH) as response:
            response.raise_for_status()
            async for line in response.content:
                if line.startswith(b"event: job.queued"):
                    self.opened[job_id].set()
                elif line.startswith(b"event: job.cancelled"):
                    self.cancelled_at[job_id] = time.perf_counter()
                    self.arrived[job_id].set()
                    return


async def _measure(
    gateway: Server, database: str | None, streams: int, idle_s: float, changes: int
) -> Figures:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        ids = []
        for _ in range(streams):
            async with session.post(
                gateway.url + "/v1/jobs", json={"body": CHAT}, headers=AUTH
            ) as answer:
                answer.raise_for_status()
                ids.append(str((await answer.json())["id"]))
        follower = Follower(session, gateway.url, ids)
        tasks = [asyncio.ensure_future(follower.follow(job_id)) for job_id in ids]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(opened.wait() for opened in follower.opened.values())), 60
            )
            await asyncio.sleep(1.0)  # past the streams' start
            # PostgreSQL's server processes for the database are sampled as they come and go.
            cpu = Cpu({"gateway": gateway.pid}, database).start()
            await asyncio.sleep(idle_s)
            cpu.stop(submitter_cpu_s=0.0)
            cpu_percent = 100 * cpu.spent["gateway"] / cpu.elapsed_s
            db_cpu_percent = math.nan
            if database is not None:
                db_cpu_percent = 100 * cpu.spent["PostgreSQL"] / cpu.elapsed_s
            latencies = []
            for job_id in ids[:changes]:
                async with session.post(
                    f"{gateway.url}/v1/jobs/{job_id}/cancel", headers=AUTH
                ) as answer:
                    answer.raise_for_status()
                    await answer.read()
                    answered = time.perf_counter()
                await asyncio.wait_for(follower.arrived[job_id].wait(), 30)
                latencies.append((follower.cancelled_at[job_id] - answered) * 1000)
                await asyncio.sleep(random.uniform(0.03, 0.13))  # apart, at no fixed phase
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    backend = "sqlite" if database is None else "postgresql"
    return Figures(backend, streams, cpu_percent, db_cpu_percent, latencies)


def measure(
    code: Code,
    workdir: Path,
    counts: list[int],
    idle_s: float,
    changes: int,
    postgres_server: str | None,
) -> list[Figures]:
    """Each stream count on SQLite, then (with ``postgres_server``) on a fresh PostgreSQL
    database of that server; a new gateway for each."""
    figures = []
    for backend in ("sqlite", "postgresql") if postgres_server else ("sqlite",):
        for streams in counts:
            with contextlib.ExitStack() as stack:
                launch = Launcher(stack, workdir, code)
                mock = launch.mock()
                config = _procs.mock_gateway_config(mock, access_log=False) + CONFIG
                database = None
                if backend == "postgresql":
                    assert postgres_server is not None
                    url = stack.enter_context(fresh_postgres(postgres_server, code))
                    database = make_url(url).database
                    config += f"database_url: '{url}'\n"
                name = f"gateway-{backend}-{streams}"
                gateway = launch.gateway(name, config, migrate=database is not None)
                _progress(f"{code.commit or 'working tree'}: {backend}, {streams} streams")
                figures.append(
                    asyncio.run(_measure(gateway, database, streams, idle_s, min(changes, streams)))
                )
    return figures


def table(sides: dict[str, list[Figures]], idle_s: float) -> Table:
    labels = list(sides)
    result = Table(
        "Following jobs: idle event streams and how soon a change reaches one",
        ["figure", *labels],
    )
    for i, first in enumerate(sides[labels[0]]):
        where = f"{first.streams} streams, {first.backend}"
        rows = [side[i] for side in sides.values()]
        result.add(f"gateway CPU, {where} (% of a core)", *[fmt(f.cpu_percent, 1) for f in rows])
        if first.backend == "postgresql":
            cells = [fmt(f.db_cpu_percent, 1) for f in rows]
            result.add(f"PostgreSQL CPU, {where} (% of a core)", *cells)
        for q, name in ((0.5, "p50"), (0.9, "p90"), (1.0, "max")):
            cells = [fmt(percentile(f.latency_ms, q), 1) for f in rows]
            result.add(f"cancel -> event {name}, {where} (ms)", *cells)
    result.notes.append(
        f"CPU over {idle_s:g} s with every stream waiting; latency from the cancel's answer to "
        "the job.cancelled event on its stream, the other streams open"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    _procs.add_revision_options(parser)
    parser.add_argument("--streams", default="10,100", help="stream counts, comma-separated")
    parser.add_argument("--idle-s", type=float, default=10.0, help="CPU measured this long")
    parser.add_argument("--changes", type=int, default=30, help="cancels timed per count")
    parser.add_argument("--quick", action="store_true", help="50 streams, 5 s, 10 changes")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also on PostgreSQL (a database created on --database-url's server per gateway)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("HEADRACE_TEST_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="the PostgreSQL server for --postgres (default: HEADRACE_TEST_DATABASE_URL, or "
        "the local test server)",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    idle_s, changes = args.idle_s, args.changes
    if args.quick:
        counts, idle_s, changes = [50], 5.0, 10
    with _procs.bounded_run(1800) as workdir:
        sides: dict[str, list[Figures]] = {}
        postgres = args.database_url if args.postgres else None
        for label, code, where in _procs.revisions(args, workdir):
            sides[label] = measure(code, where, counts, idle_s, changes, postgres)
        print()
        print(table(sides, idle_s).render())


if __name__ == "__main__":
    main()
