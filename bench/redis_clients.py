"""One ``EVALSHA`` through four Redis clients: the gateway's CPU per call and the round trip.

    .venv/bin/python bench/redis_clients.py
    OTHER/bin/python bench/redis_clients.py     # a venv that has coredis and valkey-glide too

Why the limiter talks to Redis through a connection of its own (headrace.limits.resp,
docs/adr/0012-limiter-redis-connection.md), and what the libraries that could replace it cost
on the same command. For each client, in a new process on uvloop (as the gateway runs), with
the clients' order reversed every other round:

- 3,000 calls awaited one after another: this process's CPU per call (user + system, so the
  socket's system calls are in it) and the round trip's p50/p99;
- 64 callers at once, 100 calls each: CPU per call and calls/s.

The script reads six keys and answers fifteen integers, as the limiter's acquire does, with a
200-byte binary argument. Clients the Python running this has not installed are left out
(the project's venv has headrace's and redis-py's; coredis and valkey-glide are not project
dependencies: put them in a venv of their own with redis, hiredis and uvloop, and run this
file with its Python). valkey-glide does its I/O on a Rust thread: the process's CPU counts
it, and the table shows the main thread's too.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import Table, fmt, percentile

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "hr:bench:clients:"
SCRIPT = (
    "redis.call('TIME') for i = 1, #KEYS do redis.call('GET', KEYS[i]) end "
    "return {1, 0, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}"
)
KEYS: list[str | bytes] = [f"{PREFIX}R:key:k{i}:rpm" for i in range(6)]
ARGS: list[str | bytes] = [b"lease-1764000000", b"60000", bytes(range(200))]
WARM, SEQUENTIAL, CALLERS, EACH = 300, 3000, 64, 100
CLIENTS = {  # name -> the module it needs
    "headrace resp": "hiredis",
    "redis-py": "redis",
    "coredis": "coredis",
    "valkey-glide": "glide",
}

Call = Callable[[], Awaitable[Any]]


async def open_client(name: str, url: str) -> tuple[Call, Callable[[], Awaitable[Any]], str]:
    """``(call, close, version)`` for one client, its script loaded."""
    keys, args = len(KEYS), [*KEYS, *ARGS]  # every argument a str or bytes
    if name == "headrace resp":
        sys.path.insert(0, str(ROOT / "src"))
        from headrace.limits.resp import RespConnection

        connection = RespConnection(url, timeout_s=1.0)
        sha = (await connection.call("SCRIPT", "LOAD", SCRIPT)).decode()

        async def resp_call() -> Any:
            return await connection.call("EVALSHA", sha, keys, *args)

        return resp_call, connection.aclose, "working tree"
    if name == "redis-py":
        import redis
        from redis.asyncio import Redis

        client = Redis.from_url(url)
        sha = await client.script_load(SCRIPT)

        async def redis_py_call() -> Any:
            return await client.evalsha(sha, keys, *args)

        return redis_py_call, client.aclose, redis.__version__
    if name == "coredis":
        import coredis  # type: ignore[import-not-found,unused-ignore]

        context = coredis.Redis.from_url(url)
        coredis_client = await context.__aenter__()
        sha = await coredis_client.script_load(SCRIPT)

        async def coredis_call() -> Any:
            return await coredis_client.evalsha(sha, keys=KEYS, args=ARGS)

        async def coredis_close() -> None:
            await context.__aexit__(None, None, None)

        return coredis_call, coredis_close, coredis.__version__
    if name == "valkey-glide":
        from importlib.metadata import version
        from urllib.parse import urlsplit

        from glide import (  # type: ignore[import-not-found,unused-ignore]
            GlideClient,
            GlideClientConfiguration,
            NodeAddress,
        )

        where = urlsplit(url)
        settings = GlideClientConfiguration(
            [NodeAddress(where.hostname or "127.0.0.1", where.port or 6379)],
            request_timeout=1000,
        )
        glide = await GlideClient.create(settings)
        sha = await glide.custom_command(["SCRIPT", "LOAD", SCRIPT])
        command = ["EVALSHA", sha.decode(), str(keys), *args]

        async def glide_call() -> Any:
            return await glide.custom_command(command)

        return glide_call, glide.close, version("valkey-glide")
    raise SystemExit(f"unknown client {name!r}")


async def measure(name: str, url: str) -> dict[str, Any]:
    """One client's figures, in this process."""
    call, close, version = await open_client(name, url)
    try:
        first = list(await call())
        assert first[:3] == [1, 0, 0], first
        for _ in range(WARM):
            await call()
        times = []
        cpu, thread = time.process_time(), time.thread_time()
        for _ in range(SEQUENTIAL):
            started = time.perf_counter()
            await call()
            times.append(time.perf_counter() - started)
        cpu_us = (time.process_time() - cpu) / SEQUENTIAL * 1e6
        thread_us = (time.thread_time() - thread) / SEQUENTIAL * 1e6

        async def caller() -> None:
            for _ in range(EACH):
                await call()

        await asyncio.gather(*(caller() for _ in range(CALLERS)))  # warm
        cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        calls = CALLERS * EACH
        return {
            "version": version,
            "cpu_us": cpu_us,
            "thread_us": thread_us,
            "p50_ms": percentile(times, 0.5) * 1e3,
            "p99_ms": percentile(times, 0.99) * 1e3,
            "busy_cpu_us": (time.process_time() - cpu) / calls * 1e6,
            "busy_thread_us": (time.thread_time() - thread) / calls * 1e6,
            "busy_per_s": calls / (time.perf_counter() - wall),
        }
    finally:
        await close()


