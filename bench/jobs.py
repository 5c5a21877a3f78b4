"""Durable jobs benchmark: throughput, queue wait, jobs in flight and a kill -9 count.

    .venv/bin/python bench/jobs.py              # full run, 3-5 minutes
    .venv/bin/python bench/jobs.py --quick      # about a minute, smaller counts
    .venv/bin/python bench/jobs.py --no-embedded --sections throughput,drain --latencies 0
    .venv/bin/python bench/jobs.py --commit HEAD --logs /tmp/jobs-logs

Starts ``headrace mock-upstream`` and, per backend, ``headrace serve``: embedded (SQLite, the
in-process runner) and PostgreSQL (``headrace migrate``, then ``serve`` with
``jobs.run_in_process: false`` and two ``headrace worker`` processes, as production runs it).
Jobs are submitted with ``POST /v1/jobs`` by a submitter in its own process (raw keep-alive
connections, answers parsed by httptools; this file run with ``--submitter``); every figure
about a job is read from the jobs table and its events (``created_at``, ``started_at``,
``finished_at`` are the fields of the job views).
bench/README.md explains each figure.

PostgreSQL: ``--database-url`` or ``HEADRACE_TEST_DATABASE_URL`` (default: the local test
server); the run creates a database ``hr_bench_<hex>`` and drops it at the end.

One file past STYLE.md's 800 lines, on purpose for now: it was written under a one-file
constraint. The seams to split along are marked: the submitter (``_jobs_submit.py``), the
database and CPU readings (``_jobs_db.py``), and the five sections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
import _quiet
from _procs import Code, CpuSample, Launcher, Server
from _quiet import Quiet
from _report import Goal, Table, fmt, goals_table, percentile

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GOAL_COMPLETED_PER_S = 1000.0  # PostgreSQL, 2 workers, 0 ms upstream
GOAL_IN_FLIGHT_PER_WORKER = 5000.0  # 1 s upstream
FINAL = ("succeeded", "failed", "cancelled", "dead")
JOB_TABLES = ("webhook_deliveries", "webhook_outbox", "job_idempotency", "job_events", "jobs")
LATENCIES_MS = (0, 50)


@dataclass(frozen=True, slots=True)
class Plan:
    jobs: int  # per throughput case
    clients: int  # concurrent submitting connections
    wait_s: float  # length of the fixed-rate queue-wait phase
    wait_rate_cap: float  # jobs/s at most in that phase
    in_flight_jobs: int
    in_flight_concurrency: int  # per worker
    crash_jobs: int
    quiet_budget_s: float  # at most this long waiting for other processes to calm down
    time_limit_s: int


FULL = Plan(5000, 64, 10.0, 200.0, 12_000, 6000, 10_000, 60.0, 1500)
QUICK = Plan(500, 64, 4.0, 100.0, 2000, 1000, 1000, 5.0, 420)


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _show(table: Table) -> None:
    print(table.render(), end="\n\n", flush=True)


# -- the submitter (its own process) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitSpec:
    """``count`` jobs to ``url``: as fast as ``clients`` connections go, or at ``rate``/s."""

    url: str
    count: int
    clients: int
    rate: float = 0.0  # 0: closed loop
    tag: str = ""  # in every prompt, so that no two phases send the same body


@dataclass(slots=True)
class Submitted:
    """What the submitter saw. ``started``/``ended`` are unix seconds, comparable with the
    jobs table's times."""

    ids: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.ids) / max(self.ended - self.started, 1e-9)


async def _submit(spec: SubmitSpec) -> Submitted:
    """POST ``spec.count`` jobs on raw keep-alive connections (:class:`_Connection`): the
    requests are bytes built up front and the answers parsed by httptools, so the submitter
    costs a small part of what a full HTTP client does (it shares the machine's two cores with
    the system it measures)."""
    import orjson

    out = Submitted()
    failures: Counter[str] = Counter()
    target = urllib.parse.urlsplit(spec.url)
    host, port = target.hostname or "127.0.0.1", target.port or 80
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\n"
        f"Authorization: Bearer {_procs.ADMIN_KEY}\r\nContent-Type: application/json\r\n"
    ).encode()
    loop = asyncio.get_running_loop()

    async def connect() -> _Connection:
        _, conn = await loop.create_connection(_Connection, host, port)
        return conn

    async def one(conn: _Connection | None, n: int) -> _Connection | None:
        prompt = f"{spec.tag} job {n}: say something short"
        chat = {"model": "mock-model", "messages": [{"role": "user", "content": prompt}]}
        body = orjson.dumps({"body": chat})
        sent = time.perf_counter()
        try:
            if conn is None or conn.closed:
                conn = await connect()
            status, payload = await asyncio.wait_for(
                conn.request(head + b"Content-Length: %d\r\n\r\n" % len(body) + body), 60
            )
        except (TimeoutError, OSError, ConnectionError) as exc:
            failures[type(exc).__name__] += 1
            if conn is not None:
                conn.close()
            return None
        if status != 202:
            failures[f"HTTP {status}"] += 1
            return conn
        out.ids.append(orjson.loads(payload)["id"])
        out.latency_ms.append((time.perf_counter() - sent) * 1000)
        return conn

    numbers = iter(range(spec.count))

    async def client() -> None:
        conn: _Connection | None = None
        for n in numbers:
            conn = await one(conn, n)
        if conn is not None:
            conn.close()

    cpu = time.process_time()
    out.started = time.time()
    if spec.rate <= 0:
        await asyncio.gather(*(client() for _ in range(spec.clients)))
    else:  # open loop: evenly spaced, whatever the answers do; one connection per request
        start, tasks = time.perf_counter(), []
        for n in range(spec.count):
            delay = start + n / spec.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_closing(one(None, n))))
        await asyncio.gather(*tasks)
    out.ended = time.time()
    out.cpu_s = time.process_time() - cpu
    out.failures = dict(failures)
    return out


