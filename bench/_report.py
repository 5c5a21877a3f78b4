"""Figures and their presentation: percentiles, Prometheus histograms, goals, the table.

Percentiles of raw samples use the nearest-rank method (the p99 of 3,000 samples is the
2,970th smallest). Quantiles of a Prometheus histogram interpolate linearly inside the
bucket that holds the rank, as ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(samples: Sequence[float], q: float) -> float:
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Dist:
    """p50/p95/p99 of a list of latencies, in milliseconds."""

    p50: float
    p95: float
    p99: float
    n: int

    @staticmethod
    def of(samples: Sequence[float]) -> Dist:
        return Dist(
            percentile(samples, 0.50),
            percentile(samples, 0.95),
            percentile(samples, 0.99),
            len(samples),
        )

    def at(self, q: str) -> float:
        value: float = getattr(self, q)
        return value


# --- Prometheus histogram --------------------------------------------------------------

_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def histogram(text: str, name: str, **labels: str) -> list[tuple[float, float]]:
    """The cumulative ``(upper bound, count)`` buckets of ``name`` whose labels match."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != f"{name}_bucket":
            continue
        found = dict(_LABEL.findall(match.group(2)))
        if all(found.get(k) == v for k, v in labels.items()):
            buckets.append((float(found["le"]), float(match.group(3))))
    return sorted(buckets)


def histogram_delta(
    after: list[tuple[float, float]], before: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile in the buckets' unit; ``inf`` when it falls in the ``+Inf`` bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    target = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= target:
            if math.isinf(upper):
                return math.inf
            share = (target - below) / (count - below) if count > below else 1.0
            return lower + (upper - lower) * share
        lower, below = upper, count
    return math.inf


# --- goals and the table ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Goal:
    """A figure and the most it may be (or, with ``at_least``, the least)."""

    name: str
    value: float
    limit: float
    unit: str
    at_least: bool = False
    digits: int = 2

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    @property
    def target(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.limit:g} {self.unit}"


def fmt(value: float, digits: int = 2, *, sign: bool = False) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "overflow"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


@dataclass(slots=True)
class Table:
    """Rows of text cells under a header; numbers right-aligned, the first column left."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: str) -> None:
        self.rows.append([*cells, *[""] * (len(self.header) - len(cells))])

    def render(self) -> str:
        widths = [
            max(len(r[i]) for r in [self.header, *self.rows]) for i in range(len(self.header))
        ]
        lines = [self.title, "-" * len(self.title)]
        for row in [self.header, *self.rows]:
            cells = [
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def goals_table(goals: Sequence[Goal]) -> Table:
    table = Table("Goals", ["goal", "measured", "target", "verdict"])
    for goal in goals:
        table.add(
            goal.name, f"{fmt(goal.value, goal.digits)} {goal.unit}", goal.target, goal.verdict
        )
    return table
