"""Jobs survive ``kill -9``: every accepted job ends exactly once, none is lost, and the upstream
is called again only for the attempts the dead process had in flight.

Real processes: ``headrace mock-upstream`` answering after 300 ms, and ``headrace serve``,
either embedded (SQLite, the in-process runner) or on PostgreSQL with ``jobs.run_in_process:
false`` and two ``headrace worker`` processes. Leases are short (2 s, heartbeat 0.5 s) so that
a dead runner's jobs come back within seconds.

What the assertions rest on: a claim appends one ``job.running`` event, a lease that expires
appends a ``job.queued`` event whose detail says ``lease_expired`` and names the worker, and
the model is configured with one attempt and no cache, so each claim calls the upstream at
most once. Hence: upstream calls <= claims = jobs + recovered attempts, and the recovered
attempts must be exactly those the killed process held (read from the database while it is
dead).

Two more PostgreSQL tests hold the other side of that bound: live workers under load never
lose a lease (no kill, so no attempt is taken back), and a database blip shorter than the
lease does not make a job that already has its answer run again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy

from tests.conftest import fresh_database
from tests.e2e.conftest import ADMIN_KEY, Server, free_port, start, worker
from tests.e2e.conftest import serve as e2e_serve
from tests.fakes.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DATABASE_URL = os.environ.get("HEADRACE_TEST_DATABASE_URL")
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
LATENCY_MS = 300
JOBS = 200
FINAL = frozenset({"succeeded", "failed", "cancelled", "dead"})

CONFIG = """\
log: {{format: json, access_log: false}}
{database}
jobs: {{backend: {queue}, run_in_process: {in_process}, concurrency: {concurrency}, \
lease_s: {lease_s}, heartbeat_s: 0.5}}
models:
  - name: mock-model
    cache: {{enabled: false}}
    retry: {{max_attempts: 1}}
    breaker: {{failure_threshold: 1000, min_requests: 1000}}
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock}/v1
"""


def write_config(
    path: Path,
    mock: Server,
    *,
    concurrency: int,
    database: str | None = None,
    lease_s: float = 2,
    queue: str = "sql",
) -> Path:
    """SQLite in the data directory and the in-process runner, or ``database`` (PostgreSQL,
    migrated beforehand) with ``headrace worker`` processes running the jobs on the ``queue``
    backend."""
    lines = ""
    if database is not None:
        lines = f'database_url: "{database}"\nstore: {{migrate_on_start: false}}'
    path.write_text(
        CONFIG.format(
            database=lines,
            in_process=str(database is None).lower(),
            concurrency=concurrency,
            lease_s=lease_s,
            queue=queue,
            mock=mock.url,
        )
    )
    return path


def migrate(database: str, queue: str = "sql") -> None:
    subprocess.run(
        [sys.executable, "-m", "headrace", "migrate"],
        env={**os.environ, "HEADRACE_DATABASE_URL": database, "HEADRACE_JOBS__BACKEND": queue},
        check=True,
        capture_output=True,
    )


def chat(n: int) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": f"job number {n}"}]}


@pytest.fixture(scope="module")
def slow_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A mock of our own: these tests change its latency and read its call counts."""
    port = free_port()
    server = start(
        ["mock-upstream", "--port", str(port), "--latency-ms", str(LATENCY_MS)],
        f"http://127.0.0.1:{port}/health",
        tmp_path_factory.mktemp("mock") / "mock.log",
    )
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.stop()


@pytest.fixture
def mock(slow_mock: Server) -> Server:
    httpx.put(f"{slow_mock.url}/_mock/faults", json={"latency_ms": LATENCY_MS}).raise_for_status()
    httpx.post(f"{slow_mock.url}/_mock/reset").raise_for_status()
    return slow_mock


@pytest.fixture
def database() -> Iterator[str]:
    if not DATABASE_URL:
        pytest.skip("set HEADRACE_TEST_DATABASE_URL to run against PostgreSQL")
    with fresh_database(DATABASE_URL) as url:
        yield url


# -- processes ----------------------------------------------------------------------------------


def serve(root: Path, config: Path, name: str) -> Server:
    return e2e_serve(config, root / f"{name}.log", root / "data")


def kill(server: Server) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)


