"""Measured phases, direct and through the gateway, interleaved in short blocks.

The machine is small and may be shared, so a burst of load from elsewhere must not land on
one side only: each side has its own warm load generator, and the two take turns block by
block (ABBA order). Around every block the servers' counters are read: each server's CPU
seconds, the whole machine's CPU (so that other processes' use can be reported), the
gateway's ``headrace_overhead_seconds`` histogram and the mock's request count.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import _procs
import _report
import _wrk
from _load import LoadResult, LoadSpec
from _procs import CpuSample, Server
from _quiet import Quiet, process_cpu_s

CHAT = {
    "model": "mock-model",
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 16,
}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
AUTH = {"Authorization": f"Bearer {_procs.ADMIN_KEY}"}
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Servers:
    """The processes whose CPU every block reads.

    With several gateways, ``gateway`` is the one being measured and ``idle`` the others;
    ``helpers`` are more processes by role (e.g. ``("redis", pid)``). Their CPU is read too,
    each under its role, so that it is not blamed on other processes.
    """

    mock: Server
    gateway: Server
    idle: tuple[Server, ...] = ()
    helpers: tuple[tuple[str, int], ...] = ()

    def cpu_s(self) -> dict[str, float]:
        """Cumulative CPU seconds by role: ``mock``, ``gateway``, ``idle`` and the helpers'."""
        cpu = {
            "mock": CpuSample.of(self.mock.pid).cpu_s,
            "gateway": CpuSample.of(self.gateway.pid).cpu_s,
        }
        if self.idle:
            cpu["idle"] = sum(CpuSample.of(server.pid).cpu_s for server in self.idle)
        for role, pid in self.helpers:
            cpu[role] = CpuSample.of(pid).cpu_s
        return cpu

    def serving(self, target: Target) -> Servers:
        """These servers with ``target``'s gateway as the measured one (unchanged for a
        direct target or the measured gateway itself)."""
        chosen = target.gateway
        if chosen is None or chosen is self.gateway:
            return self
        rest = tuple(s for s in (self.gateway, *self.idle) if s is not chosen)
        return Servers(self.mock, chosen, rest, self.helpers)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one side sends: the mock itself (``gateway`` None) or a gateway in front of it,
    with ``key`` as the bearer key (the admin key unless said otherwise)."""

    label: str
    server: Server
    gateway: Server | None
    key: str = _procs.ADMIN_KEY

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass(slots=True)
class Phase:
    """One side's figures, summed over its blocks. Latencies in ms, CPU in seconds."""

    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)
    loadgen_cpu_s: float = 0.0
    server_cpu_s: dict[str, float] = field(default_factory=dict)
    other_cpu_s: float = 0.0  # everything else the machine ran meanwhile
    overhead_buckets: list[tuple[float, float]] = field(default_factory=list)
    mock_requests: int = 0
    gateway_rss_mib: float = math.nan
    repeated: int = 0  # blocks measured again because other processes disturbed them
    unmeasured: int = 0  # requests sent but not in the figures: warm-up, blocks measured again

    @staticmethod
    def of_block(result: LoadResult) -> Phase:
        return Phase(
            ok=result.ok,
            errors=result.errors,
            error_samples=result.error_samples,
            elapsed_s=result.elapsed_s,
            latency_ms=result.latency_ms,
            ttft_ms=result.ttft_ms,
            send_lag_ms=result.send_lag_ms,
            loadgen_cpu_s=result.cpu_s,
        )

    def merge(self, part: Phase) -> None:
        self.ok += part.ok
        self.errors += part.errors
        self.error_samples = (self.error_samples + part.error_samples)[:5]
        self.elapsed_s += part.elapsed_s
        self.latency_ms += part.latency_ms
        self.ttft_ms += part.ttft_ms
        self.send_lag_ms += part.send_lag_ms
        self.loadgen_cpu_s += part.loadgen_cpu_s
        for name, seconds in part.server_cpu_s.items():
            self.server_cpu_s[name] = self.server_cpu_s.get(name, 0.0) + seconds
        self.other_cpu_s += part.other_cpu_s
        self.mock_requests += part.mock_requests
        earlier = dict(self.overhead_buckets)
        self.overhead_buckets = [(le, earlier.get(le, 0.0) + n) for le, n in part.overhead_buckets]
        if not math.isnan(part.gateway_rss_mib):
            self.gateway_rss_mib = part.gateway_rss_mib
        self.unmeasured += part.unmeasured

    @property
    def sent(self) -> int:
        """Every request this side's load generator sent, measured or not."""
        return self.ok + self.errors + self.unmeasured

    @property
    def latency(self) -> _report.Dist:
        return _report.Dist.of(self.latency_ms)

    @property
    def ttft(self) -> _report.Dist:
        return _report.Dist.of(self.ttft_ms)

    @property
    def send_lag(self) -> _report.Dist:
        return _report.Dist.of(self.send_lag_ms)

    @property
    def overhead_ms(self) -> tuple[float, float]:
        """The gateway's self-reported overhead, p50 and p99, from its histogram."""
        buckets = self.overhead_buckets
        return (
            1000.0 * _report.histogram_quantile(buckets, 0.50),
            1000.0 * _report.histogram_quantile(buckets, 0.99),
        )

    def cpu_ms_per_request(self, role: str) -> float:
        """CPU milliseconds per answered request of ``mock`` or ``gateway``."""
        return 1000.0 * self.server_cpu_s.get(role, math.nan) / max(1, self.ok)

    @property
    def loadgen_ms_per_request(self) -> float:
        return 1000.0 * self.loadgen_cpu_s / max(1, self.ok)

    @property
    def other_core_share(self) -> float:
        """Other processes' CPU as a share of one core over the measured time."""
        return self.other_cpu_s / self.elapsed_s if self.elapsed_s else math.nan


