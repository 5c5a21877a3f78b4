"""What the shared limiter costs per request on Redis: the script, the round trip, the floor.

    .venv/bin/python bench/limiter.py                      # working tree against HEAD
    .venv/bin/python bench/limiter.py --baseline REV --commit REV

Runs in this process against a Redis (``--redis-url`` or ``HEADRACE_TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/0``), no servers. The demands are what bench/tenancy.py's user key
makes: a key with RPM, TPM, parallel and budget limits in a team with RPM and a budget, six
counters per acquire and four per settlement (TPM refund, the parallel slot, two budgets).
For the ``RedisLimiter`` of each side (``src/headrace/limits/redis.py`` as of ``--baseline``
and of ``--commit``, or the working tree), in alternating rounds:

- Redis's own time per ``EVALSHA`` of an acquire and of a settlement (``INFO commandstats``:
  its ``usec`` over its ``calls``), and the commands the script ran per call;
- one acquire, awaited, as the gateway makes it: round-trip p50/p99 and this process's CPU;
- the same acquire 5 ms after the last (``--paced`` of them per round), as requests come at
  200/s in bench/tenancy.py: both processes sleep between calls, and waking them costs time;
  each is settled right after its acquire, its answer not waited for, as the gateway does
  (``QuotaGuard.settle_later``), so Redis's time and commands per ``EVALSHA`` over these,
  and this process's CPU per acquire and settlement, are the gateway's;
- the floor under any round trip here: ``PING`` over a plain asyncio socket, same figures,
  back to back and 5 ms apart.

The counters live under a prefix of their own, deleted at the end. Other clients of the same
Redis skew the command counts: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import Table, fmt, percentile
from headrace.limits.base import Demand, LimitKind, Settlement

ROOT = Path(__file__).resolve().parent.parent
MODULE = "src/headrace/limits/redis.py"
NEVER = 10**15  # limits too high to refuse
PACE_S = 0.005  # between paced calls: 200/s, bench/tenancy.py's fixed rate


def demands() -> list[Demand]:
    rate, parallel, budget = LimitKind.RATE, LimitKind.CONCURRENCY, LimitKind.BUDGET
    return [
        Demand("key:k:rpm", rate, NEVER, 1),
        Demand("key:k:tpm", rate, NEVER, 300),
        Demand("key:k:parallel", parallel, NEVER, 1, 600.0),
        Demand("key:k:budget", budget, NEVER, 200, 86_400.0),
        Demand("team:t:rpm", rate, NEVER, 1),
        Demand("team:t:budget", budget, NEVER, 200, 86_400.0),
    ]


def settlements(ds: list[Demand]) -> list[Settlement]:
    return [
        Settlement.of(ds[1], -100),
        Settlement.of(ds[2]),
        *(Settlement.of(ds[i], -50) for i in (3, 5)),
    ]


def load(revision: str | None) -> ModuleType:
    """The limiter module of ``revision`` (None: the working tree), under a name of its own."""
    if revision is None:
        source = (ROOT / MODULE).read_text()
    else:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:{MODULE}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    name = f"_bench_limiter_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{revision or 'working tree'}:{MODULE}", "exec"), module.__dict__)
    return module


@dataclass
class Side:
    label: str
    module: ModuleType
    prefix: str
    acquire_us: list[float] = field(default_factory=list)  # Redis time per EVALSHA
    settle_us: list[float] = field(default_factory=list)
    acquire_commands: list[float] = field(default_factory=list)
    settle_commands: list[float] = field(default_factory=list)
    round_trip_s: list[float] = field(default_factory=list)
    paced_s: list[float] = field(default_factory=list)  # acquires 5 ms apart
    paced_us: list[float] = field(default_factory=list)  # Redis time per EVALSHA, paced
    paced_commands: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # this process, per awaited acquire
    paced_cpu_us: list[float] = field(default_factory=list)  # per acquire and settlement, paced


def commandstats(client: redis.Redis) -> tuple[int, int, int]:
    """EVALSHA calls, their usec, and the calls of every other command but INFO."""
    stats: dict[str, Any] = client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    others = sum(
        s["calls"] for name, s in stats.items() if name not in ("cmdstat_evalsha", "cmdstat_info")
    )
    return int(evalsha["calls"]), int(evalsha["usec"]), int(others)


async def measure(
    side: Side, client: redis.Redis, url: str, calls: int, paced: int, round_: int
) -> None:
    limiter = side.module.RedisLimiter(url, prefix=side.prefix)
    ds = demands()
    ss = settlements(ds)
    leases = [f"{round_}-{i}" for i in range(calls)]
    try:
        for lease in leases[:20]:  # connections open, script loaded
            await limiter.acquire(ds, "warm-" + lease)
            await limiter.settle(ss, "warm-" + lease)
        c0, u0, o0 = commandstats(client)
        cpu0 = time.process_time()
        for lease in leases:
            started = time.perf_counter()
            await limiter.acquire(ds, lease)
            side.round_trip_s.append(time.perf_counter() - started)
        side.cpu_us.append((time.process_time() - cpu0) / calls * 1e6)
        c1, u1, o1 = commandstats(client)
        settling = []
        for lease in leases:  # one call each: the settlement goes out before the next
            settling.append(limiter.settle(ss, lease))
            for _ in range(3):
                await asyncio.sleep(0)
        await asyncio.gather(*settling)
        c2, u2, o2 = commandstats(client)
        settling = []
        cpu0 = time.process_time()
        for lease in leases[:paced]:
            await asyncio.sleep(PACE_S)
            started = time.perf_counter()
            await limiter.acquire(ds, "paced-" + lease)
            side.paced_s.append(time.perf_counter() - started)
            settling.append(limiter.settle(ss, "paced-" + lease))  # not waited for
        side.paced_cpu_us.append((time.process_time() - cpu0) / paced * 1e6)
        await asyncio.gather(*settling)
        c3, u3, o3 = commandstats(client)
        side.paced_us.append((u3 - u2) / (c3 - c2))
        side.paced_commands.append((o3 - o2) / (c3 - c2))
        side.acquire_us.append((u1 - u0) / (c1 - c0))
        side.settle_us.append((u2 - u1) / (c2 - c1))
        side.acquire_commands.append((o1 - o0) / (c1 - c0))
        side.settle_commands.append((o2 - o1) / (c2 - c1))
    finally:
        await limiter.aclose()


@dataclass
class Floor:
    round_trip_s: list[float]
    cpu_us: float
    paced_s: list[float]
    paced_cpu_us: float


async def ping_floor(url: str, calls: int, paced: int) -> Floor:
    """Round trips of ``PING`` on a plain asyncio socket, this process's CPU per one (µs), and
    round trips of ``paced`` more, 5 ms apart, with the CPU per one (its wake-up included)."""
    settings = redis.connection.parse_url(url)
    reader, writer = await asyncio.open_connection(
        settings.get("host", "127.0.0.1"), settings.get("port", 6379)
    )
    try:
        ping = b"*1\r\n$4\r\nPING\r\n"
        for _ in range(100):
            writer.write(ping)
            await reader.readline()
        times = []
        cpu0 = time.process_time()
        for _ in range(calls):
            started = time.perf_counter()
            writer.write(ping)
            await reader.readline()
            times.append(time.perf_counter() - started)
        cpu = (time.process_time() - cpu0) / calls * 1e6
        spaced = []
        cpu0 = time.process_time()
        for _ in range(paced):
            await asyncio.sleep(PACE_S)
            started = time.perf_counter()
            writer.write(ping)
            await reader.readline()
            spaced.append(time.perf_counter() - started)
        paced_cpu = (time.process_time() - cpu0) / paced * 1e6
        return Floor(times, cpu, spaced, paced_cpu)
    finally:
        writer.close()
        await writer.wait_closed()


def forget(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


def table(sides: list[Side], floor: Floor) -> Table:
    t = Table(
        "Shared limiter on Redis: six demands per acquire, four settlements",
        ["figure", *(s.label for s in sides)],
    )
    med = statistics.median

    def ms(xs: list[float], q: float) -> str:
        return fmt(percentile(xs, q / 100) * 1000, 3)

    t.add("Redis time per acquire EVALSHA (us)", *(fmt(med(s.acquire_us), 1) for s in sides))
    t.add("Redis time per settlement EVALSHA (us)", *(fmt(med(s.settle_us), 1) for s in sides))
    t.add("commands run by the acquire script", *(fmt(med(s.acquire_commands), 1) for s in sides))
    t.add("commands run by the settlement script", *(fmt(med(s.settle_commands), 1) for s in sides))
    t.add("acquire round trip p50 (ms)", *(ms(s.round_trip_s, 50) for s in sides))
    t.add("acquire round trip p99 (ms)", *(ms(s.round_trip_s, 99) for s in sides))
    t.add("client CPU per acquire, this process (us)", *(fmt(med(s.cpu_us), 0) for s in sides))
    t.add("acquire round trip p50, 5 ms apart (ms)", *(ms(s.paced_s, 50) for s in sides))
    t.add("acquire round trip p99, 5 ms apart (ms)", *(ms(s.paced_s, 99) for s in sides))
    t.add(
        "  client CPU per acquire and settlement, this process (us)",
        *(fmt(med(s.paced_cpu_us), 0) for s in sides),
    )
    t.add(
        "  Redis time per EVALSHA, acquire and settlement (us)",
        *(fmt(med(s.paced_us), 1) for s in sides),
    )
    t.add(
        "  commands per EVALSHA, acquire and settlement",
        *(fmt(med(s.paced_commands), 1) for s in sides),
    )
    times, cpu = floor.round_trip_s, floor.cpu_us
    t.notes += [
        f"floor, PING on a plain asyncio socket: round trip p50 {ms(times, 50)} ms, p99 "
        f"{ms(times, 99)} ms, client CPU {fmt(cpu, 0)} us per call; 5 ms apart: p50 "
        f"{ms(floor.paced_s, 50)} ms, p99 {ms(floor.paced_s, 99)} ms, client CPU "
        f"{fmt(floor.paced_cpu_us, 0)} us per call",
        "5 ms apart, the CPU includes waking from the sleep between calls; after 5 ms idle the "
        "code runs cold, several times slower than back to back (bench/tenancy.py's 200/s)",
        "Redis time = INFO commandstats usec / calls for EVALSHA (the script's own commands "
        "included); medians over the rounds",
    ]
    return t


async def run(args: argparse.Namespace) -> None:
    client = redis.Redis.from_url(args.redis_url)
    run_id = uuid.uuid4().hex[:8]
    sides = [
        Side(f"baseline {args.baseline}", load(args.baseline), f"hr:bench:{run_id}:a:"),
        Side(args.commit or "working tree", load(args.commit), f"hr:bench:{run_id}:b:"),
    ]
    try:
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else reversed(sides):
                await measure(side, client, args.redis_url, args.calls, args.paced, round_)
        floor = await ping_floor(args.redis_url, args.calls * 2, args.paced * 2)
    finally:
        for side in sides:
            forget(client, side.prefix)
        client.close()
    print(table(sides, floor).render())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("HEADRACE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    parser.add_argument("--baseline", default="HEAD", help="the commit to compare against")
    parser.add_argument("--commit", help="the commit measured (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=500, help="acquires per side per round")
    parser.add_argument(
        "--paced", type=int, default=60, help="acquires 5 ms apart per side per round"
    )
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the event loop (the gateway runs on uvloop; figures before 2026-11-27 17:00 UTC "
        "were on asyncio's)",
    )
    args = parser.parse_args()
    print(
        f"Headrace limiter benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; Redis {args.redis_url}; event loop {args.loop}\n"
    )
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