def installed(name: str) -> bool:
    return importlib.util.find_spec(CLIENTS[name]) is not None


def run(clients: list[str], url: str, rounds: int) -> Table:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    for round_ in range(rounds):
        for name in clients if round_ % 2 == 0 else clients[::-1]:
            done = subprocess.run(
                [sys.executable, __file__, "--one", name, "--redis-url", url],
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
            runs[name].append(json.loads(done.stdout.splitlines()[-1]))
    table = Table(
        "One EVALSHA (six keys read, fifteen integers back), uvloop",
        ["figure", *(f"{name} {runs[name][0]['version']}" for name in clients)],
    )

    def row(label: str, field: str, digits: int) -> None:
        median = [statistics.median(r[field] for r in runs[name]) for name in clients]
        table.add(label, *(fmt(m, digits) for m in median))

    row("CPU per call, one at a time (us)", "cpu_us", 1)
    row("  of which the main thread (us)", "thread_us", 1)
    row("round trip p50 (ms)", "p50_ms", 3)
    row("round trip p99 (ms)", "p99_ms", 3)
    row(f"CPU per call, {CALLERS} callers at once (us)", "busy_cpu_us", 1)
    row("  of which the main thread (us)", "busy_thread_us", 1)
    row(f"calls/s, {CALLERS} callers at once", "busy_per_s", 0)
    table.notes.append(f"medians of {rounds} rounds, each client in a new process per round")
    return table


def forget(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{PREFIX}*"))
    if keys:
        client.delete(*keys)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("HEADRACE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # measure one client, print JSON
    args = parser.parse_args()
    import uvloop

    if args.one:
        print(json.dumps(uvloop.run(measure(args.one, args.redis_url))))
        return
    clients = [name for name in CLIENTS if installed(name)]
    missing = [name for name in CLIENTS if name not in clients]
    print(
        f"Headrace Redis client benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()} ({sys.executable}); Redis {args.redis_url}\n"
        + (f"not installed here, left out: {', '.join(missing)}\n" if missing else "")
    )
    try:
        print(run(clients, args.redis_url, args.rounds).render())
    finally:
        forget(args.redis_url)


if __name__ == "__main__":
    main()
