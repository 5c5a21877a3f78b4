"""The gateway at two revisions, side by side: what a change does to latency and CPU.

    .venv/bin/python bench/revisions.py                              # working tree against HEAD
    .venv/bin/python bench/revisions.py --baseline REV --commit REV  # two commits
    .venv/bin/python bench/revisions.py --runs 3                     # three runs, medians

One ``headrace mock-upstream`` (0 ms) and two gateways in front of it, one running
``--baseline``'s ``src/`` and one ``--commit``'s (or the working tree), both set up as
bench/overhead.py sets its gateway (admin key, auth, metrics, access log to a file), pinned
to one core, measured in turns block by block with the mock alone as ``direct``: saturation
(wrk), non-streamed chat at 200/s, streamed chat at 100/s. Prints each run's figures for both
and the second minus the first; with ``--runs``, the median of each difference. Instruction
counts (bench/instructions.py) miss the kernel's work and waiting; this measures them.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
import _wrk
from _phases import Phase, Saturation, Servers, Target, open_loop, saturation
from _procs import Code, Launcher, Server
from _quiet import Quiet
from _report import Table, fmt
from overhead import Arrangement


@dataclass(frozen=True, slots=True)
class Plan:
    rate: float  # non-streamed requests/s
    count: int  # non-streamed requests per side
    blocks: int
    stream_rate: float
    stream_count: int
    stream_blocks: int
    connections: int
    saturation_s: float  # per block
    saturation_blocks: int
    warmup_s: float
    quiet_budget_s: float
    time_limit_s: int


# Blocks of 1.25 s at the fixed rates, as in bench/tenancy.py: a side's keep-alive connections
# idle less than uvicorn's 5 s while the others take their turns.
FULL = Plan(200.0, 3000, 12, 100.0, 1000, 8, 64, 2.0, 3, 1.0, 60.0, 600)
QUICK = Plan(200.0, 600, 4, 100.0, 250, 2, 64, 2.0, 1, 0.5, 5.0, 180)
SIDES = ("a", "b")


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class Figures:
    """One run's figures by side (``direct``, ``a``, ``b``)."""

    fixed: dict[str, Phase]
    streamed: dict[str, Phase]
    sat: dict[str, Saturation]

    def of(self, side: str) -> dict[str, float]:
        """The figures compared, for one gateway, as (name: value in ms or requests/s)."""
        fixed, streamed, direct = self.fixed[side], self.streamed[side], self.fixed["direct"]
        return {
            "overhead p50 at 200/s (ms)": fixed.latency.p50 - direct.latency.p50,
            "overhead p99 at 200/s (ms)": fixed.latency.p99 - direct.latency.p99,
            "gateway CPU per request at 200/s (ms)": fixed.cpu_ms_per_request("gateway"),
            "stream TTFT overhead p50 at 100/s (ms)": (
                streamed.ttft.p50 - self.streamed["direct"].ttft.p50
            ),
            "stream overhead p50 at 100/s (ms)": (
                streamed.latency.p50 - self.streamed["direct"].latency.p50
            ),
            "gateway CPU per stream at 100/s (ms)": streamed.cpu_ms_per_request("gateway"),
            "requests/s at saturation": self.sat[side].requests_per_s,
            "gateway CPU per request at saturation (ms)": self.sat[side].cpu_ms_per_request(
                "gateway"
            ),
        }


def measure(plan: Plan, mock: Server, gateways: dict[str, Server], quiet: Quiet) -> Figures:
    targets = [Target("direct", mock, None), *(Target(s, g, g) for s, g in gateways.items())]
    servers = Servers(mock, gateways["a"], (gateways["b"],))
    _progress(f"saturation, {plan.connections} connections")
    quiet.wait()
    sat = saturation(
        targets,
        servers,
        connections=plan.connections,
        block_s=plan.saturation_s,
        blocks=plan.saturation_blocks,
        warmup_s=plan.warmup_s,
        quiet=quiet,
    )

    def fixed_rate(stream: bool, rate: float, count: int, blocks: int) -> dict[str, Phase]:
        kind = "streamed" if stream else "non-streamed"
        _progress(f"{count} {kind} requests per side at {rate:g}/s")
        quiet.wait()
        return open_loop(
            targets,
            servers,
            stream=stream,
            rate=rate,
            count=count,
            blocks=blocks,
            warmup_s=plan.warmup_s,
            quiet=quiet,
        )

    fixed = fixed_rate(False, plan.rate, plan.count, plan.blocks)
    streamed = fixed_rate(True, plan.stream_rate, plan.stream_count, plan.stream_blocks)
    return Figures(fixed, streamed, sat)