def _overhead_buckets(gateway: Server | None) -> list[tuple[float, float]]:
    if gateway is None:
        return []
    text = _procs.http("GET", gateway.url + "/metrics").decode()
    return _report.histogram(text, "headrace_overhead_seconds", stage="total")


def _block(handle: _procs.LoadHandle, target: Target, servers: Servers) -> Phase:
    """One measured block; the HTTP reads sit outside the CPU window so as not to count."""
    servers = servers.serving(target)
    buckets, mock_before = _overhead_buckets(target.gateway), _procs.mock_total(servers.mock)
    cpu = servers.cpu_s()
    machine = process_cpu_s()
    result = handle.run()
    machine = process_cpu_s() - machine
    part = Phase.of_block(result)
    part.server_cpu_s = {role: now - cpu[role] for role, now in servers.cpu_s().items()}
    part.other_cpu_s = max(0.0, machine - sum(part.server_cpu_s.values()) - result.cpu_s)
    part.mock_requests = _procs.mock_total(servers.mock) - mock_before
    if target.gateway is not None:
        after = _overhead_buckets(target.gateway)
        part.overhead_buckets = _report.histogram_delta(after, buckets)
        part.gateway_rss_mib = _procs.rss_mib(target.gateway.pid)
    return part


def _order(targets: list[Target], block: int) -> list[Target]:
    return targets if block % 2 == 0 else targets[::-1]


def open_loop(
    targets: list[Target],
    servers: Servers,
    *,
    stream: bool,
    rate: float,
    count: int,
    blocks: int,
    warmup_s: float,
    quiet: Quiet,
) -> dict[str, Phase]:
    """``count`` requests per side at ``rate``/s, in ``blocks`` alternating blocks."""
    per_block = math.ceil(count / blocks)
    specs = {
        t.label: LoadSpec(
            mode="open",
            url=t.server.url + CHAT_PATH,
            body=json.dumps(STREAM if stream else CHAT),
            headers=t.headers,
            stream=stream,
            rate=rate,
            count=per_block,
            warmup_s=warmup_s,
        )
        for t in targets
    }
    phases = {label: Phase(unmeasured=spec.warmup_count) for label, spec in specs.items()}
    with contextlib.ExitStack() as stack:
        handles = {
            label: stack.enter_context(
                _procs.load_generator(spec, timeout_s=per_block / rate + warmup_s + 60)
            )
            for label, spec in specs.items()
        }
        for block in range(blocks):
            for target in _order(targets, block):
                phase = phases[target.label]
                part = _block(handles[target.label], target, servers)
                while quiet.retry(part.other_core_share, part.elapsed_s):
                    phase.repeated += 1
                    phase.unmeasured += part.ok + part.errors
                    part = _block(handles[target.label], target, servers)
                phase.merge(part)
    return phases


