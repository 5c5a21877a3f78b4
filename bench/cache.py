"""Response-cache benchmark: hit vs miss throughput, hit latency, a replayed workload.

    .venv/bin/python bench/cache.py [--quick] [--repeat-rate 0.3] [--requests N] [--commit REV]

Starts ``headrace mock-upstream`` (0 ms) and ``headrace serve`` (auth, metrics and access log
on; memory cache backend), pins the gateway to core 0 and everything else to core 1, and prints:

1. requests/s at saturation for misses (``Cache-Control: no-cache``: the full upstream path,
   answer stored) and for hits (one request repeated), and their ratio (goal: hits >= 3x),
   with the gateway's CPU per request for each; the load comes from ``wrk`` when it is
   installed (a Python client on core 1 tops out below the gateway's hit rate on slower
   machines, and then the ratio measures the client), else from a Python closed loop;
2. a hit's time inside the gateway, from its own ``headrace_overhead_seconds{stage="cache_hit"}``
   histogram (goal: p99 <= 1 ms), and the client-side latency of hits at a fixed rate;
3. a replayed workload with a stated repeat rate: hit ratio, upstream calls avoided, and cost
   saved (the gateway's counter beside the figure expected from the answers' usage).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
import _wrk
from _report import (
    Dist,
    Goal,
    Table,
    fmt,
    goals_table,
    histogram,
    histogram_delta,
    histogram_quantile,
)

PRICE_IN, PRICE_OUT = 0.15, 0.60  # USD per million tokens, on the mock deployment
AUTH = {"Authorization": f"Bearer {_procs.ADMIN_KEY}", "Content-Type": "application/json"}


def config(mock: _procs.Server) -> str:
    return f"""\
log: {{access_log: true}}
models:
  - name: mock-model
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock.url}/v1
        price: {{input_per_mtok_usd: {PRICE_IN}, output_per_mtok_usd: {PRICE_OUT}}}
"""


def body(prompt: str, *, temperature: float = 0, stream: bool = False) -> bytes:
    return orjson.dumps(
        {
            "model": "mock-model",
            "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature,
            "stream": stream,
        }
    )


@dataclass
class Reply:
    status: int
    cache: str
    latency_s: float
    usage: dict[str, int]


async def send(
    session: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str] = AUTH
) -> Reply:
    started = time.perf_counter()
    async with session.post(url, data=data, headers=headers) as response:
        raw = await response.read()
        usage: dict[str, int] = {}
        if response.status == 200 and raw.startswith(b"{"):
            usage = orjson.loads(raw).get("usage") or {}
        return Reply(
            response.status,
            response.headers.get("x-headrace-cache", ""),
            time.perf_counter() - started,
            usage,
        )


async def saturate(
    gateway: _procs.Server,
    make: Callable[[int], tuple[bytes, dict[str, str]]],
    duration_s: float,
    connections: int,
) -> tuple[float, float]:
    """Requests/s with ``connections`` clients sending ``make(i)``, and the gateway's CPU
    per request (ms). wrk sends ``make(0)`` each time (with ``no-cache`` every request is a
    miss whatever its body); the Python loop, a body per request."""
    url = gateway.url + "/v1/chat/completions"
    before = _procs.CpuSample.of(gateway.pid)
    if _wrk.available():
        data, headers = make(0)
        run = await asyncio.to_thread(
            _wrk.run, url, data.decode(), headers, connections, duration_s
        )
        if run.errors:
            raise RuntimeError(f"{run.errors} errors during saturation")
        count, elapsed_s = run.ok, run.elapsed_s
    else:
        count, elapsed_s = await _closed_loop(url, make, duration_s, connections)
    cpu_s = _procs.CpuSample.of(gateway.pid).cpu_s - before.cpu_s
    return count / elapsed_s, cpu_s * 1000 / count


async def _closed_loop(
    url: str,
    make: Callable[[int], tuple[bytes, dict[str, str]]],
    duration_s: float,
    connections: int,
) -> tuple[int, float]:
    """Python clients on one connection each: requests answered, and the seconds taken."""
    count = 0
    deadline = time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(worker: int) -> None:
            nonlocal count
            i = worker
            while time.perf_counter() < deadline:
                data, headers = make(i)
                reply = await send(session, url, data, headers)
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status} during saturation")
                count += 1
                i += connections

        started = time.perf_counter()
        await asyncio.gather(*(client(w) for w in range(connections)))
        return count, time.perf_counter() - started


async def open_loop(url: str, bodies: list[bytes], rate: float) -> list[Reply]:
    """Evenly spaced sends; latency from the scheduled send time (no coordinated omission)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        start = time.perf_counter() + 0.05

        async def one(i: int, data: bytes) -> Reply:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            reply = await send(session, url, data)
            reply.latency_s = time.perf_counter() - scheduled
            return reply

        return await asyncio.gather(*(one(i, d) for i, d in enumerate(bodies)))