def run_table(figures: Figures, labels: dict[str, str]) -> Table:
    a, b = figures.of("a"), figures.of("b")
    table = Table("One run", ["figure", labels["a"], labels["b"], "second minus first"])
    for name, value in a.items():
        digits = 0 if name.startswith("requests/s") else 3
        table.add(
            name, fmt(value, digits), fmt(b[name], digits), fmt(b[name] - value, digits, sign=True)
        )
    errors = sum(p.errors for p in (*figures.fixed.values(), *figures.streamed.values()))
    table.notes.append(
        f"errors in the fixed-rate phases: {errors}; saturation: "
        f"{next(iter(figures.sat.values())).tool}"
    )
    return table


def summary_table(runs: list[Figures], labels: dict[str, str]) -> Table:
    table = Table(
        f"Second minus first over {len(runs)} runs",
        ["figure", f"median ({labels['b']} minus {labels['a']})", "each run"],
    )
    for name in runs[0].of("a"):
        diffs = [r.of("b")[name] - r.of("a")[name] for r in runs]
        digits = 0 if name.startswith("requests/s") else 3
        table.add(
            name,
            fmt(statistics.median(diffs), digits, sign=True),
            ", ".join(fmt(d, digits, sign=True) for d in diffs),
        )
    return table


def one_run(plan: Plan, codes: dict[str, Code], workdir: Path, layout: Arrangement) -> Figures:
    with contextlib.ExitStack() as stack:
        launchers = {}
        for side in SIDES:
            (workdir / side).mkdir()
            launchers[side] = Launcher(stack, workdir / side, codes[side])
        mock = launchers["a"].mock()
        config = _procs.mock_gateway_config(mock, access_log=True)
        gateways = {side: launchers[side].gateway(f"gateway-{side}", config) for side in SIDES}
        for gateway in gateways.values():
            _procs.pin(gateway.pid, layout.gateway)
        layout.apply(gateways["a"], mock)
        return measure(plan, mock, gateways, Quiet(plan.quiet_budget_s))


def run(plan: Plan, args: argparse.Namespace, workdir: Path) -> None:
    layout = Arrangement.named("split")
    codes, labels = {}, {}
    for side, rev in zip(SIDES, (args.baseline, args.commit), strict=True):
        (workdir / f"code-{side}").mkdir()
        codes[side] = Code.at(rev, workdir / f"code-{side}")
        labels[side] = codes[side].commit or "working tree"
        print(f"{side}: {codes[side].describe()}", flush=True)
    saturation_tool = "wrk" if _wrk.available() else "python/aiohttp (wrk not installed)"
    print(f"speed: {_procs.machine_speed()}", flush=True)
    print(f"cores: {layout.describe()}; saturation: {saturation_tool}", end="\n\n", flush=True)
    runs = []
    for index in range(args.runs):
        rundir = workdir / f"run-{index + 1}"
        rundir.mkdir()
        runs.append(one_run(plan, codes, rundir, layout))
        print(f"Run {index + 1} of {args.runs}", flush=True)
        print(run_table(runs[-1], labels).render(), end="\n\n", flush=True)
    if len(runs) > 1:
        print(summary_table(runs, labels).render(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, about a minute")
    _procs.add_revision_options(parser)
    parser.add_argument("--runs", type=int, default=1, help="how many runs (default 1)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    plan = QUICK if args.quick else FULL
    with _procs.bounded_run(plan.time_limit_s * args.runs) as workdir:
        run(plan, args, workdir)


if __name__ == "__main__":
    main()
