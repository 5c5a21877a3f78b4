"""How much latency and CPU Headrace adds to a request: the gateway against a direct baseline.

    .venv/bin/python bench/overhead.py            # full run, about 5 minutes
    .venv/bin/python bench/overhead.py --quick    # under a minute, no local model

Starts ``headrace mock-upstream`` and ``headrace serve`` (auth, metrics and access log on, as
in production) on 127.0.0.1, then measures each figure directly against the mock and through
the gateway in the same run, and prints one table per section and the goals with PASS/FAIL.
bench/README.md explains every figure and how it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _local
import _procs
import _quiet
import _report
import _wrk
from _phases import Phase, Servers, Target, open_loop, saturation
from _procs import Code, Launcher, Server
from _quiet import Quiet
from _report import Goal
from _tables import LatencyCase, latency_table, stream_table


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how hard each phase runs. Each side gets ``*blocks`` turns."""

    connections: int
    saturation_s: float  # per block
    saturation_blocks: int
    rate: float  # requests/s of the fixed-rate latency phases
    count: int  # requests per side
    blocks: int
    stream_rate: float
    stream_count: int
    stream_blocks: int
    warmup_s: float
    local: bool
    access_log_off: bool
    quiet_budget_s: float  # at most this long spent waiting out other processes' CPU bursts
    time_limit_s: int


FULL = Plan(64, 2.0, 3, 200.0, 3000, 6, 100.0, 1000, 4, 1.0, True, True, 60.0, 600)
QUICK = Plan(64, 2.0, 1, 200.0, 600, 2, 100.0, 300, 2, 0.5, False, False, 5.0, 120)
LATENCIES_MS = (0, 50)
TTFTS_MS = (0, 50)


@dataclass(frozen=True, slots=True)
class Arrangement:
    """Which cores each process may run on."""

    gateway: frozenset[int]
    others: frozenset[int]  # the mock, the load generators and this script

    @staticmethod
    def named(name: str) -> Arrangement:
        every = _procs.ALL_CORES
        if name == "split" and len(every) >= 2:
            first = min(every)
            return Arrangement(frozenset({first}), every - {first})
        return Arrangement(every, every)

    def describe(self) -> str:
        if self.gateway == self.others:
            return "not pinned: the kernel places gateway, mock and load generators"
        return (
            f"gateway pinned to core {cores_text(self.gateway)}; mock, load generators and this "
            f"script to core {cores_text(self.others)}"
        )

    def apply(self, gateway: Server, mock: Server) -> None:
        _procs.pin(gateway.pid, self.gateway)
        _procs.pin(mock.pid, self.others)
        os.sched_setaffinity(0, self.others)  # load generators inherit it