# -- the client side ----------------------------------------------------------------------------


async def submit_all(client: httpx.AsyncClient, count: int, priority: str = "normal") -> list[str]:
    """Submit ``count`` jobs, 20 at a time; their ids, all accepted with 202."""
    gate = asyncio.Semaphore(20)

    async def one(n: int) -> str:
        async with gate:
            answer = await client.post(
                "/v1/jobs", json={"body": chat(n), "priority": priority}, headers=AUTH
            )
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def mock_stats(client: httpx.AsyncClient, mock: Server) -> dict[str, Any]:
    answer = await client.get(f"{mock.url}/_mock/stats")
    stats: dict[str, Any] = answer.json()
    return stats


async def upstream_calls(client: httpx.AsyncClient, mock: Server) -> int:
    stats = await mock_stats(client, mock)
    return int(stats["endpoints"].get("/v1/chat/completions", 0))


async def wait_for_calls(client: httpx.AsyncClient, mock: Server, calls: int) -> None:
    deadline = time.monotonic() + 30
    while await upstream_calls(client, mock) < calls:
        assert time.monotonic() < deadline, "the jobs did not start"
        await asyncio.sleep(0.05)


async def wait_for_in_flight(client: httpx.AsyncClient, mock: Server, count: int) -> None:
    """Until the mock holds exactly ``count`` requests."""
    deadline = time.monotonic() + 30
    while (await mock_stats(client, mock))["in_flight"] != count:
        assert time.monotonic() < deadline, f"the mock never held {count} requests"
        await asyncio.sleep(0.02)


async def wait_all_final(client: httpx.AsyncClient, timeout_s: float = 40) -> None:
    """Until no job is queued or running (each test's database holds only its own jobs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pending = 0
        for status in ("queued", "running"):
            page = await client.get("/v1/jobs", params={"status": status}, headers=AUTH)
            pending += len(page.json()["data"])
        if not pending:
            return
        assert time.monotonic() < deadline, f"jobs still pending after {timeout_s:g} s"
        await asyncio.sleep(0.25)


@dataclass(frozen=True)
class Event:
    status: str
    data: dict[str, Any]


async def events_of(client: httpx.AsyncClient, job_id: str) -> list[Event]:
    """The job's whole SSE history (the stream ends after its final event)."""
    answer = await client.get(f"/v1/jobs/{job_id}/events", headers=AUTH)
    assert answer.status_code == 200, answer.text
    found = []
    for block in answer.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            found.append(Event(fields["event"].removeprefix("job."), orjson.loads(fields["data"])))
    return found


@dataclass(frozen=True)
class Outcome:
    views: dict[str, dict[str, Any]]
    events: dict[str, list[Event]]


async def outcome(client: httpx.AsyncClient, ids: list[str]) -> Outcome:
    gate = asyncio.Semaphore(20)

    async def one(job_id: str) -> tuple[dict[str, Any], list[Event]]:
        async with gate:
            view = await client.get(f"/v1/jobs/{job_id}", headers=AUTH)
            assert view.status_code == 200, f"job {job_id} is lost: {view.text}"
            return dict(view.json()), await events_of(client, job_id)

    found = await asyncio.gather(*(one(job_id) for job_id in ids))
    return Outcome(
        {job_id: view for job_id, (view, _) in zip(ids, found, strict=True)},
        {job_id: events for job_id, (_, events) in zip(ids, found, strict=True)},
    )


def check(result: Outcome, ids: list[str], held: dict[str, str], calls: int) -> None:
    """The crash contract. ``held``: job id -> lease owner of the jobs the killed process was
    running when it died; ``calls``: the upstream calls counted by the mock."""
    assert len(set(ids)) == len(ids) == JOBS
    statuses = Counter(view["status"] for view in result.views.values())
    assert set(statuses) <= {"succeeded", "dead"}, statuses  # none lost, none left behind
    assert statuses["succeeded"] >= JOBS - len(held), statuses
    recovered: dict[str, list[str]] = {}
    for job_id, events in result.events.items():
        view = result.views[job_id]
        finals = [e for e in events if e.status in FINAL]
        assert [e.status for e in finals] == [view["status"]], (job_id, events)
        claims = [e for e in events if e.status == "running"]
        lost = [
            e.data["worker"] for e in events if e.data.get("reason") == "lease_expired"
        ]  # attempts taken back from a dead worker
        assert view["attempts"] == len(claims) == 1 + len(lost), (job_id, events)
        if lost:
            recovered[job_id] = lost
    # Only the killed process's attempts were taken back, each once, and all of them were.
    assert {job_id: [owner] for job_id, owner in held.items()} == recovered
    # Each claim calls the upstream at most once; each success needed one call.
    claims_total = JOBS + len(held)
    assert statuses["succeeded"] <= calls <= claims_total, (calls, claims_total)