@dataclass(slots=True)
class Saturation:
    """Closed-loop throughput of one side, summed over its blocks."""

    tool: str
    requests: int = 0  # answered 2xx
    errors: int = 0
    elapsed_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    repeated: int = 0
    server_cpu_s: dict[str, float] = field(default_factory=dict)

    def merge(self, part: Saturation) -> None:
        self.requests += part.requests
        self.errors += part.errors
        self.elapsed_s += part.elapsed_s
        self.loadgen_cpu_s += part.loadgen_cpu_s
        self.other_cpu_s += part.other_cpu_s
        for name, seconds in part.server_cpu_s.items():
            self.server_cpu_s[name] = self.server_cpu_s.get(name, 0.0) + seconds

    def cpu_ms_per_request(self, role: str) -> float:
        """CPU milliseconds of ``mock`` or ``gateway`` per 2xx answer."""
        return 1000.0 * self.server_cpu_s.get(role, math.nan) / max(1, self.requests)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else math.nan

    @property
    def loadgen_core_share(self) -> float:
        return self.loadgen_cpu_s / self.elapsed_s if self.elapsed_s else math.nan

    @property
    def other_core_share(self) -> float:
        return self.other_cpu_s / self.elapsed_s if self.elapsed_s else math.nan


def saturation(
    targets: list[Target],
    servers: Servers,
    *,
    connections: int,
    block_s: float,
    blocks: int,
    warmup_s: float,
    quiet: Quiet,
) -> dict[str, Saturation]:
    """Non-streamed chat, ``connections`` at once, each sent as the previous one returns.

    With ``wrk`` installed it drives the load; otherwise the Python load generator does.
    """
    body = json.dumps(CHAT)
    with contextlib.ExitStack() as stack:
        if _wrk.available():
            tool = "wrk -t1"
            for target in targets:
                _wrk.run(target.server.url + CHAT_PATH, body, target.headers, connections, warmup_s)

            def measure(target: Target) -> Saturation:
                url = target.server.url + CHAT_PATH
                run = _wrk.run(url, body, target.headers, connections, block_s)
                return Saturation(tool, run.ok, run.errors, run.elapsed_s, run.cpu_s)

        else:
            tool = "python/aiohttp closed loop"
            handles = {
                t.label: stack.enter_context(
                    _procs.load_generator(
                        LoadSpec(
                            mode="closed",
                            url=t.server.url + CHAT_PATH,
                            body=body,
                            headers=t.headers,
                            concurrency=connections,
                            duration_s=block_s,
                            warmup_s=warmup_s,
                        ),
                        timeout_s=block_s + warmup_s + 60,
                    )
                )
                for t in targets
            }

            def measure(target: Target) -> Saturation:
                run = handles[target.label].run()
                return Saturation(tool, run.ok, run.errors, run.elapsed_s, run.cpu_s)

        results = {t.label: Saturation(tool) for t in targets}
        for block in range(blocks):
            for target in _order(targets, block):
                part = _saturation_block(measure, target, servers)
                while quiet.retry(part.other_core_share, part.elapsed_s):
                    results[target.label].repeated += 1
                    part = _saturation_block(measure, target, servers)
                results[target.label].merge(part)
    return results


def _saturation_block(
    measure: Callable[[Target], Saturation], target: Target, servers: Servers
) -> Saturation:
    servers = servers.serving(target)
    before = servers.cpu_s()
    machine = process_cpu_s()
    part = measure(target)
    machine = process_cpu_s() - machine
    part.server_cpu_s = {role: now - before[role] for role, now in servers.cpu_s().items()}
    if target.gateway is None:  # the gateway idles meanwhile: not this side's cost
        part.server_cpu_s["idle"] = part.server_cpu_s.pop("gateway") + part.server_cpu_s.get(
            "idle", 0.0
        )
    cpu = sum(part.server_cpu_s.values())
    part.other_cpu_s = max(0.0, machine - cpu - part.loadgen_cpu_s)
    return part
