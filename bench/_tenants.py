"""The tenants of bench/tenancy.py: their gateways, keys and the usage they record.

Starts the three gateways (``baseline``, ``memory``, ``redis+postgres``), creates each user
key and its team through the admin API, and counts, once a gateway is idle, its chat requests
(its own ``headrace_requests_total``) against the usage records in its database. Also: the
warnings and errors in a gateway's log, Redis's process (to read its CPU, and to pin it for
the run with ``--redis-cores gateway``), the run's Redis counters (deleted at the end), and
the fresh PostgreSQL database of bench/usage_writer.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import redis
import sqlalchemy

import _procs
from _phases import CHAT, CHAT_PATH, Target
from _procs import Code, Launcher, Server

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
PRICE_PER_MTOK_USD = (0.15, 0.60)  # so that requests cost something and budgets move
# Limits that a benchmark never reaches, yet every one is checked on every request.
NEVER_RPM = 10**9
NEVER_TPM = 2**31 - 1  # the largest the PostgreSQL schema holds (INTEGER)
NEVER_PARALLEL = 10_000
NEVER_BUDGET_USD = 1_000_000


@dataclass(frozen=True, slots=True)
class Setup:
    """One gateway under test: its bearer key and the database its usage records go to."""

    label: str
    gateway: Server
    key: str
    usage_url: str | None  # a synchronous SQLAlchemy URL; None: recording is off
    owners: tuple[str, ...] = ()  # the key's and team's ids (their Redis counters)

    @property
    def target(self) -> Target:
        return Target(self.label, self.gateway, self.gateway, self.key)


@dataclass(frozen=True, slots=True)
class Accounting:
    """A gateway's chat requests by HTTP status (its own counter) and the usage records stored,
    by the status they record."""

    requests: dict[int, int]
    records: dict[int, int]

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_records(self) -> int:
        return sum(self.records.values())

    @property
    def unmatched(self) -> int:
        """Requests without a record plus records without a request, status by status."""
        statuses = self.requests.keys() | self.records.keys()
        return sum(abs(self.requests.get(s, 0) - self.records.get(s, 0)) for s in statuses)


def by_status(counts: dict[int, int]) -> str:
    return ", ".join(f"{status}: {n:,}" for status, n in sorted(counts.items())) or "none"


# -- the gateways ---------------------------------------------------------------------------


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """``--database-url`` and ``--redis-url``: the servers of the redis+postgres gateway."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("HEADRACE_TEST_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="the PostgreSQL server to create the run's database on (default: "
        f"HEADRACE_TEST_DATABASE_URL or {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("HEADRACE_TEST_REDIS_URL", DEFAULT_REDIS_URL),
        help=f"the Redis for limits.backend redis (default: HEADRACE_TEST_REDIS_URL or "
        f"{DEFAULT_REDIS_URL}); the run's counters are deleted at the end",
    )


def gateway_config(mock: Server, extra: str) -> str:
    base = _procs.mock_gateway_config(mock, access_log=True, price_per_mtok_usd=PRICE_PER_MTOK_USD)
    return base + extra


def provision(gateway: Server, team_id: str) -> tuple[str, str]:
    """A team and a user key in it through the admin API, every limit set; (secret, key id)."""
    team = {"id": team_id, "rpm": NEVER_RPM, "budget_usd": NEVER_BUDGET_USD}
    _admin(gateway, "/admin/teams", team)
    key = {
        "name": "bench",
        "team_id": team_id,
        "rpm": NEVER_RPM,
        "tpm": NEVER_TPM,
        "max_parallel": NEVER_PARALLEL,
        "budget_usd": NEVER_BUDGET_USD,
    }
    created = _admin(gateway, "/admin/keys", key)
    return str(created["key"]), str(created["id"])


def _admin(gateway: Server, path: str, body: dict[str, object]) -> dict[str, object]:
    admin = {"Authorization": f"Bearer {_procs.ADMIN_KEY}"}
    try:
        answer: dict[str, object] = json.loads(
            _procs.http("POST", gateway.url + path, body, headers=admin)
        )
    except urllib.error.HTTPError as exc:
        tail = gateway.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(
            f"{gateway.name}: POST {path} answered {exc.code} {exc.read().decode()!r}; the end "
            f"of its log:\n{tail}"
        ) from None
    return answer


