"""The store seams: keys, teams and usage. Secrets are never stored, only their SHA-256.

One SQL implementation (:mod:`headrace.store.sql`: SQLite embedded, PostgreSQL in production,
schema by Alembic) and one in-memory implementation (:mod:`headrace.store.memory`: the test
fake) implement all three Protocols; the contract tests run one suite against each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from headrace.domain import ApiKey, Feedback, Team, UsageRecord

GroupBy = Literal["key", "team", "model", "day"]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Usage summed over one group (the ``group`` fields not grouped by are None)."""

    day: str | None  # "YYYY-MM-DD" (UTC)
    key_id: str | None
    team_id: str | None
    model: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_micro_usd: int
    baseline_cost_micro_usd: int
    cache_hits: int
    errors: int


class KeyStore(Protocol):
    async def start(self) -> None:
        """Open connections; bring the schema up to date (embedded) or check it is (production)."""
        ...

    async def get_by_hash(self, secret_hash: str) -> ApiKey | None:
        """The key whose secret hashes to ``secret_hash`` (revoked ones included), or None."""
        ...

    async def get_key(self, key_id: str) -> ApiKey | None: ...

    async def put(self, key: ApiKey) -> None:
        """Insert ``key`` or replace the stored key with the same id."""
        ...

    async def list_keys(self, team_id: str | None = None) -> Sequence[ApiKey]:
        """Every key (of ``team_id`` when given), oldest first."""
        ...

    async def revoke(self, key_id: str) -> bool:
        """Mark the key revoked; False when no such key exists."""
        ...

    async def check(self) -> None:
        """Raise if the store cannot be reached (used by ``/health/ready``)."""
        ...

    async def aclose(self) -> None: ...


class TeamStore(Protocol):
    async def get_team(self, team_id: str) -> Team | None: ...

    async def put_team(self, team: Team) -> None:
        """Insert ``team`` or replace the stored team with the same id."""
        ...

    async def list_teams(self) -> Sequence[Team]:
        """Every team, oldest first."""
        ...

    async def delete_team(self, team_id: str) -> bool:
        """Delete a team that owns no keys; False when no such team exists.

        Raises ``ValueError`` while keys still belong to it.
        """
        ...


class UsageStore(Protocol):
    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        """Insert the records whose ids are new, in one transaction; return how many were new.

        Idempotent by ``UsageRecord.id``: writing a record twice stores it once, and the
        per-day aggregates count only the newly inserted records (exactly once on replay).
        """
        ...

    async def usage_summary(
        self,
        group_by: Sequence[GroupBy],
        *,
        since_day: str | None = None,  # "YYYY-MM-DD", inclusive
        until_day: str | None = None,  # inclusive
        team_id: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
    ) -> Sequence[UsageRow]:
        """Sums from the per-day aggregates, one row per group, ordered by the group fields."""
        ...

    async def spend_since(self, *, key_id: str | None, team_id: str | None, since: float) -> int:
        """Micro-dollars spent by the key (or else the team) on days starting at ``since``.

        ``since`` is a UTC day boundary (budget periods start on one).
        """
        ...

    async def count_usage_records(self) -> int:
        """How many records are stored (tests and the replay check use it)."""
        ...

    async def purge_usage(self, created_before: float, limit: int) -> int:
        """Delete at most ``limit`` records created before ``created_before`` (Unix time),
        oldest first, in one transaction; how many. The per-day aggregates stay: reports and
        budgets read only those. Processes purging at once skip each other's rows."""
        ...


class FeedbackStore(Protocol):
    async def request_recorded(
        self, request_id: str, *, team_id: str | None = None, key_id: str | None = None
    ) -> bool:
        """Whether a usage record of ``request_id`` is stored (of ``team_id`` and of
        ``key_id``, those given). Request ids may repeat across teams: a client may send its
        own ``X-Request-Id``."""
        ...

    async def add_feedback(self, feedback: Feedback) -> None:
        """Store ``feedback`` (its id is new)."""
        ...

    async def list_feedback(
        self,
        *,
        team_id: str | None = None,
        key_id: str | None = None,
        request_id: str | None = None,
        limit: int = 100,
    ) -> Sequence[Feedback]:
        """Feedback matching every filter given, newest first, at most ``limit``."""
        ...


class Store(KeyStore, TeamStore, UsageStore, FeedbackStore, Protocol):
    """Everything durable the gateway keeps; one backend implements all of it."""