# -- the tests ----------------------------------------------------------------------------------


async def test_embedded_server_killed_mid_run_finishes_every_job_once_after_restart(
    tmp_path: Path, mock: Server
) -> None:
    config = write_config(tmp_path / "headrace.yaml", mock, concurrency=10)
    first = await asyncio.to_thread(serve, tmp_path, config, "serve-1")
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
            ids = await submit_all(client, JOBS)
            await wait_for_calls(client, mock, 60)  # about a third done
            kill(first)
    finally:
        first.stop(signal.SIGKILL)
    with sqlite3.connect(tmp_path / "data" / "headrace.db") as db:
        held = dict(db.execute("SELECT id, lease_owner FROM jobs WHERE status = 'running'"))
    assert held, "the kill came too late: nothing was running"
    second = await asyncio.to_thread(serve, tmp_path, config, "serve-2")
    try:
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as client:
            await wait_all_final(client)
            result = await outcome(client, ids)
            calls = await upstream_calls(client, mock)
    finally:
        assert second.stop() == 0, second.output()
    check(result, ids, held, calls)


@pytest.mark.parametrize("queue", ["sql", "procrastinate"])
async def test_postgres_worker_killed_mid_run_the_other_finishes_every_job_once(
    tmp_path: Path, mock: Server, database: str, queue: str
) -> None:
    migrate(database, queue)
    config = write_config(
        tmp_path / "headrace.yaml", mock, concurrency=5, database=database, queue=queue
    )
    api = await asyncio.to_thread(serve, tmp_path, config, "serve")
    workers = await asyncio.gather(
        *(asyncio.to_thread(worker, tmp_path, config, f"worker-{n}", 5) for n in (1, 2))
    )
    engine = sqlalchemy.create_engine(database, poolclass=sqlalchemy.NullPool)
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            ids = await submit_all(client, JOBS)
            await wait_for_calls(client, mock, 60)
            kill(workers[0])
            with engine.connect() as conn:
                running = conn.execute(
                    sqlalchemy.text("SELECT id, lease_owner FROM jobs WHERE status = 'running'")
                ).all()
            await wait_all_final(client)
            result = await outcome(client, ids)
            calls = await upstream_calls(client, mock)
        assert workers[1].process.poll() is None, workers[1].output()
    finally:
        engine.dispose()
        for process in [*workers, api]:
            process.stop()
    # Both workers were running jobs at the kill; the killed one is the owner whose leases
    # expired. The survivor's must not have.
    lost_owners = {
        e.data["worker"]
        for events in result.events.values()
        for e in events
        if e.data.get("reason") == "lease_expired"
    }
    assert len(lost_owners) == 1, lost_owners
    held = {job_id: owner for job_id, owner in running if owner in lost_owners}
    assert held, "the kill came too late: the killed worker was running nothing"
    check(result, ids, held, calls)


async def test_higher_priority_jobs_start_before_queued_lower_ones(
    tmp_path: Path, mock: Server
) -> None:
    config = write_config(tmp_path / "headrace.yaml", mock, concurrency=2)
    server = await asyncio.to_thread(serve, tmp_path, config, "serve")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            low = await submit_all(client, 8, priority="low")
            high = await submit_all(client, 8, priority="high")
            await wait_all_final(client)
            views = (await outcome(client, low + high)).views
    finally:
        server.stop()
    assert {view["status"] for view in views.values()} == {"succeeded"}
    # Whenever a low job was claimed, every high job queued by then had been claimed already.
    for low_id in low:
        started = views[low_id]["started_at"]
        for high_id in high:
            if views[high_id]["created_at"] < started - 0.05:
                assert views[high_id]["started_at"] <= started, (views[low_id], views[high_id])


