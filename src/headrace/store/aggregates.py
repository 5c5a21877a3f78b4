"""Per-day usage aggregates: how both backends fold usage records into ``usage_daily`` rows.

One function for both, so the in-memory fake and the SQL store count exactly alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from headrace.domain import UsageRecord

NO_TEAM = ""  # the team of a key without one, in the aggregate key
MODEL_MAX_CHARS = 255  # longer model names are cut in the aggregates (they are keys)
_DAY_S = 86_400

DailyKey = tuple[str, str, str, str]  # (day "YYYY-MM-DD" UTC, key_id, team_id or '', model)


def utc_day(unix_time: float) -> str:
    """The UTC calendar day holding ``unix_time``, as ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(unix_time))


@dataclass(slots=True)
class DailyTotals:
    """Sums for one aggregate row (a local accumulator; never shared)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_micro_usd: int = 0
    baseline_cost_micro_usd: int = 0
    cache_hits: int = 0
    errors: int = 0

    def add(self, record: UsageRecord) -> None:
        self.requests += 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.cached_tokens += record.cached_tokens
        self.cost_micro_usd += record.cost_micro_usd
        self.baseline_cost_micro_usd += record.baseline_cost_micro_usd
        self.cache_hits += record.cache_hit
        self.errors += record.status >= 400

    def merge(self, other: DailyTotals) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cost_micro_usd += other.cost_micro_usd
        self.baseline_cost_micro_usd += other.baseline_cost_micro_usd
        self.cache_hits += other.cache_hits
        self.errors += other.errors


def aggregate(records: Iterable[UsageRecord]) -> dict[DailyKey, DailyTotals]:
    """Totals per (day, key, team, model); an error is a record with status >= 400."""
    totals: dict[DailyKey, DailyTotals] = {}
    # A batch's records almost all fall on one UTC day: format each day once, not each
    # record's (``gmtime`` floors to whole seconds, so ``t // 86400`` names the same day).
    days: dict[float, str] = {}
    for record in records:
        day = days.get(record.created_at // _DAY_S)
        if day is None:
            day = days[record.created_at // _DAY_S] = utc_day(record.created_at)
        key = (day, record.key_id, record.team_id or NO_TEAM, record.model[:MODEL_MAX_CHARS])
        row = totals.get(key)
        if row is None:
            row = totals[key] = DailyTotals()
        row.add(record)
    return totals