def quota_policy(setup: Setup) -> str:
    """The ``RateLimit-Policy`` header of one request: proof that the limits apply."""
    request = urllib.request.Request(
        setup.gateway.url + CHAT_PATH,
        data=json.dumps(CHAT).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {setup.key}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()
        return str(response.headers.get("ratelimit-policy") or "")


def start_gateways(
    launch: Launcher, mock: Server, postgres: str, redis_url: str, run_id: str
) -> list[Setup]:
    baseline = launch.gateway("baseline", gateway_config(mock, "usage: {enabled: false}\n"))
    setups = [Setup("baseline", baseline, _procs.ADMIN_KEY, None)]
    memory = launch.gateway("memory", gateway_config(mock, "limits: {backend: memory}\n"))
    sqlite = f"sqlite:///{launch.workdir / 'memory-data' / 'headrace.db'}"
    shared = launch.gateway(
        "redis-postgres",
        gateway_config(
            mock,
            f"limits: {{backend: redis, redis_url: '{redis_url}'}}\ndatabase_url: '{postgres}'\n",
        ),
        migrate=True,
    )
    for label, gateway, url in (("memory", memory, sqlite), ("redis+postgres", shared, postgres)):
        team_id = f"bench-{run_id}"
        secret, key_id = provision(gateway, team_id)
        setups.append(Setup(label, gateway, secret, url, (key_id, team_id)))
    for setup in setups[1:]:
        if "key-rpm" not in quota_policy(setup) or "team-rpm" not in quota_policy(setup):
            raise RuntimeError(f"{setup.label}: the key's limits do not apply to its requests")
    return setups


def _samples(text: str, name: str, *matches: str) -> list[tuple[str, float]]:
    """``(label text, value)`` of each sample of ``name`` whose labels contain ``matches``."""
    found = []
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(m in line for m in matches):
            labels, _, value = line.rpartition(" ")
            found.append((labels, float(value)))
    return found


def metric(setup: Setup, name: str, *matches: str) -> int:
    """The sum of the samples of ``name`` whose label text contains every one of ``matches``."""
    text = _procs.http("GET", setup.gateway.url + "/metrics").decode()
    return round(sum(value for _, value in _samples(text, name, *matches)))


def stored_records(url: str) -> dict[int, int]:
    """Usage records by the HTTP status they record."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    query = "SELECT status, count(*) FROM usage_records GROUP BY status"
    try:
        with engine.connect() as conn:
            return {int(status): int(n) for status, n in conn.execute(sqlalchemy.text(query))}
    finally:
        engine.dispose()


_STATUS = re.compile(r'status="(\d+)"')


def accounting(setup: Setup, timeout_s: float = 15.0) -> Accounting:
    """The gateway's chat requests and its usage records, once no request is in flight and
    the writer has nothing pending (or ``timeout_s`` passed). Call it between phases."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = _procs.http("GET", setup.gateway.url + "/metrics").decode()
        busy = sum(v for _, v in _samples(text, "headrace_active_requests")) > 1  # this scrape
        pending = sum(v for _, v in _samples(text, "headrace_usage_pending"))
        if not (busy or pending) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    requests: dict[int, int] = {}
    for labels, value in _samples(text, "headrace_requests_total", f'route="{CHAT_PATH}"'):
        status = _STATUS.search(labels)
        if status:
            requests[int(status.group(1))] = requests.get(int(status.group(1)), 0) + round(value)
    records = stored_records(setup.usage_url) if setup.usage_url else {}
    return Accounting(requests, records)


def log_events(gateway: Server) -> collections.Counter[str]:
    """Warnings and errors in the gateway's log by event; an unhandled error by exception."""
    events: collections.Counter[str] = collections.Counter()
    for line in gateway.log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("level") not in ("warning", "error", "critical"):
                continue
            name = str(event.get("event"))
            exception = str(event.get("exception") or "").strip().rsplit("\n", 1)[-1]
            if exception:
                name += f" ({exception.split(':', 1)[0].rsplit('.', 1)[-1]})"
            elif isinstance(error := event.get("error"), str) and error:
                name += f" ({error[:160]})"  # a warning's repr(exc): what went wrong
            events[name] += 1
    return events


CLIENT_GONE = "unhandled_error (ClientDisconnect)"


def describe_events(events: collections.Counter[str]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in events.most_common()) or "none"


def redis_pid(url: str) -> int | None:
    """Redis's process id when it runs on this machine (its CPU is then read per block)."""
    with contextlib.suppress(redis.RedisError, OSError, KeyError, ValueError):
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            pid = int(client.info("server")["process_id"])
        finally:
            client.close()
        if Path(f"/proc/{pid}/stat").exists() and url.split("//")[1].startswith(
            ("127.0.0.1", "localhost")
        ):
            return pid
    return None


@contextlib.contextmanager
def redis_on(pid: int | None, cores: frozenset[int] | None) -> Iterator[None]:
    """Run the local Redis (every thread of ``pid``) on ``cores`` until the block ends, then
    give each thread back the cores it had. Nothing when either is None."""
    if pid is None or cores is None:
        yield
        return
    before = {}
    for entry in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            before[int(entry.name)] = os.sched_getaffinity(int(entry.name))
    _procs.pin(pid, cores)
    try:
        yield
    finally:
        for tid, had in before.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, had)


def forget_counters(url: str, owners: tuple[str, ...]) -> None:
    """Delete the run's limiter counters from the shared Redis (a month's budget TTL)."""
    with contextlib.suppress(redis.RedisError, OSError):
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            for owner in owners:
                for name in client.scan_iter(match=f"hr:lim:*:{owner}:*", count=1000):
                    client.delete(name)
        finally:
            client.close()


@contextlib.contextmanager
def fresh_postgres(server_url: str, code: Code) -> Iterator[str]:
    """bench/usage_writer.py's fresh database (created for the run, dropped after)."""
    with usage_writer(code).fresh_database(server_url) as url:
        yield url


def usage_writer(code: Code) -> ModuleType:
    """bench/usage_writer.py, imported once Headrace's code under test is first on the path."""
    if code.snapshot is not None and str(code.snapshot) not in sys.path:
        sys.path.insert(0, str(code.snapshot))
    import usage_writer as module

    return module
