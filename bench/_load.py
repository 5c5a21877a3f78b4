"""The Python load generator, run as its own process so its CPU never mixes with the server's.

``python bench/_load.py`` reads one JSON :class:`LoadSpec` line on stdin, warms up (keep-alive
connections open, server caches filled) and prints ``{"event": "warm"}``. Then, for each
``go`` line on stdin, it runs one measured phase and prints one JSON :class:`LoadResult` line;
it exits when stdin closes. The parent reads the servers' CPU counters between the lines, and
alternates phases between a direct and a gateway load generator so that a burst of load from
elsewhere on the machine hits both sides alike.

Modes:

- ``open``: ``count`` requests at ``rate`` per second, evenly spaced, whatever the answers do
  (open loop). Latency runs from the *scheduled* send time to the last byte, so a stall in
  the server counts against every request it delays (no coordinated omission).
- ``closed``: ``concurrency`` workers, each sending its next request as soon as the last one
  ends, for ``duration_s``: requests per second at saturation.

With ``stream`` the request body asks for SSE and the first body bytes (the first event)
mark the time to first token. Clocks are ``time.perf_counter``; CPU is this process's
``time.process_time`` over the measured phase only.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to send. ``body`` is the raw JSON text, encoded once and reused for every request."""

    mode: str  # "open" or "closed"
    url: str
    body: str
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    rate: float = 200.0  # open: requests per second
    count: int = 3000  # open: requests in the measured phase
    concurrency: int = 64  # closed: workers; open: connection pool size
    duration_s: float = 5.0  # closed: length of the measured phase
    warmup_s: float = 1.0
    timeout_s: float = 10.0  # per request

    @property
    def warmup_count(self) -> int:
        """open: the requests sent to warm up (closed mode warms up for ``warmup_s``)."""
        return max(1, int(self.rate * self.warmup_s))


@dataclass(slots=True)
class LoadResult:
    """What happened in the measured phase. Times in milliseconds unless named ``_s``."""

    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)  # open: actual send - scheduled


class _Runner:
    def __init__(self, spec: LoadSpec, session: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.session = session
        self.body = spec.body.encode()
        self.headers = {"Content-Type": "application/json", **spec.headers}
        self.timeout = aiohttp.ClientTimeout(total=spec.timeout_s)

    async def one(self, scheduled: float, result: LoadResult) -> None:
        """Send one request; record its latency from ``scheduled`` (a perf_counter time)."""
        first: float | None = None
        try:
            async with self.session.post(
                self.spec.url, data=self.body, headers=self.headers, timeout=self.timeout
            ) as response:
                if self.spec.stream:
                    async for _ in response.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                else:
                    await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._fail(result, f"{type(exc).__name__}: {exc}")
            return
        end = time.perf_counter()
        if status != 200:
            self._fail(result, f"HTTP {status}")
            return
        result.ok += 1
        result.latency_ms.append((end - scheduled) * 1000.0)
        if first is not None:
            result.ttft_ms.append((first - scheduled) * 1000.0)

    @staticmethod
    def _fail(result: LoadResult, reason: str) -> None:
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(reason)

    async def open_loop(self, count: int, result: LoadResult) -> None:
        interval = 1.0 / self.spec.rate
        start = time.perf_counter() + 0.01
        tasks: list[asyncio.Task[None]] = []
        for i in range(count):
            scheduled = start + i * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result.send_lag_ms.append((time.perf_counter() - scheduled) * 1000.0)
            tasks.append(asyncio.create_task(self.one(scheduled, result)))
        await asyncio.gather(*tasks)

    async def closed_loop(self, duration_s: float, result: LoadResult) -> None:
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await self.one(time.perf_counter(), result)

        await asyncio.gather(*(worker() for _ in range(self.spec.concurrency)))

    async def phase(self, result: LoadResult, *, warmup: bool) -> None:
        spec = self.spec
        if spec.mode == "open":
            count = spec.warmup_count if warmup else spec.count
            await self.open_loop(count, result)
        else:
            await self.closed_loop(spec.warmup_s if warmup else spec.duration_s, result)


async def run(spec: LoadSpec) -> None:
    """Warm up, then run one measured phase per ``go`` line until stdin closes."""
    # Idle connections are dropped after 4 s, before the server's keep-alive (uvicorn: 5 s)
    # closes them: otherwise a request sent just as the server closes fails with a reset. A
    # generator idles while other sides take their turns or while the benchmark waits for quiet.
    connector = aiohttp.TCPConnector(limit=spec.concurrency, keepalive_timeout=4.0)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector) as session:
        runner = _Runner(spec, session)
        await runner.phase(LoadResult(), warmup=True)
        _emit({"event": "warm"})
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
            result = LoadResult()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await runner.phase(result, warmup=False)
            result.cpu_s = time.process_time() - cpu0
            result.elapsed_s = time.perf_counter() - wall0
            _emit({"event": "result", **asdict(result)})


def _emit(data: object) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def main() -> None:
    spec = LoadSpec(**json.loads(sys.stdin.readline()))
    try:
        import uvloop  # cheaper per request than asyncio's loop: less load-generator CPU
    except ImportError:
        asyncio.run(run(spec))
    else:
        uvloop.run(run(spec))


if __name__ == "__main__":
    main()
