"""Instructions per request, counted by callgrind: two revisions side by side, without noise.

    .venv/bin/python bench/instructions.py                          # working tree against HEAD
    .venv/bin/python bench/instructions.py --baseline REV --commit REV
    .venv/bin/python bench/instructions.py --requests 100           # quicker, about 5 minutes
    .venv/bin/python bench/instructions.py --hits                   # response-cache hits instead

The time figures of bench/overhead.py and bench/tenancy.py move with the machine: the same
commit has measured 0.60 ms and 1.77 ms of gateway CPU per request on two days here. An
instruction count does not: valgrind's callgrind counts the instructions the gateway's
process executes (user space only: no kernel, no waiting, no cache misses), the same for
the same code and inputs whatever else the machine does. It answers "did this change make
the request path do more work, and how much", not "how long does it take".

For each revision, one ``headrace mock-upstream`` and three gateways run under callgrind with
collection on from the start; each gateway gets ``--warmup`` requests, its counters are
zeroed (``callgrind_control -z``), it gets ``--requests`` non-streamed chats one at a time,
and its counters are dumped (``callgrind_control -d``):

- ``baseline``: the tenancy benchmark's baseline (admin key, no limits, usage off);
- ``tenant``: a user key with RPM, TPM, parallel and budget limits in a team with its own,
  ``limits.backend: memory``, usage records into SQLite (the tenancy benchmark's ``memory``);
- ``redis+postgres``: the same key, ``limits.backend: redis`` and usage records into a
  PostgreSQL database created for the run (the tenancy benchmark's ``redis+postgres``):
  the limiter's client, its script's arguments and replies, and psycopg's work, but not
  Redis's or PostgreSQL's own (other processes). ``--no-redis`` leaves it out.

Prints instructions per request for each gateway and revision, and each tenant minus
``baseline`` (what tenancy costs in instructions). With ``--hits`` every request is the same
cacheable chat (temperature 0): the first warm-up request fills the response cache and every
counted one is a hit, checked against the mock's count of calls; ``baseline`` minus a tenant
is then what usage records and tenancy add to a hit. The gateways run with
``PYTHONHASHSEED=0`` and without the timers that would fire far more often per request
under callgrind (the job runner; usage records are written by batch). The same code counts
0.2 % apart within a run and up to 0.7 % between runs. Needs valgrind (Debian's package).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _phases import CHAT, CHAT_PATH
from _procs import Code, Launcher, Server
from _report import Table, fmt
from _tenants import (
    add_server_options,
    forget_counters,
    fresh_postgres,
    gateway_config,
    provision,
)

# Work that runs on timers, not per request, is kept out of the count as far as the
# configuration allows: no job runner in the gateway (its polls), and usage records written
# by batch size rather than every second (under callgrind a request takes about 50 ms, so a
# timer would fire many times more often per request than at full speed).
QUIET = "jobs: {run_in_process: false}\n"
BATCHED = "usage: {batch_size: 50, flush_interval_s: 3600}\n"
TENANTS = ("tenant", "redis+postgres")  # the gateways with a user key
STARTUP_S = 600.0  # a gateway's start under callgrind: about a minute here, alone


@dataclass(frozen=True, slots=True)
class Count:
    instructions: int
    requests: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


HIT = {**CHAT, "temperature": 0}  # cacheable: with --hits, answered from the cache


def chat(gateway: Server, key: str, body: dict[str, object], n: int) -> None:
    """``n`` non-streamed chats, one at a time; each must be answered."""
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(n):
        _procs.http("POST", gateway.url + CHAT_PATH, body, headers=headers, timeout_s=60)


def counted(
    gateway: Server, mock: Server, key: str, warmup: int, requests: int, dumps: Path, *, hits: bool
) -> Count:
    """Instructions the gateway executed for ``requests`` chats after ``warmup`` of them;
    with ``hits``, one cacheable chat that a first request puts in the cache, and none of
    those counted may reach the mock."""
    body = HIT if hits else CHAT
    if hits:
        chat(gateway, key, body, 1)
    chat(gateway, key, body, warmup)
    calls = _procs.mock_total(mock)
    subprocess.run(["callgrind_control", "-z", str(gateway.pid)], check=True, capture_output=True)
    chat(gateway, key, body, requests)
    subprocess.run(["callgrind_control", "-d", str(gateway.pid)], check=True, capture_output=True)
    if hits and _procs.mock_total(mock) != calls:
        raise RuntimeError(f"{gateway.name}: not every counted request was a cache hit")
    dump = next(dumps.parent.glob(f"{dumps.name}.{gateway.pid}.*"))
    match = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no instruction total in {dump}")
    return Count(int(match.group(1)), requests)


def setups(postgres: str | None, redis_url: str) -> dict[str, str]:
    """Each gateway's configuration beyond the mock model (redis+postgres when ``postgres``)."""
    configs = {
        "baseline": QUIET + "usage: {enabled: false}\n",
        "tenant": QUIET + "limits: {backend: memory}\n" + BATCHED,
    }
    if postgres is not None:
        configs["redis+postgres"] = (
            QUIET
            + f"limits: {{backend: redis, redis_url: '{redis_url}'}}\n"
            + f"database_url: '{postgres}'\n"
            + BATCHED
        )
    return configs


