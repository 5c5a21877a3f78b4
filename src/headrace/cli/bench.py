"""``headrace bench``: load a running gateway with chat completions and say how it did.

For whoever runs Headrace: how many answers a second a deployment gives, with what latency
(and time to first token, streamed), what the answers cost, and how the failures break down
by status and error code. Two ways to load it:

- a closed loop (``--concurrency N``, the default): N requests in flight, each sent as the
  previous one returns: the throughput it can sustain;
- an open loop (``--rate R``): a request every 1/R s whatever the answers do, as clients
  behave: the latency at that rate (a slow gateway piles requests up instead of slowing the
  sender down).

Latency runs from the moment a request was due to its last byte, so an open loop's
queueing counts. The repository's ``bench/`` measures Headrace itself against a baseline;
this command measures a deployment of it.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

import aiohttp
import orjson
import typer

from headrace.cli._common import ConfigOption, UrlOption, admin_key_of, app

_DATA = b"data:"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: its status (0: no HTTP answer), error ("" when answered), times in s."""

    status: int
    error: str
    latency_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False


@dataclass(slots=True)
class Load:
    """What to send, where, and how."""

    url: str
    key: str
    body: bytes
    stream: bool
    requests: int
    concurrency: int
    rate: float | None
    timeout_s: float


@dataclass(slots=True)
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self, load: Load, model: str) -> dict[str, Any]:
        ok = [o for o in self.outcomes if not o.error]
        latencies = sorted(o.latency_s * 1000 for o in ok)
        ttfts = sorted(o.ttft_s * 1000 for o in ok if o.ttft_s is not None)
        failures = Counter(
            f"{o.status} {o.error}" if o.status else f"no answer: {o.error}"
            for o in self.outcomes
            if o.error
        )
        tokens = sum(o.output_tokens for o in ok)
        elapsed = self.elapsed_s or math.nan
        return {
            "url": load.url,
            "model": model,
            "stream": load.stream,
            "mode": f"open loop at {load.rate:g}/s"
            if load.rate
            else f"closed loop of {load.concurrency}",
            "requests": len(self.outcomes),
            "ok": len(ok),
            "failed": len(self.outcomes) - len(ok),
            "elapsed_s": round(self.elapsed_s, 3),
            "answers_per_s": round(len(ok) / elapsed, 1),
            "latency_ms": _percentiles(latencies),
            "ttft_ms": _percentiles(ttfts) if load.stream else None,
            "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / elapsed, 1),
            "cost_usd": round(sum(o.cost_usd for o in ok), 6),
            "cache_hits": sum(o.cached for o in ok),
            "failures": dict(failures.most_common()),
        }


def _percentiles(ordered: list[float]) -> dict[str, float] | None:
    """p50, p90, p99 and max of sorted samples (nearest rank), in ms to 0.01."""
    if not ordered:
        return None

    def at(q: float) -> float:
        return round(ordered[max(1, math.ceil(q * len(ordered))) - 1], 2)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 2)}


async def _one(session: aiohttp.ClientSession, load: Load, due: float) -> Outcome:
    """Send one request (due at ``due``, a ``perf_counter`` time) and read all of it."""
    try:
        async with session.post(load.url, data=load.body) as response:
            if response.status != 200:
                raw = await response.read()
                return Outcome(response.status, _error_code(raw), time.perf_counter() - due)
            cost = float(response.headers.get("x-headrace-cost-usd", 0) or 0)
            cached = response.headers.get("x-headrace-cache") == "hit"
            if not load.stream:
                answer = orjson.loads(await response.read())
                tokens = int((answer.get("usage") or {}).get("completion_tokens") or 0)
                return Outcome(200, "", time.perf_counter() - due, None, tokens, cost, cached)
            first: float | None = None
            tokens = 0
            async for line in response.content:
                if not line.startswith(_DATA) or line[5:].strip() == b"[DONE]":
                    continue
                chunk = orjson.loads(line[5:])
                if first is None and chunk.get("choices"):
                    first = time.perf_counter() - due
                usage = chunk.get("usage")
                if usage:
                    tokens = int(usage.get("completion_tokens") or 0)
            return Outcome(200, "", time.perf_counter() - due, first, tokens, cost, cached)
    except (aiohttp.ClientError, OSError, orjson.JSONDecodeError, TimeoutError) as exc:
        return Outcome(0, type(exc).__name__, time.perf_counter() - due)


