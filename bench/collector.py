"""What the garbage collector's settings do to the gateway: Python's, against Headrace's.

    .venv/bin/python bench/collector.py            # about 80 seconds
    .venv/bin/python bench/collector.py --quick    # about 30 seconds

One ``headrace mock-upstream`` (0 ms) and two gateways in front of it with the foundation's
setup (bench/overhead.py: admin key, metrics, access log to a file), running at once and
measured in turns, block by block, with the mock alone as ``direct``:

- ``python-gc``: the collector as Python sets it (``server.gc_freeze: false``,
  ``server.gc_threshold: 700``);
- ``headrace-gc``: the defaults (the start-up heap frozen, young threshold 10,000;
  headrace/cli/heap.py).

Prints, side by side: latency p50/p99 and gateway CPU per request at saturation and at
200/s, and each gateway's collections per 1,000 requests by generation (from its
``python_gc_collections_total``), its frozen objects and its RSS. bench/README.md
("Garbage collection") explains the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _phases import Servers, Target, open_loop, saturation
from _procs import Code, Launcher, Server
from _quiet import Quiet
from _report import Table, fmt
from overhead import Arrangement, header

SIDES = ("python-gc", "headrace-gc")
SETTINGS = {
    "python-gc": "server: {gc_freeze: false, gc_threshold: 700}\n",
    "headrace-gc": "",
}
GENERATIONS = ("0", "1", "2")


@dataclass(frozen=True, slots=True)
class Plan:
    connections: int
    saturation_s: float  # per block
    saturation_blocks: int
    rate: float
    count: int  # requests per side at the fixed rate
    blocks: int
    warmup_s: float
    quiet_budget_s: float
    time_limit_s: int


FULL = Plan(64, 2.0, 3, 200.0, 3000, 12, 1.0, 60.0, 600)
QUICK = Plan(64, 2.0, 1, 200.0, 600, 4, 0.5, 5.0, 180)


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


Scrape = dict[str, float]


def scrape(gateway: Server) -> Scrape:
    """The gateway's collections by generation (``gen0``…), frozen objects and requests."""
    text = _procs.http("GET", gateway.url + "/metrics").decode()
    figures = {
        f"gen{g}": _sample(text, rf'python_gc_collections_total\{{generation="{g}"\}}')
        for g in GENERATIONS
    }
    figures["frozen"] = _sample(text, "headrace_gc_frozen_objects")
    figures["requests"] = sum(
        float(m) for m in re.findall(r"^headrace_requests_total\{[^}]*\} (\S+)$", text, re.M)
    )
    return figures


def scrape_all(gateways: dict[str, Server]) -> dict[str, Scrape]:
    return {side: scrape(gateway) for side, gateway in gateways.items()}


def _sample(text: str, pattern: str) -> float:
    match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def per_thousand(before: Scrape, after: Scrape, generation: str) -> float:
    requests = after["requests"] - before["requests"]
    done = after[f"gen{generation}"] - before[f"gen{generation}"]
    return 1000.0 * done / requests if requests else float("nan")


def run(plan: Plan, args: argparse.Namespace, workdir: Path) -> None:
    layout = Arrangement.named(args.pin)
    code = Code.at(args.commit, workdir)
    first, *rest = header(args.quick, layout, code).splitlines()
    title = first.replace("overhead benchmark", "collector benchmark")
    print("\n".join([title, *rest]), end="\n\n", flush=True)
    quiet = Quiet(plan.quiet_budget_s)
    with contextlib.ExitStack() as stack:
        launch = Launcher(stack, workdir, code)
        _progress("starting mock-upstream and two gateways")
        mock = launch.mock()
        config = _procs.mock_gateway_config(mock, access_log=True)
        gateways = {side: launch.gateway(side, config + SETTINGS[side]) for side in SIDES}
        for gateway in gateways.values():
            _procs.pin(gateway.pid, layout.gateway)
        layout.apply(gateways[SIDES[0]], mock)
        targets = [Target("direct", mock, None), *(Target(s, g, g) for s, g in gateways.items())]
        servers = Servers(mock, gateways[SIDES[0]], (gateways[SIDES[1]],))
        start = scrape_all(gateways)
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
        middle = scrape_all(gateways)
        _progress(f"{plan.count} requests per side at {plan.rate:g}/s")
        quiet.wait()
        fixed = open_loop(
            targets,
            servers,
            stream=False,
            rate=plan.rate,
            count=plan.count,
            blocks=plan.blocks,
            warmup_s=plan.warmup_s,
            quiet=quiet,
        )
        end = scrape_all(gateways)

    table = Table(
        f"The collector's settings - non-streamed chat, upstream 0 ms, saturation "
        f"({plan.connections} connections) then {plan.count} requests per side at "
        f"{plan.rate:g}/s",
        ["figure", "direct", *SIDES, "difference"],
    )

    def row(name: str, values: dict[str, float], digits: int = 2, direct: str = "") -> None:
        cells = [fmt(values[s], digits) for s in SIDES]
        change = fmt(values[SIDES[1]] - values[SIDES[0]], digits, sign=True)
        table.add(name, direct, *cells, change)

    def collections(before: dict[str, Scrape], after: dict[str, Scrape]) -> None:
        for generation in GENERATIONS:
            row(
                f"  collections of generation {generation} per 1,000 requests",
                {s: per_thousand(before[s], after[s], generation) for s in SIDES},
                1,
            )

    row(
        "requests/s at saturation",
        {s: sat[s].requests_per_s for s in SIDES},
        0,
        fmt(sat["direct"].requests_per_s, 0),
    )
    row(
        "gateway CPU per request at saturation (ms)",
        {s: sat[s].cpu_ms_per_request("gateway") for s in SIDES},
        3,
    )
    collections(start, middle)
    for q in ("p50", "p99"):
        row(
            f"latency {q} at {plan.rate:g}/s (ms)",
            {s: fixed[s].latency.at(q) for s in SIDES},
            2,
            fmt(fixed["direct"].latency.at(q)),
        )
    row(
        f"gateway CPU per request at {plan.rate:g}/s (ms)",
        {s: fixed[s].cpu_ms_per_request("gateway") for s in SIDES},
        3,
    )
    collections(middle, end)
    row("frozen objects (headrace_gc_frozen_objects)", {s: end[s]["frozen"] for s in SIDES}, 0)
    row("gateway RSS after the run (MiB)", {s: fixed[s].gateway_rss_mib for s in SIDES}, 1)
    errors = {s: float(sat[s].errors + fixed[s].errors) for s in SIDES}
    row("errors (saturation and fixed rate)", errors, 0)
    table.notes.append(
        "difference = headrace-gc minus python-gc; collections from each gateway's "
        "python_gc_collections_total over the phase, per request it answered"
    )
    table.notes.append(quiet.note())
    print(table.render())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and blocks")
    parser.add_argument(
        "--pin",
        choices=["split", "none"],
        default="split",
        help="split (default): gateways on core 0, mock and load generators on core 1",
    )
    parser.add_argument(
        "--commit", help="run the servers from src/ as of this commit instead of the tree"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    with _procs.bounded_run(plan.time_limit_s) as workdir:
        run(plan, args, workdir)


if __name__ == "__main__":
    main()
