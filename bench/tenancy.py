"""What tenancy costs on the request path: a user key with limits and budgets, usage records.

    .venv/bin/python bench/tenancy.py            # full run, 5-8 minutes
    .venv/bin/python bench/tenancy.py --quick    # about a minute
    .venv/bin/python bench/tenancy.py --runs 10  # ten runs, time goals judged on the medians

One ``headrace mock-upstream`` (0 ms) and three gateways in front of it, all running at once
and measured in turns, block by block, with the mock alone as ``direct``:

- ``baseline``: the gateway as bench/overhead.py runs it (admin key, no limits), usage
  recording off;
- ``memory``: a user key with RPM, TPM, parallel and budget limits, in a team with its own RPM
  and budget, all too high to refuse; ``limits.backend: memory``; usage records into SQLite;
- ``redis+postgres``: the same key and team, ``limits.backend: redis``, usage records into a
  PostgreSQL database created for the run (``headrace migrate`` first) and dropped after.

Prints overhead p50/p99 and gateway CPU per request at a fixed rate and at saturation, each
configuration's delta over the baseline with the goals (<= 0.3 ms each), checks that each
database holds one usage record per request, and measures the usage writer's PostgreSQL
throughput with bench/usage_writer.py. bench/README.md explains the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
import _quiet
import _wrk
from _phases import Phase, Saturation, Servers, Target, open_loop, saturation
from _procs import Code, CpuSample, Launcher, Server
from _quiet import Quiet
from _report import Goal, Table, fmt, goals_table
from _tenants import (
    CLIENT_GONE,
    PRICE_PER_MTOK_USD,
    Accounting,
    Setup,
    accounting,
    add_server_options,
    by_status,
    describe_events,
    forget_counters,
    fresh_postgres,
    log_events,
    metric,
    redis_on,
    redis_pid,
    start_gateways,
    usage_writer,
)
from overhead import Arrangement, cores_text

if TYPE_CHECKING:
    from usage_writer import Run

GOAL_DELTA_MS = 0.3
GOAL_RECORDS_PER_S = 10_000
CONFIGS = ("baseline", "memory", "redis+postgres")


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how hard each phase runs."""

    rate: float  # requests/s of the fixed-rate phase
    count: int  # requests per side at that rate
    blocks: int
    connections: int
    saturation_s: float  # per block
    saturation_blocks: int
    warmup_s: float
    writer_records: int  # bench/usage_writer.py: records per run
    writer_repeat: int
    quiet_budget_s: float
    time_limit_s: int
    idle_s: float  # how long the gateways' idle CPU is read, before any load


# Blocks of at most 1.25 s at the fixed rate: each side's connections then idle less than
# uvicorn's 5 s keep-alive while the other three sides take their turns (longer, and the
# servers close them: reconnections, and now and then a request sent on a closing socket).
FULL = Plan(200.0, 3000, 12, 64, 2.0, 3, 1.0, 100_000, 3, 60.0, 600, 10.0)
QUICK = Plan(200.0, 600, 4, 64, 2.0, 1, 0.5, 20_000, 1, 5.0, 240, 3.0)


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _show(table: Table) -> None:
    print(table.render(), end="\n\n", flush=True)


# -- the measurements -----------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    saturation: dict[str, Saturation]
    fixed: dict[str, Phase]
    before: dict[str, Accounting]  # after saturation, before the fixed-rate phase
    after: dict[str, Accounting]
    refusals: dict[str, int]
    spooled: dict[str, int]
    events: dict[str, collections.Counter[str]]  # warnings and errors in each gateway's log
    idle_ms_per_s: dict[str, float]  # each gateway's CPU with no request at all


