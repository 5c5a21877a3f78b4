"""The in-memory store: the test fake, and the store when persistence is switched off.

Same contract as :class:`headrace.store.sql.SqlStore`, down to the per-day aggregates that
usage summaries and budgets read (see :mod:`headrace.store.aggregates`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from headrace.domain import ApiKey, Feedback, Team, UsageRecord
from headrace.store.aggregates import NO_TEAM, DailyKey, DailyTotals, aggregate, utc_day
from headrace.store.base import GroupBy, UsageRow

_FIELD = {"day": 0, "key": 1, "team": 2, "model": 3}  # GroupBy -> position in a DailyKey


class MemoryStore:
    def __init__(self) -> None:
        self._keys: dict[str, ApiKey] = {}
        self._teams: dict[str, Team] = {}
        self._records: dict[str, UsageRecord] = {}
        self._daily: dict[DailyKey, DailyTotals] = {}
        self._feedback: list[Feedback] = []

    async def start(self) -> None:
        return None

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # -- keys -------------------------------------------------------------------------------

    async def get_by_hash(self, secret_hash: str) -> ApiKey | None:
        return next((k for k in self._keys.values() if k.secret_hash == secret_hash), None)

    async def get_key(self, key_id: str) -> ApiKey | None:
        return self._keys.get(key_id)

    async def put(self, key: ApiKey) -> None:
        self._keys[key.id] = key

    async def list_keys(self, team_id: str | None = None) -> Sequence[ApiKey]:
        keys = [k for k in self._keys.values() if team_id is None or k.team_id == team_id]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def revoke(self, key_id: str) -> bool:
        key = self._keys.get(key_id)
        if key is None:
            return False
        self._keys[key_id] = dataclasses.replace(key, revoked=True)
        return True

    # -- teams ------------------------------------------------------------------------------

    async def get_team(self, team_id: str) -> Team | None:
        return self._teams.get(team_id)

    async def put_team(self, team: Team) -> None:
        self._teams[team.id] = team

    async def list_teams(self) -> Sequence[Team]:
        return sorted(self._teams.values(), key=lambda t: (t.created_at, t.id))

    async def delete_team(self, team_id: str) -> bool:
        if team_id not in self._teams:
            return False
        owned = sum(1 for k in self._keys.values() if k.team_id == team_id)
        if owned:
            raise ValueError(
                f"team {team_id!r} still owns {owned} key(s): move or delete them first"
            )
        del self._teams[team_id]
        return True

    # -- usage ------------------------------------------------------------------------------

    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        new: list[UsageRecord] = []
        for record in records:
            if record.id not in self._records:
                self._records[record.id] = record
                new.append(record)
        for key, totals in aggregate(new).items():
            self._daily.setdefault(key, DailyTotals()).merge(totals)
        return len(new)

    async def usage_summary(
        self,
        group_by: Sequence[GroupBy],
        *,
        since_day: str | None = None,
        until_day: str | None = None,
        team_id: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
    ) -> Sequence[UsageRow]:
        fields = list(dict.fromkeys(group_by))
        groups: dict[tuple[str, ...], DailyTotals] = {}
        for daily_key, totals in self._daily.items():
            day, key, team, name = daily_key
            if (
                (since_day is not None and day < since_day)
                or (until_day is not None and day > until_day)
                or (team_id is not None and team != team_id)
                or (key_id is not None and key != key_id)
                or (model is not None and name != model)
            ):
                continue
            group = tuple(daily_key[_FIELD[f]] for f in fields)
            groups.setdefault(group, DailyTotals()).merge(totals)
        rows = []
        for group, totals in sorted(groups.items()):
            named: dict[str, str | None] = dict(zip(fields, group, strict=True))
            grouped_team = named.get("team")
            rows.append(
                UsageRow(
                    day=named.get("day"),
                    key_id=named.get("key"),
                    team_id=None if grouped_team == NO_TEAM else grouped_team,
                    model=named.get("model"),
                    **dataclasses.asdict(totals),
                )
            )
        return rows

    async def spend_since(self, *, key_id: str | None, team_id: str | None, since: float) -> int:
        first_day = utc_day(since)
        return sum(
            totals.cost_micro_usd
            for (day, key, team, _), totals in self._daily.items()
            if day >= first_day
            and (key == key_id if key_id is not None else team_id is None or team == team_id)
        )

    async def count_usage_records(self) -> int:
        return len(self._records)

    async def purge_usage(self, created_before: float, limit: int) -> int:
        old = sorted(
            (r for r in self._records.values() if r.created_at < created_before),
            key=lambda r: r.created_at,
        )[:limit]
        for record in old:
            del self._records[record.id]
        return len(old)

    async def request_recorded(
        self, request_id: str, *, team_id: str | None = None, key_id: str | None = None
    ) -> bool:
        return any(
            r.request_id == request_id
            and (team_id is None or r.team_id == team_id)
            and (key_id is None or r.key_id == key_id)
            for r in self._records.values()
        )

    async def add_feedback(self, feedback: Feedback) -> None:
        self._feedback.append(feedback)

    async def list_feedback(
        self,
        *,
        team_id: str | None = None,
        key_id: str | None = None,
        request_id: str | None = None,
        limit: int = 100,
    ) -> Sequence[Feedback]:
        found = [
            f
            for f in self._feedback
            if (team_id is None or f.team_id == team_id)
            and (key_id is None or f.key_id == key_id)
            and (request_id is None or f.request_id == request_id)
        ]
        found.sort(key=lambda f: (f.created_at, f.id), reverse=True)
        return found[:limit]
