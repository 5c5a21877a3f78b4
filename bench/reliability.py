"""How Headrace holds up when an upstream misbehaves: success rate, retry cost, breaker timing.

    .venv/bin/python bench/reliability.py            # about 1.5 minutes
    .venv/bin/python bench/reliability.py --quick    # about 45 seconds

Starts three ``headrace mock-upstream`` and one ``headrace serve`` on 127.0.0.1. The model
``rel`` has two deployments: A, which injects a fault into 30 % of its calls (429 with
Retry-After, 500, 503, hangs and connections cut halfway), and B, which is healthy; ``rel``
falls back to ``rel-fallback`` (C, healthy). Then two experiments:

1. Steady load: an open loop of requests at a fixed rate, alternately streamed and not.
   Prints the client-visible success rate, upstream calls per client request (all mocks'
   ``/_mock/stats`` totals over the client requests) and latency from the scheduled send.
   A request succeeds only if it answers 200 with the complete expected text, and a stream
   only if it also ends with ``[DONE]`` and carries no error event. That is why the load
   generator lives here and not in ``bench/_load.py``, which counts any 200 as a success.
2. Breaker: with the load still on, A fails every call; the time until
   ``headrace_breaker_state`` of A reads 2 (open), then, after the fault is cleared, the time
   until it reads 0 (closed).

Every figure with a goal gets PASS or FAIL. Processes are stopped on exit, Ctrl-C, SIGTERM
or when the time limit passes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
import _report
from _procs import Code, Launcher, Server
from _report import Goal, Table, fmt

MODEL = "rel"
FAULTY, HEALTHY, FALLBACK = "rel/0", "rel/1", "rel-fallback/0"
PROMPT = [{"role": "user", "content": "Name three rivers of Europe."}]
FIRST_TOKEN_S = 1.0
TOTAL_S = 2.0
WINDOW_S = 10.0
COOLDOWN_S = 5.0
PROBE_ALLOWANCE_S = 1.0  # the probe call itself, plus polling, on top of the cooldown
# A's faults: each call draws at most one; they add up to 30 %.
FAULT_MIX = {
    "error_rate": 0.18,
    "error_statuses": "429,500,503",
    "retry_after_s": 1,
    "hang_rate": 0.06,
    "cut_rate": 0.06,
}
UPSTREAM_LATENCY = {"latency_ms": 20, "latency_jitter_ms": 5}


@dataclass(frozen=True, slots=True)
class Plan:
    rate: float  # requests per second, open loop
    duration_s: float
    time_limit_s: int


FULL = Plan(rate=50.0, duration_s=60.0, time_limit_s=300)
QUICK = Plan(rate=50.0, duration_s=20.0, time_limit_s=150)


def gateway_config(a: Server, b: Server, c: Server) -> str:
    timeouts = f"{{connect_s: 1, first_token_s: {FIRST_TOKEN_S:g}, total_s: {TOTAL_S:g}}}"
    return f"""\
log: {{access_log: true}}
models:
  - name: {MODEL}
    strategy: round_robin
    retry: {{max_attempts: 3, base_delay_s: 0.02, max_delay_s: 0.2, max_total_s: 10}}
    breaker: {{failure_threshold: 5, failure_ratio: 0.5, window_s: {WINDOW_S:g},
               min_requests: 20, cooldown_s: {COOLDOWN_S:g}, half_open_probes: 1}}
    fallbacks: [rel-fallback]
    deployments:
      - {{provider: openai_compatible, model: mock-model, base_url: "{a.url}/v1",
          timeouts: {timeouts}}}
      - {{provider: openai_compatible, model: mock-model, base_url: "{b.url}/v1",
          timeouts: {timeouts}}}
  - name: rel-fallback
    deployments:
      - {{provider: openai_compatible, model: mock-model, base_url: "{c.url}/v1",
          timeouts: {timeouts}}}
"""


# -- the load ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One client request. ``failure`` is empty on success, else what the client saw."""

    stream: bool
    latency_s: float
    failure: str = ""
    attempts: int = 0
    model: str = ""