def _error_code(raw: bytes) -> str:
    """The OpenAI-shaped error's ``code`` (or ``type``) of a failed answer's body."""
    try:
        error = orjson.loads(raw).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return "unreadable_error"
    return str(error.get("code") or error.get("type") or "error")


async def run_load(load: Load) -> Report:
    """Send ``load.requests`` requests as ``load`` says; every outcome, and the time taken."""
    report = Report()
    headers = {"Authorization": f"Bearer {load.key}", "Content-Type": "application/json"}
    limit = load.concurrency if load.rate is None else 0  # an open loop: no cap
    connector = aiohttp.TCPConnector(limit=limit)
    timeout = aiohttp.ClientTimeout(total=load.timeout_s)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        started = time.perf_counter()
        if load.rate is None:
            remaining = iter(range(load.requests))

            async def worker() -> None:
                for _ in remaining:
                    report.outcomes.append(await _one(session, load, time.perf_counter()))

            await asyncio.gather(*(worker() for _ in range(min(load.concurrency, load.requests))))
        else:
            tasks = []
            for i in range(load.requests):
                due = started + i / load.rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tasks.append(asyncio.create_task(_one(session, load, due)))
            report.outcomes.extend(await asyncio.gather(*tasks))
        report.elapsed_s = time.perf_counter() - started
    return report


def _table(summary: dict[str, Any]) -> str:
    kind = "streamed" if summary["stream"] else "non-streamed"
    lines = [
        f"{summary['requests']} {kind} chat completions of {summary['model']} to "
        f"{summary['url']}, {summary['mode']}, in {summary['elapsed_s']:.2f} s",
        f"  answered / failed       {summary['ok']} / {summary['failed']}",
        f"  answers per second      {summary['answers_per_s']:.1f}",
    ]
    for name, key in (("latency", "latency_ms"), ("time to first token", "ttft_ms")):
        figures = summary[key]
        if figures:
            values = " / ".join(f"{figures[q]:.1f}" for q in ("p50", "p90", "p99", "max"))
            lines.append(f"  {name + ' (ms)':<23} p50 / p90 / p99 / max  {values}")
    lines.append(
        f"  output tokens           {summary['output_tokens']} "
        f"({summary['output_tokens_per_s']:.1f}/s)"
    )
    lines.append(f"  cost (USD)              {summary['cost_usd']:.6f}")
    lines.append(f"  cache hits              {summary['cache_hits']}")
    for failure, count in summary["failures"].items():
        lines.append(f"  failed: {failure:<15} {count}")
    return "\n".join(lines)


@app.command()
def bench(
    model: Annotated[
        str, typer.Option(help="The model to ask (the embedded default's chat model unless set).")
    ] = "smollm2-135m-instruct",
    requests: Annotated[int, typer.Option(min=1, help="How many requests to send.")] = 100,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Closed loop: requests in flight at once.")
    ] = 8,
    rate: Annotated[
        float | None,
        typer.Option(min=0.001, help="Open loop: requests per second (instead of --concurrency)."),
    ] = None,
    stream: Annotated[
        bool, typer.Option(help="Streamed answers, with time to first token.")
    ] = False,
    prompt: Annotated[str, typer.Option(help="The user message.")] = "Say hello in five words.",
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of each request.")] = 16,
    timeout_s: Annotated[float, typer.Option(min=0.1, help="Per request.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    url: UrlOption = "http://127.0.0.1:8080",
    key: Annotated[
        str | None,
        typer.Option(envvar="HEADRACE_API_KEY", help="The API key (default: the admin key)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Load a running gateway with chat completions; latency, throughput, cost, failures.

    Exits 1 if any request failed.
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    load = Load(
        url=url.rstrip("/") + "/v1/chat/completions",
        key=key or admin_key_of(os.environ.get("HEADRACE_ADMIN_KEY"), config, "--key"),
        body=orjson.dumps(body),
        stream=stream,
        requests=requests,
        concurrency=concurrency,
        rate=rate,
        timeout_s=timeout_s,
    )
    report = asyncio.run(run_load(load))
    summary = report.summary(load, model)
    if as_json:
        typer.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(_table(summary))
    raise typer.Exit(1 if summary["failed"] else 0)