def workload(n: int, repeat_rate: float, rng: random.Random) -> list[tuple[str, float, bool]]:
    """(prompt, temperature, stream) for ``n`` requests.

    Each request repeats an earlier prompt with probability ``repeat_rate`` (popular prompts
    more often: Zipf-like, weight 1/rank among those seen), else asks something new; 20 % are
    sampled at temperature 0.7 (not cacheable by default) and 10 % are streamed.
    """
    seen: list[str] = []
    out = []
    for i in range(n):
        if seen and rng.random() < repeat_rate:
            weights = [1 / (rank + 1) for rank in range(len(seen))]
            prompt = rng.choices(seen, weights)[0]
        else:
            prompt = f"question {i}: how do I configure feature {rng.randrange(10**6)}?"
            seen.append(prompt)
        temperature = 0.7 if rng.random() < 0.2 else 0.0
        out.append((prompt, temperature, rng.random() < 0.1))
    return out


def metrics(gateway: _procs.Server) -> str:
    return _procs.http("GET", gateway.url + "/metrics").decode()


def counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def measure(gateway: _procs.Server, mock: _procs.Server, args: argparse.Namespace) -> None:
    url = gateway.url + "/v1/chat/completions"
    seconds = 3.0 if args.quick else 8.0
    tables, goals = [], []

    # 1. throughput
    miss_headers = {**AUTH, "Cache-Control": "no-cache"}
    miss_rps, miss_cpu = await saturate(
        gateway, lambda i: (body(f"miss {i}"), miss_headers), seconds, 32
    )
    hit_body = body("the same question every time")
    await send_once(url, hit_body)
    hit_rps, hit_cpu = await saturate(gateway, lambda i: (hit_body, AUTH), seconds, 32)
    tool = "wrk -t1" if _wrk.available() else "a Python closed loop (wrk not installed)"
    table = Table(
        f"Throughput at saturation, 32 connections, upstream 0 ms, load from {tool}",
        ["figure", "value"],
    )
    table.add("misses (no-cache: upstream call + store) req/s", fmt(miss_rps, 0))
    table.add("hits req/s", fmt(hit_rps, 0))
    table.add("hits / misses", fmt(hit_rps / miss_rps, 2))
    table.add("gateway CPU per miss / per hit (ms)", f"{fmt(miss_cpu, 3)} / {fmt(hit_cpu, 3)}")
    table.add("gateway CPU per miss / per hit", fmt(miss_cpu / hit_cpu, 2))
    tables.append(table)
    goals.append(Goal("hit req/s vs miss req/s", hit_rps / miss_rps, 3.0, "x", at_least=True))

    # 2. hit latency
    before = histogram(metrics(gateway), "headrace_overhead_seconds", stage="cache_hit")
    n = 2000 if args.quick else 5000
    replies = await open_loop(url, [hit_body] * n, rate=500)
    after = histogram(metrics(gateway), "headrace_overhead_seconds", stage="cache_hit")
    inside = histogram_delta(after, before)
    p50, p99 = (histogram_quantile(inside, q) * 1000 for q in (0.5, 0.99))
    client = Dist.of([r.latency_s * 1000 for r in replies])
    table = Table(f"Hit latency, {n} hits at 500 req/s", ["figure", "p50 (ms)", "p99 (ms)"])
    table.add("inside the gateway (its histogram, interpolated in buckets)", fmt(p50), fmt(p99))
    table.add("client side, from the scheduled send", fmt(client.at("p50")), fmt(client.at("p99")))
    if {r.cache for r in replies} != {"hit"}:
        table.notes.append("WARNING: not every reply was a hit")
    tables.append(table)
    goals.append(Goal("hit p99 inside the gateway", p99, 1.0, "ms"))

    # 3. replayed workload
    rng = random.Random(7)
    requests = workload(args.requests or (1000 if args.quick else 5000), args.repeat_rate, rng)
    _procs.http("POST", mock.url + "/_mock/reset")
    saved_before = counter(metrics(gateway), "headrace_cache_saved_cost_usd_total")
    bodies = [body(p, temperature=t, stream=s) for p, t, s in requests]
    replies = await open_loop(url, bodies, rate=200)
    upstream = _procs.mock_total(mock)
    saved = counter(metrics(gateway), "headrace_cache_saved_cost_usd_total") - saved_before
    hits = [r for r in replies if r.cache == "hit"]
    cacheable = [r for r, (_, t, _) in zip(replies, requests, strict=True) if t == 0]
    expected = (
        sum(
            r.usage.get("prompt_tokens", 0) * PRICE_IN
            + r.usage.get("completion_tokens", 0) * PRICE_OUT
            for r in hits
        )
        / 1e6
    )
    streamed_hits = sum(
        1 for r, (_, _, s) in zip(replies, requests, strict=True) if s and r.cache == "hit"
    )
    table = Table(
        f"Replayed workload: {len(requests)} requests at 200 req/s, repeat rate "
        f"{args.repeat_rate:.0%}, 20 % at temperature 0.7, 10 % streamed",
        ["figure", "value"],
    )
    table.add("errors", str(sum(1 for r in replies if r.status != 200)))
    table.add("hit ratio, of cacheable requests", f"{len(hits) / max(1, len(cacheable)):.1%}")
    table.add("hit ratio, of all requests", f"{len(hits) / len(replies):.1%}")
    table.add("upstream calls avoided", f"{len(replies) - upstream} of {len(replies)}")
    table.add("cost saved, gateway counter (USD)", f"{saved:.6f}")
    table.add("cost saved, expected from non-streamed hits' usage (USD)", f"{expected:.6f}")
    table.notes.append(
        f"{streamed_hits} streamed hits are counted by the gateway but have no usage body here"
    )
    table.notes.append(
        "repeats: a request asks an earlier prompt again with the stated probability, popular "
        "prompts more often (weight 1/rank): FAQ-style questions, retries, regenerated pages"
    )
    tables.append(table)
    for t in [*tables, goals_table(goals)]:
        print(t.render())
        print()


async def send_once(url: str, data: bytes) -> None:
    async with aiohttp.ClientSession() as session:
        await send(session, url, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 40 s)")
    parser.add_argument("--repeat-rate", type=float, default=0.3)
    parser.add_argument("--requests", type=int, default=0, help="replayed workload size")
    parser.add_argument(
        "--commit", help="run the servers from src/ as of this commit (e.g. HEAD, or an older one)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    print(f"Headrace cache benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        code = _procs.Code.at(args.commit, Path(tmp))
        print(f"code: {code.describe()}\n")
        launcher = _procs.Launcher(stack, Path(tmp), code)
        mock = launcher.mock()
        gateway = launcher.gateway("gateway", config(mock))
        _procs.pin(gateway.pid, frozenset({0}))
        _procs.pin(mock.pid, frozenset({1}))
        _procs.pin(os.getpid(), frozenset({1}))
        asyncio.run(measure(gateway, mock, args))
    print(f"(finished in {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