def cores_text(cores: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _show(table: _report.Table) -> None:
    print(table.render(), end="\n\n", flush=True)


@dataclass(slots=True)
class Bench:
    plan: Plan
    launch: Launcher
    layout: Arrangement
    quiet: Quiet
    goals: list[Goal] = field(default_factory=list)

    def latency_case(self, latency_ms: int, mock: Server, gateway: Server) -> LatencyCase:
        plan, quiet = self.plan, self.quiet
        _procs.http("PUT", mock.url + "/_mock/faults", {"latency_ms": latency_ms})
        targets = [Target("direct", mock, None), Target("gateway", gateway, gateway)]
        _progress(f"upstream {latency_ms} ms: saturation")
        quiet.wait()
        sat = saturation(
            targets,
            Servers(mock, gateway),
            connections=plan.connections,
            block_s=plan.saturation_s,
            blocks=plan.saturation_blocks,
            warmup_s=plan.warmup_s,
            quiet=quiet,
        )
        _progress(f"upstream {latency_ms} ms: {plan.count} requests per side at {plan.rate:g}/s")
        quiet.wait()
        fixed = open_loop(
            targets,
            Servers(mock, gateway),
            stream=False,
            rate=plan.rate,
            count=plan.count,
            blocks=plan.blocks,
            warmup_s=plan.warmup_s,
            quiet=quiet,
        )
        return LatencyCase(latency_ms, plan.connections, plan.rate, sat, fixed)

    def streams(self, mock: Server, gateway: Server) -> dict[int, dict[str, Phase]]:
        plan, results = self.plan, {}
        targets = [Target("direct", mock, None), Target("gateway", gateway, gateway)]
        for ttft_ms in TTFTS_MS:
            _procs.http("PUT", mock.url + "/_mock/faults", {"ttft_ms": ttft_ms})
            _progress(f"streaming, mock ttft {ttft_ms} ms")
            self.quiet.wait()
            results[ttft_ms] = open_loop(
                targets,
                Servers(mock, gateway),
                stream=True,
                rate=plan.stream_rate,
                count=plan.stream_count,
                blocks=plan.stream_blocks,
                warmup_s=plan.warmup_s,
                quiet=self.quiet,
            )
        return results

    def mock_sections(self) -> None:
        """Everything measured against mock-upstream; prints each table as it is done."""
        _progress("starting mock-upstream and the gateway")
        mock = self.launch.mock()
        config = _procs.mock_gateway_config(mock, access_log=True)
        gateway = self.launch.gateway("gateway", config)
        self.layout.apply(gateway, mock)
        cases = [self.latency_case(ms, mock, gateway) for ms in LATENCIES_MS]
        for case in cases:
            _show(latency_table(case, self.goals))
        streams = self.streams(mock, gateway)
        _show(stream_table(streams, self.plan.stream_rate, self.plan.stream_count, self.goals))
        gateway.stop()
        if self.plan.access_log_off:
            _progress("access log off: the 0 ms case again, through a second gateway")
            config = _procs.mock_gateway_config(mock, access_log=False)
            silent = self.launch.gateway("gateway-no-access-log", config)
            self.layout.apply(silent, mock)
            case = self.latency_case(LATENCIES_MS[0], mock, silent)
            silent.stop()
            title = f"Access log OFF (informational), upstream {case.latency_ms} ms"
            _show(latency_table(case, [], title))  # the goals judge the production setting
        mock.stop()

    def local_section(self, quick: bool) -> None:
        os.sched_setaffinity(0, _procs.ALL_CORES)
        for table in _local.run(self.launch, self.goals, _progress, self.quiet, quick=quick):
            _show(table)


def header(quick: bool, layout: Arrangement, code: Code) -> str:
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
    saturation_tool = "wrk -t1" if _wrk.available() else "python/aiohttp (wrk not installed)"
    return "\n".join(
        [
            f"Headrace overhead benchmark ({'--quick' if quick else 'full'}), "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"machine: {len(_procs.ALL_CORES)} cores ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}; at start: load average {load}, "
            f"other processes {busy:.0f}% of a core",
            f"speed: {_procs.machine_speed()}",
            f"code: {code.describe()}",
            f"load generators: {saturation_tool} for saturation, python/aiohttp open loop "
            "(own process) for fixed rates",
            f"cores: {layout.describe()}",
            "gateway: auth, metrics and access log (JSON lines to a file) on, as in production",
        ]
    )


def run(plan: Plan, args: argparse.Namespace, workdir: Path) -> None:
    layout = Arrangement.named(args.pin)
    code = Code.at(args.commit, workdir)
    print(header(args.quick, layout, code), end="\n\n", flush=True)
    with contextlib.ExitStack() as stack:
        bench = Bench(plan, Launcher(stack, workdir, code), layout, Quiet(plan.quiet_budget_s))
        if not args.local_only:
            bench.mock_sections()
        if args.local_only or (args.local if args.local is not None else plan.local):
            bench.local_section(args.quick)
    goals = _report.goals_table(bench.goals)
    goals.notes.append(bench.quiet.note())
    print(goals.render())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, no local model")
    parser.add_argument(
        "--local",
        action=argparse.BooleanOptionalAction,
        help="the local model section (default: on, off with --quick)",
    )
    parser.add_argument("--local-only", action="store_true", help="only the local model section")
    parser.add_argument(
        "--pin",
        choices=["split", "none"],
        default="split",
        help="split (default): gateway alone on core 0, mock and load generators on core 1, "
        "as if client and upstream were other machines; none: the kernel places them",
    )
    parser.add_argument(
        "--commit",
        help="run the servers from src/ as of this commit (e.g. HEAD, to leave uncommitted "
        "work out) instead of the working tree",
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    with _procs.bounded_run(plan.time_limit_s) as workdir:
        run(plan, args, workdir)


if __name__ == "__main__":
    main()