async def _closing(sent: Coroutine[Any, Any, _Connection | None]) -> None:
    conn = await sent
    if conn is not None:
        conn.close()


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; answers parsed by httptools
    (the parser uvicorn uses)."""

    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._body: list[bytes] = []
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self._transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._body.clear()
        self._transport.write(raw)
        return self._answer

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except Exception as exc:  # a malformed answer: fail the request, drop the connection
            self._settle(exc)
            self.close()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        answer = (self._parser.get_status_code(), b"".join(self._body))
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(answer)
        if not self._parser.should_keep_alive():
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._settle(exc or ConnectionResetError("the server closed the connection"))

    def _settle(self, exc: BaseException) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


def submitter_main(raw: str, path: str) -> None:
    import uvloop

    out = uvloop.run(_submit(SubmitSpec(**json.loads(raw))))
    Path(path).write_text(json.dumps(dataclasses.asdict(out)))


class Submission:
    """A submitter process, started at once; :meth:`result` waits for it."""

    def __init__(self, spec: SubmitSpec) -> None:
        # The result goes to a file: through a pipe it came back cut at 64 KiB, twice.
        fd, name = tempfile.mkstemp(prefix="headrace-submitted-", suffix=".json")
        os.close(fd)
        self.path = Path(name)
        raw = json.dumps(dataclasses.asdict(spec))
        self.proc = subprocess.Popen(
            [_procs.PYTHON, __file__, "--submitter", raw, str(self.path)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self, timeout_s: float = 600) -> Submitted:
        try:
            self.proc.wait(timeout=timeout_s)
            if self.proc.returncode != 0:
                raise RuntimeError(f"the submitter exited with status {self.proc.returncode}")
            return Submitted(**json.loads(self.path.read_text()))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.path.unlink(missing_ok=True)


def submit(url: str, count: int, clients: int, tag: str, rate: float = 0.0) -> Submitted:
    return Submission(SubmitSpec(url + "/v1/jobs", count, clients, rate, tag)).result()


# -- the database, read from here -------------------------------------------------------------


class Jobs:
    """The jobs tables of one backend, read (and emptied) with a blocking engine."""

    def __init__(self, url: str, pg_database: str | None = None) -> None:
        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
        self.pg_database = pg_database  # PostgreSQL: whose server processes to account

    def scalar(self, query: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sqlalchemy.text(query), params).scalar()

    def count(self, query: str, **params: Any) -> int:
        return int(self.scalar(query, **params) or 0)

    def rows(self, query: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sqlalchemy.text(query), params)]

    def by_status(self, table: str = "jobs") -> dict[str, int]:
        query = f"SELECT status, count(*) FROM {table} GROUP BY status"
        return {str(status): int(n) for status, n in self.rows(query)}

    def empty(self) -> None:
        """No jobs left from an earlier case. On PostgreSQL the tables are truncated (a
        ``DELETE`` would leave dead rows for the next case's claims to step over) and a
        ``CHECKPOINT`` writes what the earlier cases left dirty now rather than during the
        next measurement."""
        if self.pg_database is None:
            with self.engine.begin() as conn:
                for table in JOB_TABLES:
                    conn.execute(sqlalchemy.text(f"DELETE FROM {table}"))
            return
        with self.engine.begin() as conn:
            tables = list(JOB_TABLES)
            if conn.execute(sqlalchemy.text("SELECT to_regclass('procrastinate_jobs')")).scalar():
                tables.append("procrastinate_jobs")  # the procrastinate backend's entries
            # CASCADE: Procrastinate's events reference its jobs.
            conn.execute(sqlalchemy.text(f"TRUNCATE {', '.join(tables)} CASCADE"))
        with self.engine.connect() as conn:
            conn.execute(sqlalchemy.text("CHECKPOINT"))

    def pending(self) -> int:
        return self.count("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")

    def running_per_owner(self) -> dict[str, int]:
        found = self.rows(
            "SELECT lease_owner, count(*) FROM jobs WHERE status = 'running' GROUP BY lease_owner"
        )
        return {str(owner): int(n) for owner, n in found}

    def wait_drained(self, total: int, timeout_s: float) -> bool:
        """Until ``total`` jobs exist and none is queued or running; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pending() == 0 and self.count("SELECT count(*) FROM jobs") >= total:
                return True
            time.sleep(0.1)
        return False

    def span(self) -> tuple[float, float]:
        """The first ``started_at`` and the last ``finished_at``."""
        first, last = self.rows("SELECT min(started_at), max(finished_at) FROM jobs")[0]
        return float(first or 0.0), float(last or 0.0)

    def dispose(self) -> None:
        self.engine.dispose()


@contextlib.contextmanager
def fresh_postgres(server_url: str) -> Iterator[str]:
    """A new database on the server of ``server_url`` for this run, dropped afterwards."""
    from headrace.store.engine import async_url

    server = async_url(server_url).set(drivername="postgresql+psycopg")
    name = f"hr_bench_{os.urandom(6).hex()}"
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


# -- CPU ----------------------------------------------------------------------------------------


def _pg_backends(database: str) -> dict[int, float]:
    """CPU seconds of the PostgreSQL server processes connected to ``database``, by pid."""
    found = {}
    marker = f" {database} ".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            title = (entry / "cmdline").read_bytes()
            if title.startswith(b"postgres:") and marker in title:
                found[int(entry.name)] = CpuSample.of(int(entry.name)).cpu_s
    return found


class Cpu:
    """CPU seconds between :meth:`start` and :meth:`stop`: of our processes, of the PostgreSQL
    server processes serving our database (sampled every 0.2 s: they come and go with the
    connection pools, so one that ends between two samples loses at most 0.2 s of work), and
    of every other process on the machine."""

    def __init__(self, pids: dict[str, int], pg_database: str | None) -> None:
        self.pids = pids
        self.pg_database = pg_database
        self.spent: dict[str, float] = {}
        self.elapsed_s = 0.0
        self._before: dict[str, float] = {}
        self._pg_first: dict[int, float] = {}
        self._pg_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> Cpu:
        self._before = {name: CpuSample.of(pid).cpu_s for name, pid in self.pids.items()}
        self._before["machine"] = _quiet.process_cpu_s()
        self._started = time.monotonic()
        if self.pg_database is not None:
            self._pg_first = _pg_backends(self.pg_database)
            self._pg_last = dict(self._pg_first)
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        assert self.pg_database is not None
        while not self._stop.wait(0.2):
            for pid, cpu_s in _pg_backends(self.pg_database).items():
                self._pg_first.setdefault(pid, 0.0)  # a new connection: all of its work
                self._pg_last[pid] = cpu_s

    def stop(self, submitter_cpu_s: float) -> Cpu:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        self.elapsed_s = time.monotonic() - self._started
        machine = _quiet.process_cpu_s() - self._before.pop("machine")
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                self.spent[name] = CpuSample.of(pid).cpu_s - self._before[name]
        self.spent["submitter"] = submitter_cpu_s
        pg = sum(self._pg_last[pid] - first for pid, first in self._pg_first.items())
        self.spent["PostgreSQL"] = pg
        self.spent["other processes"] = max(0.0, machine - sum(self.spent.values()))
        return self

    def per_job_ms(self, name: str, jobs: int) -> float:
        return 1000 * self.spent.get(name, float("nan")) / max(jobs, 1)

    def runners_per_job_ms(self, jobs: int) -> float:
        spent = [v for k, v in self.spent.items() if k.startswith("worker")]
        return 1000 * sum(spent) / max(jobs, 1) if spent else float("nan")

    @property
    def others_share(self) -> float:
        """Other processes' CPU as a share of one core (100 = one core busy)."""
        return 100 * self.spent.get("other processes", 0.0) / max(self.elapsed_s, 1e-9)


# -- the servers ------------------------------------------------------------------------------


def gateway_config(
    mock: Server,
    database_url: str | None,
    *,
    in_process: bool,
    concurrency: int = 1000,
    lease_s: float = 60.0,
    heartbeat_s: float = 15.0,
    queue: str = "sql",
) -> str:
    """``mock-model`` served by ``mock``, the jobs settings given (``queue``: the job queue
    backend, ``sql`` or ``procrastinate``), access log on. Model requests admitted at once
    follow ``concurrency``: the default (1,024) would queue, then shed with 503, the jobs of a
    bigger worker."""
    database = ""
    if database_url is not None:
        database = f"database_url: '{database_url}'\nstore: {{migrate_on_start: false}}\n"
    jobs = (
        f"{{backend: {queue}, run_in_process: {str(in_process).lower()}, "
        f"concurrency: {concurrency}, "
        f"lease_s: {lease_s}, heartbeat_s: {heartbeat_s}}}"
    )
    admission = f"{{max_concurrent: {max(concurrency, 1024)}, max_queue: 2048}}"
    return f"""\
log: {{access_log: true}}
{database}jobs: {jobs}
router: {{admission: {admission}}}
models:
  - name: mock-model
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock.url}/v1
"""


@dataclass(slots=True)
class Backend:
    """One way of running jobs: the API process, the worker processes (none when embedded:
    ``serve`` runs the jobs), the tables."""

    name: str
    api: Server
    db: Jobs
    launch: Launcher
    database_url: str | None = None
    queue: str = "sql"  # the job queue backend of a PostgreSQL one
    workers: list[Server] = field(default_factory=list)
    results: list[Throughput | QueueWait] = field(default_factory=list)

    def config(self, mock: Server, **jobs: Any) -> str:
        """The configuration of this backend's workers, with ``jobs`` settings changed."""
        return gateway_config(mock, self.database_url, in_process=False, queue=self.queue, **jobs)

    def pids(self, mock: Server) -> dict[str, int]:
        found = {"API (serve)": self.api.pid, "mock-upstream": mock.pid}
        for n, worker in enumerate(self.workers, 1):
            found[f"worker {n}"] = worker.pid
        return found

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def start_workers(self, config_yaml: str, concurrency: int, count: int = 2) -> None:
        """Replace the workers with ``count`` new ones on ``config_yaml``, started at once."""
        self.stop_workers()
        tag = f"{concurrency}-{os.urandom(3).hex()}"
        config = self.launch.workdir / f"{self.name}-workers-{tag}.yaml"
        config.write_text(config_yaml)
        env = {"HEADRACE_DATA_DIR": str(self.launch.workdir / f"{self.name}-data")}
        env.update(self.launch.code.env())
        for n in range(1, count + 1):
            argv = [_procs.HEADRACE, "worker", "--config", str(config)]
            argv += ["--concurrency", str(concurrency)]
            log = self.launch.workdir / f"{self.name}-worker-{n}-{tag}.log"
            worker = Server(f"worker {n}", argv, 0, "", log, env)
            self.launch.stack.callback(worker.stop)
            self.workers.append(worker)
        for worker in self.workers:
            _wait_worker(worker)


def _wait_worker(worker: Server, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            break
        if b"headrace worker running" in worker.log.read_bytes():
            return
        time.sleep(0.1)
    tail = worker.log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{worker.name} did not start; the end of its log:\n{tail}")


def embedded(launch: Launcher, mock: Server) -> Backend:
    api = launch.gateway("embedded", gateway_config(mock, None, in_process=True))
    db = Jobs(f"sqlite:///{launch.workdir / 'embedded-data' / 'headrace.db'}")
    return Backend("embedded", api, db, launch)


def postgres(launch: Launcher, mock: Server, url: str, queue: str = "sql") -> Backend:
    """``serve`` and 2 workers on PostgreSQL; ``queue``: ``sql`` (named ``postgres`` in the
    tables) or ``procrastinate`` (the issue's production backend)."""
    name = "postgres" if queue == "sql" else queue
    config = gateway_config(mock, url, in_process=False, queue=queue)
    api = launch.gateway(name, config, migrate=True)
    database = sqlalchemy.make_url(url).database
    backend = Backend(name, api, Jobs(url, database), launch, url, queue)
    backend.start_workers(config, 1000)
    return backend


def set_latency(mock: Server, latency_ms: float) -> None:
    _procs.http("PUT", mock.url + "/_mock/faults", {"latency_ms": latency_ms})


def mock_stats(mock: Server) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(_procs.http("GET", mock.url + "/_mock/stats"))
    return stats


def mock_calls(mock: Server) -> int:
    return int(mock_stats(mock)["endpoints"].get("/v1/chat/completions", 0))


# -- throughput -------------------------------------------------------------------------------


@dataclass(slots=True)
class Throughput:
    backend: str
    latency_ms: int
    sent: Submitted
    completed_per_s: float  # end to end: first submission to the last job final
    drained: bool
    statuses: dict[str, int]
    cpu: Cpu


def throughput(
    backend: Backend, mock: Server, plan: Plan, latency_ms: int, quiet: Quiet
) -> Throughput:
    _progress(
        f"{backend.name}, upstream {latency_ms} ms: {plan.jobs:,} jobs, {plan.clients} clients"
    )
    backend.db.empty()
    set_latency(mock, latency_ms)
    quiet.wait()
    cpu = Cpu(backend.pids(mock), backend.db.pg_database).start()
    sent = submit(backend.api.url, plan.jobs, plan.clients, f"e2e {latency_ms}")
    drained = backend.db.wait_drained(len(sent.ids), timeout_s=300)
    cpu.stop(sent.cpu_s)
    _, last = backend.db.span()
    rate = len(sent.ids) / max(last - sent.started, 1e-9)
    return Throughput(backend.name, latency_ms, sent, rate, drained, backend.db.by_status(), cpu)


def throughput_table(results: Sequence[Throughput], goals: list[Goal]) -> Table:
    table = Table(
        "Throughput: jobs POSTed by 64 connections at once, until every job is final",
        [
            "backend",
            "upstream",
            "jobs",
            "enqueued/s",
            "completed/s e2e",
            "POST p50/p99 ms",
            "CPU ms/job: API",
            "workers",
            "PostgreSQL",
            "mock",
            "submitter",
            "others %core",
        ],
    )
    for r in results:
        n = len(r.sent.ids)
        table.add(
            r.backend,
            f"{r.latency_ms} ms",
            f"{n:,}",
            fmt(r.sent.rate, 0),
            fmt(r.completed_per_s, 0) + ("" if r.drained else " (timeout)"),
            f"{fmt(percentile(r.sent.latency_ms, 0.5), 0)}/"
            f"{fmt(percentile(r.sent.latency_ms, 0.99), 0)}",
            fmt(r.cpu.per_job_ms("API (serve)", n), 2),
            fmt(r.cpu.runners_per_job_ms(n), 2) if r.backend != "embedded" else "(in API)",
            fmt(r.cpu.per_job_ms("PostgreSQL", n), 2) if r.backend != "embedded" else "-",
            fmt(r.cpu.per_job_ms("mock-upstream", n), 2),
            fmt(r.cpu.per_job_ms("submitter", n), 2),
            fmt(r.cpu.others_share, 0),
        )
        unfinished = {k: v for k, v in r.statuses.items() if k != "succeeded"}
        if r.sent.failures or unfinished:
            table.notes.append(
                f"{r.backend} {r.latency_ms} ms: refused {r.sent.failures or 'none'}; "
                f"not succeeded {unfinished or 'none'}"
            )
        if r.backend != "embedded" and r.latency_ms == 0:
            goals.append(
                Goal(
                    f"completed jobs/s e2e, {r.backend} + 2 workers, 0 ms",
                    r.completed_per_s,
                    GOAL_COMPLETED_PER_S,
                    "jobs/s",
                    at_least=True,
                    digits=0,
                )
            )
    table.notes += [
        "enqueued/s = 202s / submission time; completed/s e2e = jobs / (last finished_at - "
        "first POST)",
        "CPU: user+system of all threads per accepted job; PostgreSQL = the server processes "
        "serving the run's database; others = every other process on the machine, in % of "
        "one core over the case (the noise: read the figures next to it)",
    ]
    return table


@dataclass(slots=True)
class Drain:
    jobs: int
    completed_per_s: float  # first started_at to last finished_at
    drained: bool
    statuses: dict[str, int]
    cpu: Cpu


def drain(backend: Backend, mock: Server, plan: Plan, quiet: Quiet) -> Drain:
    """The workers alone: ``plan.jobs`` queued first, then 2 workers started (0 ms upstream)."""
    assert backend.database_url is not None
    _progress(f"{backend.name}: drain of {plan.jobs:,} queued jobs by 2 new workers, 0 ms")
    backend.stop_workers()
    backend.db.empty()
    set_latency(mock, 0)
    sent = submit(backend.api.url, plan.jobs, plan.clients, "drain")
    quiet.wait()
    backend.start_workers(backend.config(mock), 1000)
    cpu = Cpu(backend.pids(mock), backend.db.pg_database).start()
    drained = backend.db.wait_drained(len(sent.ids), timeout_s=300)
    cpu.stop(0.0)
    first, last = backend.db.span()
    rate = len(sent.ids) / max(last - first, 1e-9)
    return Drain(len(sent.ids), rate, drained, backend.db.by_status(), cpu)


def drain_table(r: Drain, backend: str) -> Table:
    table = Table(
        f"{backend} workers alone: {r.jobs:,} queued jobs drained by 2 workers, upstream 0 ms",
        ["figure", "value"],
    )
    table.add("completed/s (first started_at to last finished_at)", fmt(r.completed_per_s, 0))
    table.add("worker CPU ms/job (both workers)", fmt(r.cpu.runners_per_job_ms(r.jobs), 2))
    table.add("PostgreSQL CPU ms/job", fmt(r.cpu.per_job_ms("PostgreSQL", r.jobs), 2))
    table.add("mock CPU ms/job", fmt(r.cpu.per_job_ms("mock-upstream", r.jobs), 2))
    table.add("other processes (% of a core)", fmt(r.cpu.others_share, 0))
    table.add("jobs by status", _statuses(r.statuses) + ("" if r.drained else " (timeout)"))
    return table


def _statuses(found: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(found.items()))


# -- queue wait -------------------------------------------------------------------------------


@dataclass(slots=True)
class QueueWait:
    backend: str
    rate: float
    accepted: int
    waits_ms: list[float]
    others_share: float


def queue_wait(backend: Backend, mock: Server, plan: Plan, rate: float, quiet: Quiet) -> QueueWait:
    count = max(1, int(rate * plan.wait_s))
    _progress(f"{backend.name}: queue wait, {count:,} jobs at {rate:g}/s (upstream 50 ms)")
    backend.db.empty()
    set_latency(mock, 50)
    quiet.wait()
    cpu = Cpu(backend.pids(mock), backend.db.pg_database).start()
    sent = submit(backend.api.url, count, plan.clients, "wait", rate=rate)
    backend.db.wait_drained(len(sent.ids), timeout_s=120)
    cpu.stop(sent.cpu_s)
    waits = backend.db.rows(
        "SELECT (started_at - created_at) * 1000 FROM jobs WHERE started_at IS NOT NULL"
    )
    return QueueWait(
        backend.name, rate, len(sent.ids), [float(w) for (w,) in waits], cpu.others_share
    )


def queue_wait_table(results: Sequence[QueueWait]) -> Table:
    table = Table(
        "Queue wait (started_at - created_at) at a steady rate below saturation",
        ["backend", "rate jobs/s", "jobs", "p50 ms", "p95 ms", "p99 ms", "max ms", "others %core"],
    )
    for r in results:
        table.add(
            r.backend,
            fmt(r.rate, 0),
            f"{r.accepted:,}",
            fmt(percentile(r.waits_ms, 0.5), 1),
            fmt(percentile(r.waits_ms, 0.95), 1),
            fmt(percentile(r.waits_ms, 0.99), 1),
            fmt(max(r.waits_ms, default=float("nan")), 1),
            fmt(r.others_share, 0),
        )
    table.notes.append(
        "open loop (evenly spaced POSTs), upstream 50 ms; the rate is half the backend's 0 ms "
        "end-to-end figure, capped"
    )
    return table


# -- jobs in flight ---------------------------------------------------------------------------

HOLD_LATENCY_MS = 30_000  # long enough for the workers to start every job they can hold


@dataclass(slots=True)
class InFlight:
    latency_ms: int
    jobs: int
    peak_per_owner: dict[str, int]
    peak_mock: int
    drain_s: float
    drained: bool
    statuses: dict[str, int]
    claims: int
    samples: int
    rss_mib: list[float]
    others_share: float

    @property
    def peaks(self) -> list[int]:
        """Peak running jobs per worker, highest first (0 for a worker that held none)."""
        return [*sorted(self.peak_per_owner.values(), reverse=True), 0, 0][:2]


def in_flight(backend: Backend, mock: Server, plan: Plan, quiet: Quiet) -> list[InFlight]:
    """Queue ``plan.in_flight_jobs`` with no worker running (so that the backlog, not the
    submission rate, feeds the workers), start 2 workers with ``--concurrency
    plan.in_flight_concurrency`` and sample what they hold until every job is final; at 1 s
    upstream latency, then (as many jobs queued anew) at 30 s. Jobs are queued through the
    API each time, so every backend's own dispatch (Procrastinate's entries) has them."""
    assert backend.database_url is not None
    n, concurrency = plan.in_flight_jobs, plan.in_flight_concurrency
    config = backend.config(mock, concurrency=concurrency)
    found = []
    for latency_ms in (1000, HOLD_LATENCY_MS):
        _progress(f"in flight: {n:,} jobs queued, then 2 workers x {concurrency:,}")
        backend.stop_workers()
        backend.db.empty()
        sent = submit(backend.api.url, n, plan.clients, f"inflight {latency_ms}")
        _progress(f"in flight: upstream {latency_ms / 1000:g} s")
        set_latency(mock, latency_ms)
        quiet.wait()
        found.append(_sample_in_flight(backend, mock, config, concurrency, latency_ms))
        found[-1].jobs = len(sent.ids)
    backend.stop_workers()
    return found


def _sample_in_flight(
    backend: Backend, mock: Server, config: str, concurrency: int, latency_ms: int
) -> InFlight:
    started = time.monotonic()
    backend.start_workers(config, concurrency)
    cpu = Cpu(backend.pids(mock), backend.db.pg_database).start()
    peak: Counter[str] = Counter()
    peak_mock, samples, drained = 0, 0, False
    rss = [0.0 for _ in backend.workers]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for owner, count in backend.db.running_per_owner().items():
            peak[owner] = max(peak[owner], count)
        peak_mock = max(peak_mock, int(mock_stats(mock)["in_flight"]))
        for i, worker in enumerate(backend.workers):
            with contextlib.suppress(OSError):
                rss[i] = max(rss[i], _procs.rss_mib(worker.pid))
        samples += 1
        if backend.db.pending() == 0:
            drained = True
            break
        time.sleep(0.2)
    cpu.stop(0.0)
    return InFlight(
        latency_ms=latency_ms,
        jobs=0,
        peak_per_owner=dict(peak),
        peak_mock=peak_mock,
        drain_s=time.monotonic() - started,
        drained=drained,
        statuses=backend.db.by_status(),
        claims=backend.db.count("SELECT count(*) FROM job_events WHERE status = 'running'"),
        samples=samples,
        rss_mib=rss,
        others_share=cpu.others_share,
    )


def in_flight_table(
    results: Sequence[InFlight], concurrency: int, goals: list[Goal], backend: str
) -> Table:
    table = Table(
        f"Jobs in flight, {backend}: {results[0].jobs:,} queued jobs, then 2 workers x "
        f"--concurrency {concurrency:,}",
        ["figure", *(f"upstream {r.latency_ms / 1000:g} s" for r in results)],
    )
    rows: list[tuple[str, Any]] = [
        ("peak jobs running (claimed), per worker", lambda r: "{:,} / {:,}".format(*r.peaks)),
        ("peak upstream requests in flight (mock), both", lambda r: f"{r.peak_mock:,}"),
        ("  per worker (mock / 2)", lambda r: f"{r.peak_mock / 2:,.0f}"),
        (
            "from starting the workers to all final (s)",
            lambda r: fmt(r.drain_s, 1) + ("" if r.drained else " (timeout)"),
        ),
        ("jobs/s over that time", lambda r: fmt(r.jobs / max(r.drain_s, 1e-9), 0)),
        ("jobs by status", lambda r: _statuses(r.statuses)),
        ("attempts beyond the first", lambda r: f"{r.claims - r.jobs:,}"),
        ("worker RSS peak (MiB)", lambda r: " / ".join(fmt(x, 0) for x in r.rss_mib)),
        ("other processes (% of a core)", lambda r: fmt(r.others_share, 0)),
    ]
    for name, cell in rows:
        table.add(name, *(cell(r) for r in results))
    table.notes += [
        f"running = status 'running' per lease owner in the jobs table; in flight = the mock's "
        f"gauge of requests it holds; both sampled every 0.2 s ({results[0].samples} samples "
        "at 1 s)",
        "at 1 s, in flight = jobs started per second x 1 s (Little's law): the figure is the "
        "workers' start rate; at 30 s it is how many they can hold",
    ]
    goals.append(
        Goal(
            f"upstream requests in flight per worker at 1 s, {backend}",
            results[0].peak_mock / 2,
            GOAL_IN_FLIGHT_PER_WORKER,
            "jobs",
            at_least=True,
            digits=0,
        )
    )
    return table


# -- kill -9 ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Crash:
    sent: Submitted
    in_db: int
    statuses: dict[str, int]
    lost: int
    duplicated: int
    multi_final: int
    held_at_kill: int
    recovered_killed: int
    recovered_live: int
    claims: int
    upstream_calls: int
    done_at_kill: int
    finish_after_kill_s: float
    drained: bool


def crash(backend: Backend, mock: Server, plan: Plan, quiet: Quiet) -> Crash:
    """Submit ``plan.crash_jobs`` while 2 workers (lease 5 s, heartbeat 1 s) run them,
    ``kill -9`` one when a third have succeeded; the other must finish everything."""
    assert backend.database_url is not None
    n = plan.crash_jobs
    _progress(f"crash: {n:,} jobs, upstream 500 ms, kill -9 of worker 1 a third of the way")
    backend.stop_workers()
    backend.db.empty()
    set_latency(mock, 500)
    config = backend.config(mock, lease_s=5.0, heartbeat_s=1.0)
    backend.start_workers(config, 1000)
    quiet.wait()
    calls_before = mock_calls(mock)
    submission = Submission(SubmitSpec(backend.api.url + "/v1/jobs", n, plan.clients, tag="crash"))
    succeeded = "SELECT count(*) FROM jobs WHERE status = 'succeeded'"
    while backend.db.count(succeeded) < n // 3 and not submission.done():
        time.sleep(0.05)
    victim = backend.workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait(10)
    killed_at = time.time()
    done_at_kill = backend.db.count(succeeded)
    running = backend.db.rows("SELECT id, lease_owner FROM jobs WHERE status = 'running'")
    sent = submission.result()
    drained = backend.db.wait_drained(len(sent.ids), timeout_s=300)
    finish_s = time.time() - killed_at
    counts = _crash_count(backend.db, sent, running, killed_at)
    return Crash(
        **counts,
        upstream_calls=mock_calls(mock) - calls_before,
        done_at_kill=done_at_kill,
        finish_after_kill_s=finish_s,
        drained=drained,
    )


def _crash_count(
    db: Jobs, sent: Submitted, running: list[tuple[Any, ...]], killed_at: float
) -> dict[str, Any]:
    """The counts of :class:`Crash` that the tables hold. ``running``: (id, lease owner) of
    the running jobs read just after the kill."""
    final = {str(i) for (i,) in db.rows(f"SELECT id FROM jobs WHERE status IN {_in(FINAL)}")}
    several = (
        "SELECT count(*) FROM (SELECT job_id FROM job_events WHERE status IN {} "
        "GROUP BY job_id HAVING count(*) > 1) AS d"
    )
    claims = [
        (json.loads(detail).get("worker"), at)
        for detail, at in db.rows("SELECT detail, at FROM job_events WHERE status = 'running'")
    ]
    # The killed worker claimed jobs before the kill and never after; the survivor after too.
    killed = {w for w, at in claims if at < killed_at} - {
        w for w, at in claims if at > killed_at + 0.5
    }
    taken_back = [
        (detail["worker"], at)
        for detail, at in (
            (json.loads(d), at)
            for d, at in db.rows("SELECT detail, at FROM job_events WHERE status = 'queued'")
        )
        if detail.get("reason") == "lease_expired"
    ]
    # Taken back from the dead worker after its death; any other was a live worker's lease.
    rightly = sum(1 for w, at in taken_back if w in killed and at >= killed_at)
    return {
        "sent": sent,
        "in_db": db.count("SELECT count(*) FROM jobs"),
        "statuses": db.by_status(),
        "lost": sum(1 for job_id in sent.ids if job_id not in final),
        "duplicated": db.count(several.format("('succeeded')")),
        "multi_final": db.count(several.format(_in(FINAL))),
        "held_at_kill": sum(1 for _, owner in running if owner in killed),
        "recovered_killed": rightly,
        "recovered_live": len(taken_back) - rightly,
        "claims": len(claims),
    }


def _in(values: Sequence[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def crash_table(r: Crash, goals: list[Goal], backend: str) -> Table:
    table = Table(
        f"kill -9 of one of 2 workers mid-run: {len(r.sent.ids):,} jobs, {backend}, "
        "lease 5 s, heartbeat 1 s, upstream 500 ms",
        ["figure", "value"],
    )
    refused = f" (refused: {r.sent.failures})" if r.sent.failures else ""
    table.add("accepted (202)", f"{len(r.sent.ids):,}{refused}")
    table.add("jobs in the table", f"{r.in_db:,}")
    for status in FINAL:
        table.add(f"  {status}", f"{r.statuses.get(status, 0):,}")
    table.add("lost (accepted, not final at the end)", f"{r.lost:,}")
    table.add("duplicated results (> 1 succeeded event)", f"{r.duplicated:,}")
    table.add("jobs with > 1 final event", f"{r.multi_final:,}")
    table.add("succeeded before the kill", f"{r.done_at_kill:,}")
    table.add("running on the killed worker at the kill", f"{r.held_at_kill:,}")
    table.add("  of those, taken back after their lease expired", f"{r.recovered_killed:,}")
    table.add("leases of live workers taken back (spurious)", f"{r.recovered_live:,}")
    table.add("claims (attempts) / upstream calls", f"{r.claims:,} / {r.upstream_calls:,}")
    table.add(
        "from the kill to every job final (s)",
        fmt(r.finish_after_kill_s, 1) + ("" if r.drained else " (timeout)"),
    )
    goals.append(Goal(f"crash, {backend}: lost jobs", float(r.lost), 0, "jobs", digits=0))
    duplicated = float(r.duplicated)
    goals.append(Goal(f"crash, {backend}: duplicated results", duplicated, 0, "jobs", digits=0))
    return table


# -- the run ----------------------------------------------------------------------------------


def header(quick: bool, code: Code, database: str | None) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    before = _quiet.process_cpu_s()
    time.sleep(1.0)
    busy = 100 * (_quiet.process_cpu_s() - before)
    pg = "PostgreSQL: a database made for the run" if database else "PostgreSQL: skipped"
    return "\n".join(
        [
            f"Headrace jobs benchmark ({'--quick' if quick else 'full'}), "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"machine: {len(_procs.ALL_CORES)} cores ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}; at start: load average {load}, "
            f"other processes {busy:.0f}% of a core",
            f"code: {code.describe()}",
            f"{pg}; processes not pinned; access log on; the submitter is its own process",
        ]
    )


def measure(
    backend: Backend,
    mock: Server,
    plan: Plan,
    sections: set[str],
    latencies: list[int],
    quiet: Quiet,
    goals: list[Goal],
) -> list[Table]:
    """Every section asked for, on ``backend``: its throughput and queue-wait results go to
    ``backend.results``; the tables of the PostgreSQL-only sections are returned."""
    if sections & {"throughput", "wait"}:
        backend.results += [throughput(backend, mock, plan, ms, quiet) for ms in latencies]
    if "wait" in sections and 0 in latencies:
        e2e = next(r for r in backend.results if isinstance(r, Throughput) and r.latency_ms == 0)
        rate = max(10.0, min(plan.wait_rate_cap, round(e2e.completed_per_s / 2, -1)))
        backend.results.append(queue_wait(backend, mock, plan, rate, quiet))
    tables: list[Table] = []
    if backend.database_url is None:
        return tables
    if "drain" in sections:
        tables.append(drain_table(drain(backend, mock, plan, quiet), backend.name))
    if "inflight" in sections:
        found = in_flight(backend, mock, plan, quiet)
        tables.append(in_flight_table(found, plan.in_flight_concurrency, goals, backend.name))
    if "crash" in sections:
        tables.append(crash_table(crash(backend, mock, plan, quiet), goals, backend.name))
    return tables


def run(plan: Plan, args: argparse.Namespace, workdir: Path) -> None:
    code = Code.at(args.commit, workdir)
    database = None if args.no_postgres else args.database_url
    sections = set(args.sections.split(","))
    print(header(args.quick, code, database), end="\n\n", flush=True)
    goals: list[Goal] = []
    quiet = Quiet(plan.quiet_budget_s)
    latencies = [int(ms) for ms in args.latencies.split(",")]
    results: list[Throughput] = []
    waits: list[QueueWait] = []
    later: list[Table] = []  # the PostgreSQL backends' own sections, shown after the others
    with contextlib.ExitStack() as stack:
        _progress("starting mock-upstream")
        mock = Launcher(stack, workdir, code).mock()
        kinds = [] if args.no_embedded else ["embedded"]
        kinds += args.queues.split(",") if database else []
        for kind in kinds:
            # One backend at a time, stopped before the next: idle servers would be noise.
            with contextlib.ExitStack() as own:
                launch = Launcher(own, workdir, code)
                if kind == "embedded":
                    _progress("starting the embedded gateway")
                    backend = embedded(launch, mock)
                else:
                    assert database is not None
                    url = own.enter_context(fresh_postgres(database))
                    _progress(f"headrace migrate, then serve and 2 workers ({kind} queue)")
                    backend = postgres(launch, mock, url, kind)
                own.callback(backend.db.dispose)
                later += measure(backend, mock, plan, sections, latencies, quiet, goals)
                results += [r for r in backend.results if isinstance(r, Throughput)]
                waits += [r for r in backend.results if isinstance(r, QueueWait)]
    if "throughput" in sections:
        _show(throughput_table(results, goals))
    if waits:
        _show(queue_wait_table(waits))
    for table in later:
        _show(table)
    table = goals_table(goals)
    table.notes.append(
        f"other processes: {quiet.waited_s:.0f} s spent waiting for quiet "
        f"(budget {plan.quiet_budget_s:g} s)"
    )
    print(table.render())


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--submitter":
        submitter_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, about 3 minutes")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("HEADRACE_TEST_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="the PostgreSQL server to make the run's database on (default: "
        f"HEADRACE_TEST_DATABASE_URL or {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument("--no-postgres", action="store_true", help="the embedded backend only")
    parser.add_argument("--no-embedded", action="store_true", help="the PostgreSQL backends only")
    parser.add_argument(
        "--queues",
        default="sql,procrastinate",
        help="the job queue backends to run on PostgreSQL, comma-separated, each on a database "
        "of its own (default: sql,procrastinate)",
    )
    parser.add_argument(
        "--sections",
        default="throughput,wait,drain,inflight,crash",
        help="which sections to run, comma-separated (default: all five)",
    )
    parser.add_argument(
        "--latencies",
        default=",".join(str(ms) for ms in LATENCIES_MS),
        help="upstream latencies (ms) of the throughput section, comma-separated (default: 0,50)",
    )
    parser.add_argument(
        "--logs", type=Path, help="copy the servers' logs into this directory at the end"
    )
    parser.add_argument(
        "--commit",
        help="run the servers from src/ as of this commit (e.g. HEAD) instead of the working tree",
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    with _procs.bounded_run(plan.time_limit_s, prefix="headrace-bench-jobs-") as workdir:
        try:
            run(plan, args, workdir)
        finally:
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in workdir.glob("*.log"):
                    shutil.copy(log, args.logs)


if __name__ == "__main__":
    main()