def measure(
    plan: Plan, setups: list[Setup], mock: Server, quiet: Quiet, redis_server: int | None
) -> Results:
    """Saturation, then the fixed rate; each side's usage accounting after each."""
    targets = [Target("direct", mock, None), *(s.target for s in setups)]
    helpers = (("redis", redis_server),) if redis_server is not None else ()
    servers = Servers(mock, setups[0].gateway, tuple(s.gateway for s in setups[1:]), helpers)
    quiet.wait()
    _progress(f"idle CPU of the gateways, {plan.idle_s:g} s")
    idle = idle_cpu(setups, plan.idle_s)
    _progress(
        f"saturation, {plan.connections} connections, {plan.saturation_blocks} blocks per side"
    )
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
    before = {s.label: accounting(s) for s in setups}
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
    after = {s.label: accounting(s) for s in setups}
    return Results(
        sat,
        fixed,
        before,
        after,
        refusals={s.label: metric(s, "headrace_quota_refusals_total") for s in setups},
        spooled={s.label: metric(s, "headrace_usage_records", 'outcome="spooled"') for s in setups},
        events={s.label: log_events(s.gateway) for s in setups},
        idle_ms_per_s=idle,
    )


def idle_cpu(setups: list[Setup], seconds: float) -> dict[str, float]:
    """Each gateway's CPU over ``seconds`` with no request (its timers and background
    loops: the job runner's and the webhook outbox's polls, the usage writer, uvicorn), in
    ms per second."""
    before = {s.label: CpuSample.of(s.gateway.pid).cpu_s for s in setups}
    time.sleep(seconds)
    return {
        s.label: (CpuSample.of(s.gateway.pid).cpu_s - before[s.label]) * 1000 / seconds
        for s in setups
    }


def _delta(value: float, base: float) -> str:
    return fmt(value - base, sign=True)