async def test_postgres_workers_under_load_never_lose_a_live_lease(
    tmp_path: Path, mock: Server, database: str
) -> None:
    """No kill: two busy workers must keep every lease they hold, so each job is claimed once
    and calls the upstream once.

    Failed before 482f00c: a worker's heartbeat (one UPDATE of all its running jobs) and its
    batched completions (``complete_many``: one UPDATE per job, in completion order, in one
    transaction) lock the same rows in different orders and deadlock; PostgreSQL aborts one.
    An aborted batch strands its jobs ("Task exception was never retrieved"): they stay
    running, unheartbeated, until their lease expires and they run again.
    """
    jobs = 400
    migrate(database)
    config = write_config(tmp_path / "headrace.yaml", mock, concurrency=100, database=database)
    api = await asyncio.to_thread(serve, tmp_path, config, "serve")
    workers = await asyncio.gather(
        *(asyncio.to_thread(worker, tmp_path, config, f"worker-{n}", 100) for n in (1, 2))
    )
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            ids = await submit_all(client, jobs)
            await wait_all_final(client)
            result = await outcome(client, ids)
            calls = await upstream_calls(client, mock)
    finally:
        for process in [*workers, api]:
            process.stop()
    logs = "".join(w.output() for w in workers).splitlines()
    found = {
        "jobs claimed more than once": sum(1 for v in result.views.values() if v["attempts"] > 1),
        "leases taken back": sum(
            1 for events in result.events.values() for e in events if e.data.get("reason")
        ),
        "upstream calls beyond one per job": calls - jobs,
        "deadlocks logged": sum(1 for line in logs if "DeadlockDetected" in line),
        "stranded job tasks": sum(1 for line in logs if "exception was never retrieved" in line),
    }
    assert not any(found.values()), f"a live worker lost leases: {found}"


async def test_a_database_blip_at_completion_does_not_run_finished_jobs_again(
    tmp_path: Path, mock: Server, database: str
) -> None:
    """The worker's database goes away while its jobs wait on the upstream and comes back a
    moment after they have their answers, well inside their 10 s leases: each job must still
    succeed with the answer it has, calling the upstream once.

    Failed before 3b008a2 (20 of 20 jobs ran twice): the completion write raised in
    ``JobRunner._run`` ("Task exception was never retrieved"), the job left the runner's
    in-flight set while still ``running`` in the table, nobody renewed its lease, and when the
    lease expired it ran again from scratch.
    """
    jobs = 20
    httpx.put(f"{mock.url}/_mock/faults", json={"latency_ms": 1500}).raise_for_status()
    migrate(database)
    real = sqlalchemy.make_url(database)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    await proxy.start()
    through_proxy = real.set(port=proxy.port).render_as_string(hide_password=False)
    api_config = write_config(tmp_path / "api.yaml", mock, concurrency=jobs, database=database)
    worker_config = write_config(
        tmp_path / "worker.yaml", mock, concurrency=jobs, database=through_proxy, lease_s=10
    )
    api = await asyncio.to_thread(serve, tmp_path, api_config, "serve")
    runner = await asyncio.to_thread(worker, tmp_path, worker_config, "worker", jobs)
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            ids = await submit_all(client, jobs)
            await wait_for_in_flight(client, mock, jobs)  # every job is waiting on the upstream
            await proxy.cut()
            await wait_for_in_flight(client, mock, 0)  # every answer is in: completions fail
            await asyncio.sleep(0.5)
            proxy.restore()
            await wait_all_final(client)
            result = await outcome(client, ids)
            calls = await upstream_calls(client, mock)
    finally:
        runner.stop()
        api.stop()
        await proxy.aclose()
    logs = runner.output().splitlines()
    found = {
        "jobs not succeeded": Counter(
            v["status"] for v in result.views.values() if v["status"] != "succeeded"
        ),
        "jobs run again": sum(1 for v in result.views.values() if v["attempts"] > 1),
        "upstream calls beyond one per job": calls - jobs,
        "stranded job tasks": sum(1 for line in logs if "exception was never retrieved" in line),
    }
    assert not any(found.values()), f"a database blip made finished jobs run again: {found}"