def measure(
    code: Code, workdir: Path, warmup: int, requests: int, args: argparse.Namespace
) -> dict[str, Count]:
    """The gateways of one revision, started and counted one after the other."""
    counts: dict[str, Count] = {}
    with contextlib.ExitStack() as stack:
        launch = Launcher(stack, workdir, code)
        mock = launch.mock()
        postgres = None
        if not args.no_redis:
            postgres = stack.enter_context(fresh_postgres(args.database_url, code))
        owners: list[str] = []
        stack.callback(lambda: forget_counters(args.redis_url, tuple(owners)))
        for name, extra in setups(postgres, args.redis_url).items():
            dumps = workdir / f"{name}.callgrind"
            wrapper = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={dumps}.%p")
            _progress(f"{code.commit or 'working tree'}: {name} gateway under callgrind")
            gateway = launch.gateway(
                name,
                gateway_config(mock, extra),
                wrapper=("env", "PYTHONHASHSEED=0", *wrapper),
                healthy_within_s=STARTUP_S,
                migrate=name == "redis+postgres",
            )
            key = _procs.ADMIN_KEY
            if name in TENANTS:
                team = f"bench-instructions-{os.getpid()}"
                key, key_id = provision(gateway, team)
                owners += [key_id, team]
            _progress(f"{code.commit or 'working tree'}: {name}, {warmup} + {requests} requests")
            counts[name] = counted(gateway, mock, key, warmup, requests, dumps, hits=args.hits)
            gateway.stop()
    return counts


def table(sides: dict[str, dict[str, Count]], requests: int, kind: str) -> Table:
    labels = list(sides)
    result = Table(
        f"Instructions per request (callgrind, user space), {kind}, {requests} requests one "
        "at a time",
        ["gateway", *labels, "difference"],
    )
    before, after = (sides[label] for label in labels)
    for name in before:
        a, b = before[name].per_request, after[name].per_request
        result.add(name, fmt(a, 0), fmt(b, 0), f"{fmt(b - a, 0, sign=True)} ({(b - a) / a:+.1%})")
    for name in TENANTS:
        if name in before:
            a, b = (
                side[name].per_request - side["baseline"].per_request for side in (before, after)
            )
            result.add(f"{name} minus baseline", fmt(a, 0), fmt(b, 0), fmt(b - a, 0, sign=True))
    result.notes.append(
        "tenant: a user key with every limit, memory limiter, usage records into SQLite; "
        "redis+postgres: the same key, Redis limiter, usage records into PostgreSQL (the "
        "gateway's own instructions only); baseline: the admin key, usage off; difference = "
        "second column minus first"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    _procs.add_revision_options(parser)
    parser.add_argument(
        "--requests", type=int, default=300, help="counted requests per gateway (a multiple of 50)"
    )
    parser.add_argument("--warmup", type=int, default=50, help="requests before counting")
    add_server_options(parser)
    parser.add_argument(
        "--no-redis", action="store_true", help="leave the redis+postgres gateway out"
    )
    parser.add_argument(
        "--hits",
        action="store_true",
        help="count response-cache hits (one cacheable chat repeated) instead of upstream calls",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    with _procs.bounded_run(3600) as workdir:
        sides: dict[str, dict[str, Count]] = {}
        for label, code, where in _procs.revisions(args, workdir):
            sides[label] = measure(code, where, args.warmup, args.requests, args)
        print()
        kind = "response-cache hits" if args.hits else "non-streamed chat"
        print(table(sides, args.requests, kind).render())


if __name__ == "__main__":
    main()