def tenancy_table(plan: Plan, results: Results, goals: list[Goal]) -> Table:
    fixed, sat = results.fixed, results.saturation
    direct, base = fixed["direct"], fixed["baseline"]
    table = Table(
        f"Tenancy features - non-streamed chat (max_tokens 16), upstream 0 ms, "
        f"{plan.count} requests per side at {plan.rate:g}/s",
        ["figure", "direct", *CONFIGS],
    )

    def row(name: str, cells: dict[str, str], direct_cell: str = "") -> None:
        table.add(name, direct_cell, *(cells.get(c, "") for c in CONFIGS))

    for q in ("p50", "p99"):
        row(
            f"latency {q} (ms)",
            {c: fmt(fixed[c].latency.at(q)) for c in CONFIGS},
            fmt(direct.latency.at(q)),
        )
        row(
            f"overhead {q}: minus direct (ms)",
            {c: _delta(fixed[c].latency.at(q), direct.latency.at(q)) for c in CONFIGS},
        )
        row(
            f"  {q} delta over baseline (ms)",
            {c: _delta(fixed[c].latency.at(q), base.latency.at(q)) for c in CONFIGS[1:]},
        )
    cpu = {c: fixed[c].cpu_ms_per_request("gateway") for c in CONFIGS}
    row(f"gateway CPU per request at {plan.rate:g}/s (ms)", {c: fmt(cpu[c], 3) for c in CONFIGS})
    row("  delta over baseline (ms)", {c: _delta(cpu[c], cpu["baseline"]) for c in CONFIGS[1:]})
    rps = {c: sat[c].requests_per_s for c in CONFIGS}
    row(
        f"requests/s at saturation ({plan.connections} connections)",
        {c: fmt(rps[c], 0) for c in CONFIGS},
        fmt(sat["direct"].requests_per_s, 0),
    )
    sat_cpu = {c: sat[c].cpu_ms_per_request("gateway") for c in CONFIGS}
    row("gateway CPU per request at saturation (ms)", {c: fmt(sat_cpu[c], 3) for c in CONFIGS})
    row(
        "  delta over baseline (ms)",
        {c: _delta(sat_cpu[c], sat_cpu["baseline"]) for c in CONFIGS[1:]},
    )
    if "redis" in sat["redis+postgres"].server_cpu_s:
        row(
            "Redis CPU per request at saturation (ms)",
            {c: fmt(sat[c].cpu_ms_per_request("redis"), 3) for c in CONFIGS},
        )
    row(
        "gateway self-reported overhead p50/p99 (ms)",
        {c: "/".join(fmt(v) for v in fixed[c].overhead_ms) for c in CONFIGS},
    )
    row(
        "  self-reported p50 delta over baseline (ms)",
        {c: _delta(fixed[c].overhead_ms[0], base.overhead_ms[0]) for c in CONFIGS[1:]},
    )
    row("gateway RSS after the run (MiB)", {c: fmt(fixed[c].gateway_rss_mib, 1) for c in CONFIGS})
    row(
        "gateway CPU while idle, before the load (ms per s)",
        {c: fmt(results.idle_ms_per_s[c], 1) for c in CONFIGS},
    )
    row(
        "load generator send lag p99 (ms)",
        {c: fmt(fixed[c].send_lag.p99) for c in CONFIGS},
        fmt(direct.send_lag.p99),
    )
    row(
        "other processes' CPU (% of a core)",
        {c: fmt(100 * fixed[c].other_core_share, 0) for c in CONFIGS},
        fmt(100 * direct.other_core_share, 0),
    )
    row(
        "blocks measured again (fixed / saturation)",
        {c: f"{fixed[c].repeated} / {sat[c].repeated}" for c in CONFIGS},
        f"{direct.repeated} / {sat['direct'].repeated}",
    )
    row(
        "requests ok/errors; reached the mock",
        {c: f"{fixed[c].ok}/{fixed[c].errors}; {fixed[c].mock_requests}" for c in CONFIGS},
        f"{direct.ok}/{direct.errors}; {direct.mock_requests}",
    )
    row(
        "saturation 2xx/errors",
        {c: f"{sat[c].requests}/{sat[c].errors}" for c in CONFIGS},
        f"{sat['direct'].requests}/{sat['direct'].errors}",
    )
    row("quota refusals (429/402)", {c: str(results.refusals[c]) for c in CONFIGS[1:]})
    for c in CONFIGS:
        table.notes.append(
            f"{c} gateway log, warnings and errors: {describe_events(results.events[c])}"
        )
    for c in CONFIGS[1:]:
        goals.append(
            Goal(
                f"{c}: overhead p50 over baseline",
                fixed[c].latency.p50 - base.latency.p50,
                GOAL_DELTA_MS,
                "ms",
            )
        )
        goals.append(
            Goal(
                f"{c}: CPU/request over baseline, {plan.rate:g}/s",
                cpu[c] - cpu["baseline"],
                GOAL_DELTA_MS,
                "ms",
                digits=3,
            )
        )
        goals.append(
            Goal(
                f"{c}: CPU/request over baseline, saturation",
                sat_cpu[c] - sat_cpu["baseline"],
                GOAL_DELTA_MS,
                "ms",
                digits=3,
            )
        )
    table.notes.append(
        "overhead = this column's latency minus direct's at the same percentile; delta = this "
        "column's figure minus baseline's; latency from the scheduled send to the last byte"
    )
    table.notes.append(
        f"saturation: {sat['baseline'].tool}, {plan.saturation_blocks} blocks of "
        f"{plan.saturation_s:g} s per side; CPU per request = the gateway's CPU over 2xx answers"
    )
    for label, phase in fixed.items():
        if phase.errors:
            table.notes.append(f"{label} errors: {'; '.join(phase.error_samples)}")
    return table