@dataclass(slots=True)
class Load:
    """Outcomes of an open loop, and the send lag of the loop itself."""

    outcomes: list[Outcome] = field(default_factory=list)
    late_sends: int = 0  # sent more than 50 ms after their scheduled time

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.failure]

    def success_rate(self, *, exclude: str = "") -> float:
        counted = [o for o in self.outcomes if not (exclude and o.failure.startswith(exclude))]
        return 100.0 * sum(1 for o in counted if not o.failure) / max(1, len(counted))

    def failures(self) -> collections.Counter[str]:
        return collections.Counter(o.failure for o in self.outcomes if o.failure)


CUT_AFTER_OUTPUT = "stream failed after its first chunk"


class Client:
    """Sends chat requests to the gateway and judges each answer."""

    def __init__(self, session: aiohttp.ClientSession, gateway: Server, expected: str) -> None:
        self.session = session
        self.url = gateway.url + "/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {_procs.ADMIN_KEY}"}
        self.expected = expected
        self.timeout = aiohttp.ClientTimeout(total=30)

    async def one(self, stream: bool, scheduled: float) -> Outcome:
        body = {"model": MODEL, "messages": PROMPT, "stream": stream}
        attempts, model, failure = 0, "", ""
        try:
            async with self.session.post(
                self.url, json=body, headers=self.headers, timeout=self.timeout
            ) as response:
                attempts = int(response.headers.get("x-headrace-attempts", "0"))
                model = response.headers.get("x-headrace-model", "")
                if response.status != 200:
                    failure = f"HTTP {response.status} {await _error_code(response)}"
                elif stream:
                    failure = await self._judge_stream(response)
                else:
                    answer = await response.json()
                    if answer["choices"][0]["message"]["content"] != self.expected:
                        failure = "incomplete answer"
        except (TimeoutError, aiohttp.ClientError) as exc:
            failure = f"client: {type(exc).__name__}"
        return Outcome(stream, time.perf_counter() - scheduled, failure, attempts, model)

    async def _judge_stream(self, response: aiohttp.ClientResponse) -> str:
        text: list[str] = []
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return "" if "".join(text) == self.expected else "incomplete stream"
            event = json.loads(payload)
            if "error" in event:
                return CUT_AFTER_OUTPUT if text else "stream error event"
            text.extend(c["delta"].get("content") or "" for c in event.get("choices", []))
        return "stream ended without [DONE]"

    async def open_loop(self, rate: float, duration_s: float, stop: asyncio.Event | None) -> Load:
        """Requests at ``rate`` per second for ``duration_s`` (or until ``stop`` is set),
        alternately streamed and not, whatever the answers do; waits for the last answer."""
        load = Load()
        tasks: list[asyncio.Task[Outcome]] = []
        start = time.perf_counter() + 0.01
        for i in range(int(rate * duration_s)):
            if stop is not None and stop.is_set():
                break
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.05:
                load.late_sends += 1
            tasks.append(asyncio.create_task(self.one(i % 2 == 1, scheduled)))
        load.outcomes = list(await asyncio.gather(*tasks))
        return load


async def _error_code(response: aiohttp.ClientResponse) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError, aiohttp.ClientError):
        return str((await response.json())["error"]["code"])
    return ""


# -- the servers' view ---------------------------------------------------------------------------


