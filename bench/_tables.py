"""The tables of the mock-upstream sections, and the goals they judge.

Each builder appends the :class:`~_report.Goal` values it judges to ``goals`` (pass a
throwaway list for an informational table) and returns the :class:`~_report.Table` to print.
"""

from __future__ import annotations

from dataclasses import dataclass

from _phases import Phase, Saturation
from _report import Goal, Table, fmt

OVERHEAD_LIMITS_MS = {"p50": 1.0, "p99": 3.0}
CPU_LIMIT_MS = 1.0
TTFT_LIMIT_MS = 1.0


@dataclass(frozen=True, slots=True)
class LatencyCase:
    """Non-streamed chat at one upstream latency: both sides' saturation and fixed-rate runs."""

    latency_ms: int
    connections: int
    rate: float
    saturation: dict[str, Saturation]
    fixed: dict[str, Phase]


def latency_table(case: LatencyCase, goals: list[Goal], title: str = "") -> Table:
    direct, through = case.fixed["direct"], case.fixed["gateway"]
    table = Table(
        title or f"Upstream latency {case.latency_ms} ms - non-streamed chat",
        ["figure", "direct", "gateway", "gateway-direct", "goal", "verdict"],
    )
    sat_d, sat_g = case.saturation["direct"], case.saturation["gateway"]
    table.add(
        f"requests/s at saturation ({case.connections} connections)",
        fmt(sat_d.requests_per_s, 0),
        fmt(sat_g.requests_per_s, 0),
    )
    for q in ("p50", "p95", "p99"):
        d, g = direct.latency.at(q), through.latency.at(q)
        row = [f"latency {q} at {case.rate:g} req/s (ms)", fmt(d), fmt(g), fmt(g - d, sign=True)]
        if q in OVERHEAD_LIMITS_MS:
            goal = Goal(
                f"overhead {q}, upstream {case.latency_ms} ms", g - d, OVERHEAD_LIMITS_MS[q], "ms"
            )
            goals.append(goal)
            row += [goal.target, goal.verdict]
        table.add(*row)
    cpu = through.cpu_ms_per_request("gateway")
    goal = Goal(f"gateway CPU/request, upstream {case.latency_ms} ms", cpu, CPU_LIMIT_MS, "ms")
    goals.append(goal)
    table.add("gateway CPU per request (ms)", "", fmt(cpu, 3), "", goal.target, goal.verdict)
    p50, p99 = through.overhead_ms
    table.add("gateway self-reported overhead p50/p99 (ms)", "", f"{fmt(p50)}/{fmt(p99)}")
    table.add("gateway RSS after the run (MiB)", "", fmt(through.gateway_rss_mib, 1))
    table.add(
        "mock CPU per request (ms)",
        fmt(direct.cpu_ms_per_request("mock"), 3),
        fmt(through.cpu_ms_per_request("mock"), 3),
    )
    table.add(
        "load generator CPU per request (ms)",
        fmt(direct.loadgen_ms_per_request, 3),
        fmt(through.loadgen_ms_per_request, 3),
    )
    table.add(
        "load generator send lag p99 (ms)", fmt(direct.send_lag.p99), fmt(through.send_lag.p99)
    )
    table.add(
        "other processes' CPU (% of a core)",
        fmt(100 * direct.other_core_share, 0),
        fmt(100 * through.other_core_share, 0),
    )
    table.add("blocks measured again (disturbed)", str(direct.repeated), str(through.repeated))
    table.add(
        "requests ok/errors; reached the mock",
        f"{direct.ok}/{direct.errors}; {direct.mock_requests}",
        f"{through.ok}/{through.errors}; {through.mock_requests}",
    )
    table.notes.append(
        f"saturation ({sat_g.tool}), direct / gateway: load generator "
        f"{100 * sat_d.loadgen_core_share:.0f}% / {100 * sat_g.loadgen_core_share:.0f}% "
        f"of a core, other processes {100 * sat_d.other_core_share:.0f}% / "
        f"{100 * sat_g.other_core_share:.0f}%, errors {sat_d.errors} / {sat_g.errors}, "
        f"blocks measured again {sat_d.repeated} / {sat_g.repeated}"
    )
    for label, phase in case.fixed.items():
        if phase.errors:
            table.notes.append(f"{label} errors: {'; '.join(phase.error_samples)}")
    return table


def stream_table(
    results: dict[int, dict[str, Phase]], rate: float, count: int, goals: list[Goal]
) -> Table:
    """``results`` maps the mock's ``ttft_ms`` to each side's streamed phase."""
    table = Table(
        f"Streaming time to first token - {rate:g} req/s open loop, {count} requests per side",
        ["mock ttft", "direct p50/p99", "gateway p50/p99", "overhead p50/p99", "goal", "verdict"],
    )
    for ttft_ms, phases in results.items():
        direct, through = phases["direct"], phases["gateway"]
        d, g = direct.ttft, through.ttft
        goal = Goal(
            f"streaming TTFT overhead p50, mock ttft {ttft_ms} ms",
            g.p50 - d.p50,
            TTFT_LIMIT_MS,
            "ms",
        )
        goals.append(goal)
        table.add(
            f"{ttft_ms} ms",
            f"{fmt(d.p50)}/{fmt(d.p99)}",
            f"{fmt(g.p50)}/{fmt(g.p99)}",
            f"{fmt(g.p50 - d.p50, sign=True)}/{fmt(g.p99 - d.p99, sign=True)}",
            goal.target,
            goal.verdict,
        )
        table.notes.append(
            f"ttft {ttft_ms} ms, direct / gateway: failed streams {direct.errors} / "
            f"{through.errors}, gateway CPU per stream {through.cpu_ms_per_request('gateway'):.3f}"
            f" ms, other processes {100 * direct.other_core_share:.0f}% / "
            f"{100 * through.other_core_share:.0f}% of a core, blocks measured again "
            f"{direct.repeated} / {through.repeated}"
        )
    table.notes.append("times in ms, from the scheduled send to the first body bytes (SSE event)")
    return table