def records_table(results: Results, goals: list[Goal]) -> Table:
    """One usage record per request: for the fixed-rate phase (counted at the client) and for
    the whole run (counted by the gateway, status by status)."""
    labels = CONFIGS[1:]
    table = Table("Usage records - one per request", ["figure", *labels])
    before, after, fixed = results.before, results.after, results.fixed
    stored = {c: after[c].total_records - before[c].total_records for c in labels}
    table.add(
        "fixed rate: requests sent (warm-up included)", *(f"{fixed[c].sent:,}" for c in labels)
    )
    table.add("fixed rate: records stored", *(f"{stored[c]:,}" for c in labels))
    table.add("whole run: chat requests by status", *(by_status(after[c].requests) for c in labels))
    table.add("whole run: records by status", *(by_status(after[c].records) for c in labels))
    table.add("records spooled (database unavailable)", *(str(results.spooled[c]) for c in labels))
    for c in labels:
        goals.append(
            Goal(
                f"{c}: records unmatched, fixed rate",
                abs(stored[c] - fixed[c].sent),
                0,
                "records",
                digits=0,
            )
        )
        goals.append(
            Goal(f"{c}: records unmatched, whole run", after[c].unmatched, 0, "records", digits=0)
        )
    table.notes.append(
        "fixed rate: every request the load generators sent, answered or not; whole run: the "
        "gateway's headrace_requests_total for the chat route (wrk does not count the requests "
        "it cuts off when it stops), compared status by status"
    )
    for c in labels:
        gone = results.events[c][CLIENT_GONE]
        if gone:
            table.notes.append(
                f"{c}: {gone} requests failed with starlette's ClientDisconnect (the "
                "client left before the body was read: wrk stopping), logged as unhandled errors "
                "and counted as 500s; they never reached the service, which writes the records"
            )
    table.notes.append("baseline: recording off")
    return table