_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        found = dict(_LABEL.findall(match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


async def get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        return await response.text()


async def breaker_state(session: aiohttp.ClientSession, gateway: Server) -> float:
    text = await get_text(session, gateway.url + "/metrics")
    return metric(text, "headrace_breaker_state", deployment=FAULTY)


def mock_stats(mock: Server) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(_procs.http("GET", mock.url + "/_mock/stats"))
    return stats


def breaker_openings(gateway: Server, offset: int) -> int:
    """How often A's breaker opened, from the gateway's log after byte ``offset``."""
    count = 0
    with gateway.log.open("rb") as log:
        log.seek(offset)
        for line in log:
            if b'"breaker_state"' not in line:
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                count += event.get("deployment") == FAULTY and event.get("new") == "open"
    return count


def set_faults(mock: Server, **faults: object) -> None:
    _procs.http("PUT", mock.url + "/_mock/faults", {**UPSTREAM_LATENCY, **faults})


# -- experiment 1: steady load ---------------------------------------------------------------------


@dataclass(slots=True)
class Steady:
    load: Load
    upstream_calls: dict[str, int]
    faults_injected: dict[str, int]
    breaker_openings: int
    metrics_before: str
    metrics_after: str

    def delta(self, name: str, **labels: str) -> float:
        return metric(self.metrics_after, name, **labels) - metric(
            self.metrics_before, name, **labels
        )


async def steady(plan: Plan, client: Client, gateway: Server, mocks: dict[str, Server]) -> Steady:
    for mock in mocks.values():
        _procs.http("POST", mock.url + "/_mock/reset")
    set_faults(mocks["A"], **FAULT_MIX)
    before = await get_text(client.session, gateway.url + "/metrics")
    log_offset = gateway.log.stat().st_size
    load = await client.open_loop(plan.rate, plan.duration_s, None)
    after = await get_text(client.session, gateway.url + "/metrics")
    stats = {name: mock_stats(mock) for name, mock in mocks.items()}
    return Steady(
        load=load,
        upstream_calls={name: int(s["total"]) for name, s in stats.items()},
        faults_injected={str(k): int(v) for k, v in stats["A"]["faults"].items()},
        breaker_openings=breaker_openings(gateway, log_offset),
        metrics_before=before,
        metrics_after=after,
    )


def steady_table(plan: Plan, result: Steady, goals: list[Goal]) -> Table:
    load = result.load
    n = len(load.outcomes)
    table = Table(
        f"Steady load - {plan.rate:g} req/s open loop for {plan.duration_s:g} s, half streamed; "
        f"deployment A injects faults into 30 % of its calls",
        ["figure", "value", "goal", "verdict"],
    )
    rate = Goal("client-visible success rate", load.success_rate(), 99.9, "%", at_least=True)
    goals.append(rate)
    table.add("client requests", str(n))
    table.add("client-visible success rate (%)", fmt(rate.value, 3), rate.target, rate.verdict)
    table.add(
        "  without streams cut after their first chunk (%)",
        fmt(load.success_rate(exclude=CUT_AFTER_OUTPUT), 3),
    )
    calls = sum(result.upstream_calls.values())
    per_request = Goal("upstream calls per client request", calls / max(1, n), 1.5, "")
    goals.append(per_request)
    table.add(
        "upstream calls per client request",
        fmt(per_request.value, 3),
        per_request.target,
        per_request.verdict,
    )
    table.add(
        "  upstream calls A / B / C (fallback)",
        " / ".join(str(result.upstream_calls[k]) for k in ("A", "B", "C")),
    )
    for label, outcomes in (
        ("all", load.ok),
        ("non-streamed", [o for o in load.ok if not o.stream]),
        ("streamed (to the last byte)", [o for o in load.ok if o.stream]),
    ):
        ms = [1000 * o.latency_s for o in outcomes]
        table.add(
            f"latency p50 / p99, {label} (ms)",
            f"{fmt(_report.percentile(ms, 0.5), 1)} / {fmt(_report.percentile(ms, 0.99), 1)}",
        )
    retried = [1000 * o.latency_s for o in load.ok if o.attempts > 1]
    table.add(
        "latency p50 / max, after a retry or fallback (ms)",
        f"{fmt(_report.percentile(retried, 0.5), 1)} / {fmt(max(retried, default=math.nan), 1)}",
    )
    attempts = collections.Counter(o.attempts for o in load.ok)
    table.add(
        "attempts per successful request (1/2/3+)",
        f"{attempts[1]}/{attempts[2]}/{sum(v for k, v in attempts.items() if k >= 3)}",
    )
    table.add("served by the fallback model", str(sum(1 for o in load.ok if o.model != MODEL)))
    table.add("gateway retries (headrace_retries)", fmt(result.delta("headrace_retries_total"), 0))
    table.add("times A's breaker opened", str(result.breaker_openings))
    injected = ", ".join(f"{k} {v}" for k, v in sorted(result.faults_injected.items()))
    table.notes.append(f"faults A injected: {injected or 'none'}")
    for failure, count in load.failures().most_common():
        table.notes.append(f"failed: {count} x {failure}")
    table.add(
        "streams cut after output and resumed",
        fmt(result.delta("headrace_stream_resumes_total"), 0),
    )
    table.notes.append(
        "a stream cut after output is resumed on B when B reproduces the text already sent"
    )
    if load.late_sends:
        table.notes.append(f"{load.late_sends} requests sent more than 50 ms late (load client)")
    table.notes.append("latency runs from the scheduled send to the last byte")
    table.notes.append(
        f"A's 429s carry Retry-After {FAULT_MIX['retry_after_s']} s: A is parked that long, "
        "and the retry goes to B at once"
    )
    return table


# -- experiment 2: breaker ---------------------------------------------------------------------


@dataclass(slots=True)
class BreakerRun:
    settled: bool
    open_after_s: float
    closed_after_s: float
    transitions: list[tuple[float, float]]  # (seconds since the fault began, gauge)
    openings: int  # from the gateway's log: the polled gauge can miss a short half-open
    load: Load


async def watch(
    session: aiohttp.ClientSession,
    gateway: Server,
    want: float,
    limit_s: float,
    seen: list[tuple[float, float]],
    origin: float,
) -> float:
    """Seconds until A's breaker gauge reads ``want`` (nan if not within ``limit_s``);
    every change of the gauge is appended to ``seen``."""
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) <= limit_s:
        state = await breaker_state(session, gateway)
        if not seen or seen[-1][1] != state:
            seen.append((time.perf_counter() - origin, state))
        if state == want:
            return elapsed
        await asyncio.sleep(0.02)
    return float("nan")


async def breaker_experiment(
    plan: Plan, client: Client, gateway: Server, mocks: dict[str, Server]
) -> BreakerRun:
    a = mocks["A"]
    set_faults(a)
    stop = asyncio.Event()
    load_task = asyncio.create_task(client.open_loop(plan.rate, 120.0, stop))
    session = client.session
    seen: list[tuple[float, float]] = []
    try:
        # Start from a closed breaker (the steady phase may have left it open).
        await watch(session, gateway, 0, COOLDOWN_S + PROBE_ALLOWANCE_S + 2, [], 0.0)
        settled = await breaker_state(session, gateway) == 0
        await asyncio.sleep(1.0)
        log_offset = gateway.log.stat().st_size
        failing_since = time.perf_counter()
        set_faults(a, error_rate=1.0, error_statuses="500")
        open_after = await watch(session, gateway, 2, WINDOW_S + 5, seen, failing_since)
        # Stay failing past one cooldown, so that a probe fails and the breaker opens again.
        await asyncio.sleep(COOLDOWN_S + 1.0)
        cleared = time.perf_counter()
        set_faults(a)
        closed_after = await watch(
            session, gateway, 0, COOLDOWN_S + PROBE_ALLOWANCE_S + 5, seen, failing_since
        )
        seen.append((cleared - failing_since, -1.0))  # marks the moment the fault was cleared
    finally:
        stop.set()
        load = await load_task
    seen.sort()
    return BreakerRun(
        settled, open_after, closed_after, seen, breaker_openings(gateway, log_offset), load
    )


def breaker_table(run: BreakerRun, goals: list[Goal]) -> Table:
    table = Table(
        f"Breaker - A fails every call, then recovers (failure_threshold 5, window_s "
        f"{WINDOW_S:g}, cooldown_s {COOLDOWN_S:g}, load continues)",
        ["figure", "value", "goal", "verdict"],
    )
    opened = Goal("breaker opens after A starts failing", run.open_after_s, WINDOW_S, "s")
    closed = Goal(
        "breaker closes after A's fault clears",
        run.closed_after_s,
        COOLDOWN_S + PROBE_ALLOWANCE_S,
        "s",
    )
    goals += [opened, closed]
    table.add(
        "time until the gauge reads 2 (s)", fmt(opened.value, 3), opened.target, opened.verdict
    )
    table.add(
        "time until the gauge reads 0 (s)", fmt(closed.value, 3), closed.target, closed.verdict
    )
    table.add("times A's breaker opened (gateway log)", str(run.openings))
    table.add(
        "client-visible success rate meanwhile (%)",
        f"{fmt(run.load.success_rate(), 3)} of {len(run.load.outcomes)}",
    )
    names = {0.0: "closed", 1.0: "half-open", 2.0: "open", -1.0: "(fault cleared)"}
    table.notes.append(
        "gauge over time: "
        + ", ".join(f"{t:+.2f} s {names.get(s, str(s))}" for t, s in run.transitions)
    )
    table.notes.append(
        f"cooldown {COOLDOWN_S:g} s counts from when the breaker last opened; the gauge moves "
        "when a request arrives (about every 20 ms here), and is polled every 20 ms"
    )
    if not run.settled:
        table.notes.append("A's breaker was not closed when the experiment began")
    for failure, count in run.load.failures().most_common():
        table.notes.append(f"failed: {count} x {failure}")
    return table


# -- the run -----------------------------------------------------------------------------------


def header(quick: bool, code: Code) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join(
        [
            f"Headrace reliability benchmark ({'--quick' if quick else 'full'}), "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"machine: {len(_procs.ALL_CORES)} cores, load average {load} before the run",
            f"code: {code.describe()}",
            f"model {MODEL!r}: round_robin over A (faulty) and B (healthy), fallback "
            f"'rel-fallback' (C); timeouts first_token_s {FIRST_TOKEN_S:g}, total_s "
            f"{TOTAL_S:g}; retry max_attempts 3; default retry budget",
            "A's faults per call: "
            + ", ".join(f"{k} {v}" for k, v in FAULT_MIX.items())
            + f"; every mock answers after {UPSTREAM_LATENCY['latency_ms']} ± "
            f"{UPSTREAM_LATENCY['latency_jitter_ms']} ms",
        ]
    )


async def measure(plan: Plan, gateway: Server, mocks: dict[str, Server]) -> list[Table]:
    goals: list[Goal] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        expected = await _expected_answer(session, mocks["B"])
        client = Client(session, gateway, expected)
        await client.open_loop(plan.rate, 1.0, None)  # warm-up: connections, caches
        _progress(f"steady load: {plan.rate:g} req/s for {plan.duration_s:g} s")
        result = await steady(plan, client, gateway, mocks)
        first = steady_table(plan, result, goals)
        print(first.render(), end="\n\n", flush=True)
        _progress("breaker: A fails every call, then recovers")
        run = await breaker_experiment(plan, client, gateway, mocks)
        second = breaker_table(run, goals)
        print(second.render(), end="\n\n", flush=True)
    return [_report.goals_table(goals)]


async def _expected_answer(session: aiohttp.ClientSession, mock: Server) -> str:
    body = {"model": "mock-model", "messages": PROMPT}
    async with session.post(mock.url + "/v1/chat/completions", json=body) as response:
        answer = await response.json()
    return str(answer["choices"][0]["message"]["content"])


def run(plan: Plan, args: argparse.Namespace, workdir: Path) -> None:
    code = Code.at(args.commit, workdir)
    print(header(args.quick, code), end="\n\n", flush=True)
    with contextlib.ExitStack() as stack:
        _progress("starting three mock upstreams and the gateway")
        mocks: dict[str, Server] = {}
        for name in ("A", "B", "C"):
            folder = workdir / name  # each mock keeps its log in a folder of its own
            folder.mkdir()
            mocks[name] = Launcher(stack, folder, code).mock()
            set_faults(mocks[name])
        config = gateway_config(mocks["A"], mocks["B"], mocks["C"])
        gateway = Launcher(stack, workdir, code).gateway("gateway", config)
        tables = asyncio.run(measure(plan, gateway, mocks))
    for table in tables:
        print(table.render(), flush=True)


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s of steady load instead of 60")
    parser.add_argument(
        "--commit",
        help="run the servers from src/ as of this commit (e.g. HEAD, to leave uncommitted "
        "changes out); default: the working tree",
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    with _procs.bounded_run(plan.time_limit_s, prefix="headrace-reliability-") as workdir:
        run(plan, args, workdir)


if __name__ == "__main__":
    main()