def writer_tables(plan: Plan, code: Code, postgres: str, workdir: Path, goals: list[Goal]) -> Table:
    """bench/usage_writer.py's throughput and record() cost at the gateway's batch size."""
    writer = usage_writer(code)
    from headrace.config import UsageConfig

    batch = UsageConfig().batch_size
    spool = workdir / "writer-spool"

    async def both() -> tuple[list[Run], tuple[float, float, float]]:
        runs = await writer.throughput(
            "postgresql", postgres, batch, plan.writer_records, plan.writer_repeat, spool
        )
        return runs, await writer.record_cost(workdir / "writer-spool-cost")

    runs, (buffered, baseline, spilling) = asyncio.run(both())
    mid = sorted(runs, key=lambda r: r.records_per_s)[len(runs) // 2]
    table = Table(
        f"Usage writer into PostgreSQL (bench/usage_writer.py), batch {batch} "
        f"(usage.batch_size default), {plan.writer_records:,} records, median of "
        f"{plan.writer_repeat}",
        ["figure", "value"],
    )
    table.add("records/s", fmt(mid.records_per_s, 0))
    table.add("min-max records/s", writer.spread(runs))
    table.add(
        "write_usage calls; ms per call mean / max",
        f"{mid.calls}; {fmt(mid.call_ms_mean, 1)} / {fmt(mid.call_ms_max, 1)}",
    )
    table.add("writer CPU per record (us, this process)", fmt(mid.cpu_us_per_record, 1))
    table.add(
        "record() on the request path (ns/call)",
        f"{fmt(buffered, 0)} (loop alone {fmt(baseline, 0)})",
    )
    table.add("record() with the buffer full: to the spool (ns/call)", fmt(spilling, 0))
    table.notes.append(
        "in this process, after the gateways stopped; bench/usage_writer.py runs more batch "
        "sizes and a steady 10,000 records/s with the event loop's stalls"
    )
    goals.append(
        Goal(
            f"usage writer records/s into PostgreSQL, batch {batch}",
            mid.records_per_s,
            GOAL_RECORDS_PER_S,
            "records/s",
            at_least=True,
            digits=0,
        )
    )
    return table


# -- the command ----------------------------------------------------------------------------


def redis_cores(
    layout: Arrangement, pid: int | None, args: argparse.Namespace
) -> tuple[frozenset[int] | None, str]:
    """Where the local Redis runs during the run (None: where it was), and that in words.

    Left to the kernel by default. ``--redis-cores gateway`` puts it on the gateways' core,
    off the load generators' core where the kernel ran it about a quarter of the time; in the
    runs of 2026-11-27 that did not lower the p50 on the whole (bench/README.md, "Where a
    local Redis runs")."""
    if pid is None:
        return None, "Redis not on this machine: not pinned"
    if args.redis_cores == "any" or layout.gateway == layout.others:
        return None, f"redis-server (pid {pid}) left to the kernel"
    cores = cores_text(layout.gateway)
    return layout.gateway, f"redis-server (pid {pid}) on the gateway's core {cores} for the run"


def header(
    quick: bool, layout: Arrangement, code: Code, args: argparse.Namespace, redis_where: str
) -> str:
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
    server = sqlalchemy.make_url(args.database_url)
    return "\n".join(
        [
            f"Headrace tenancy overhead benchmark ({'--quick' if quick else 'full'}), "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"machine: {len(_procs.ALL_CORES)} cores ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}; at start: load average {load}, "
            f"other processes {busy:.0f}% of a core",
            f"speed: {_procs.machine_speed()}",
            f"code: {code.describe()}",
            f"load generators: {saturation_tool} for saturation, python/aiohttp open loop "
            "(own process) for the fixed rate",
            f"cores: {layout.describe()}; {redis_where}",
            "gateways: auth, metrics and access log on (as bench/overhead.py); mock-model priced "
            f"${PRICE_PER_MTOK_USD[0]}/${PRICE_PER_MTOK_USD[1]} per million tokens in and out",
            "  baseline: admin key, no limits, usage: {enabled: false}",
            "  memory: user key (rpm, tpm, max_parallel, budget) in a team (rpm, budget), "
            "limits.backend memory, usage records into SQLite",
            f"  redis+postgres: the same, limits.backend redis ({args.redis_url}), usage records "
            f"into a new database on {server.host}:{server.port or 5432} (migrated, dropped after)",
        ]
    )


def run(plan: Plan, args: argparse.Namespace, workdir: Path) -> None:
    layout = Arrangement.named(args.pin)
    code = Code.at(args.commit, workdir)
    redis_server = redis_pid(args.redis_url)
    cores, redis_where = redis_cores(layout, redis_server, args)
    print(header(args.quick, layout, code, args, redis_where), end="\n\n", flush=True)
    quiets: list[Quiet] = []
    runs: list[list[Goal]] = []
    for index in range(args.runs):
        if args.runs > 1:
            print(f"Run {index + 1} of {args.runs}", end="\n\n", flush=True)
        quiets.append(Quiet(plan.quiet_budget_s))
        rundir = workdir / f"run-{index + 1}"  # its own databases and logs
        rundir.mkdir()
        runs.append(one_run(plan, args, rundir, layout, code, quiets[-1], (redis_server, cores)))
    goals = runs[0] if len(runs) == 1 else over_runs(runs)
    if len(runs) > 1:
        _show(runs_table(runs, goals))
    os.sched_setaffinity(0, _procs.ALL_CORES)  # as bench/usage_writer.py runs
    _progress("usage writer throughput into PostgreSQL (bench/usage_writer.py)")
    with fresh_postgres(args.database_url, code) as postgres:
        _show(writer_tables(plan, code, postgres, workdir, goals))
    table = goals_table(goals)
    waited, repeated = sum(q.waited_s for q in quiets), sum(q.repeated for q in quiets)
    table.notes.append(
        f"other processes: {waited:.0f} s spent waiting for quiet, {repeated} blocks measured "
        f"again (budget {plan.quiet_budget_s:g} s per run)"
    )
    if len(runs) > 1:
        table.notes.append(f"time figures: the median of {len(runs)} runs; records: the worst run")
    print(table.render())


def one_run(
    plan: Plan,
    args: argparse.Namespace,
    workdir: Path,
    layout: Arrangement,
    code: Code,
    quiet: Quiet,
    redis: tuple[int | None, frozenset[int] | None],
) -> list[Goal]:
    """Servers started afresh in ``workdir`` (new databases, new gateways), measured; the
    run's goals."""
    redis_server, cores = redis
    goals: list[Goal] = []
    owners: list[str] = []
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(fresh_postgres(args.database_url, code))
        stack.callback(lambda: forget_counters(args.redis_url, tuple(owners)))
        launch = Launcher(stack, workdir, code)
        _progress("starting mock-upstream")
        mock = launch.mock()
        _progress("starting the gateways: baseline, memory, redis+postgres")
        setups = start_gateways(launch, mock, postgres, args.redis_url, uuid.uuid4().hex[:8])
        owners.extend(owner for setup in setups for owner in setup.owners)
        for setup in setups:
            _procs.pin(setup.gateway.pid, layout.gateway)
        layout.apply(setups[0].gateway, mock)
        with redis_on(redis_server, cores):
            results = measure(plan, setups, mock, quiet, redis_server)
        _show(tenancy_table(plan, results, goals))
        _show(records_table(results, goals))
    return goals


def over_runs(runs: list[list[Goal]]) -> list[Goal]:
    """One goal per goal of a run: the median of the runs' time figures, the worst of the
    others (records unmatched)."""
    out = []
    for i, first in enumerate(runs[0]):
        values = [run[i].value for run in runs]
        if first.unit == "ms":
            value = statistics.median(values)
        else:
            value = min(values) if first.at_least else max(values)
        out.append(dataclasses.replace(first, value=value))
    return out


def runs_table(runs: list[list[Goal]], combined: list[Goal]) -> Table:
    """Each time goal, run by run: the median (``combined``, from :func:`over_runs`), the
    range and how many runs were over."""
    table = Table(
        f"Goals over {len(runs)} runs (time figures)",
        ["goal", "median", "range", "runs over", "each run"],
    )
    for i, first in enumerate(combined):
        if first.unit != "ms":
            continue
        goals = [run[i] for run in runs]
        values = [g.value for g in goals]
        table.add(
            first.name,
            fmt(first.value, first.digits, sign=True),
            f"{fmt(min(values), first.digits, sign=True)} to "
            f"{fmt(max(values), first.digits, sign=True)}",
            f"{sum(not g.passed for g in goals)} of {len(goals)}",
            ", ".join(fmt(v, first.digits, sign=True) for v in values),
        )
    table.notes.append(
        f"target <= {GOAL_DELTA_MS:g} ms each; a run: the servers started afresh and measured "
        "as without --runs"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one writer run")
    add_server_options(parser)
    parser.add_argument(
        "--pin",
        choices=["split", "none"],
        default="split",
        help="split (default): the gateways on core 0, mock and load generators on core 1; "
        "none: the kernel places them",
    )
    parser.add_argument(
        "--redis-cores",
        choices=["any", "gateway"],
        default="any",
        help="any (default): the kernel places a Redis on this machine; gateway: it runs on the "
        "gateways' core during the run (its affinity is given back after)",
    )
    parser.add_argument(
        "--commit",
        help="run the servers (and the usage writer) from src/ as of this commit (e.g. HEAD) "
        "instead of the working tree",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="measure this many times, each with servers started afresh, and judge the time "
        "goals on the median (default 1); the usage writer runs once, at the end",
    )
    parser.add_argument(
        "--quiet-budget-s",
        type=float,
        help="at most this long spent waiting out other processes' CPU bursts (default: 60, "
        "5 with --quick); the time limit grows by the difference",
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.quiet_budget_s is not None:
        extra = max(0, round(args.quiet_budget_s - plan.quiet_budget_s))
        plan = dataclasses.replace(
            plan, quiet_budget_s=args.quiet_budget_s, time_limit_s=plan.time_limit_s + extra
        )
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    limit_s = plan.time_limit_s * args.runs
    with _procs.bounded_run(limit_s, on_interrupt="servers stopped, database dropped") as workdir:
        run(plan, args, workdir)


if __name__ == "__main__":
    main()
