"""The Store contract (keys, teams, usage) against every backend: memory, SQLite, PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from headrace.domain import (
    NO_QUOTA,
    ApiKey,
    BudgetPeriod,
    Feedback,
    Quota,
    Role,
    Team,
    UsageRecord,
)
from headrace.gateway.auth import hash_secret, new_key, new_secret
from headrace.store.base import Store, UsageRow
from headrace.store.memory import MemoryStore
from headrace.store.sql import SqlStore

NOV_27 = datetime(2026, 11, 27, tzinfo=UTC).timestamp()  # a Friday, 00:00 UTC
DAY_S = 86_400.0

QUOTA = Quota(
    rpm=60,
    tpm=100_000,
    max_parallel=4,
    budget_micro_usd=25_000_000_000,  # beyond 32 bits on purpose
    budget_period=BudgetPeriod.WEEK,
    soft_budget_ratio=0.8,
)


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "memory":
        backend = MemoryStore()
    elif request.param == "sqlite":
        backend = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    else:
        backend = SqlStore(request.getfixturevalue("fresh_database_url"))
    await backend.start()
    yield backend
    await backend.aclose()


def key(name: str, *, created_at: float, team_id: str | None = None, **fields: object) -> ApiKey:
    made = new_key(new_secret(), role=Role.USER, name=name, key_id=f"key_{name}", team_id=team_id)
    return dataclasses.replace(made, created_at=created_at, **fields)  # type: ignore[arg-type]


def team(team_id: str, *, created_at: float, **fields: object) -> Team:
    return Team(id=team_id, name=f"Team {team_id}", created_at=created_at, **fields)  # type: ignore[arg-type]


def record(
    record_id: str,
    *,
    at: float = NOV_27 + 3600,
    key_id: str = "k1",
    team_id: str | None = "t1",
    model: str = "gpt-a",
    cost: int = 100,
    status: int = 200,
    cache_hit: bool = False,
) -> UsageRecord:
    return UsageRecord(
        id=record_id,
        request_id=f"req-{record_id}",
        created_at=at,
        operation="chat",
        key_id=key_id,
        team_id=team_id,
        model=model,
        requested_model=model,
        deployment=f"{model}/0",
        prompt_tokens=10,
        completion_tokens=5,
        cached_tokens=2,
        cost_micro_usd=cost,
        baseline_cost_micro_usd=cost * 2,
        latency_ms=12.5,
        status=status,
        error=None if status < 400 else "UpstreamError",
        cache_hit=cache_hit,
    )


def row(
    requests: int,
    cost: int,
    *,
    day: str | None = None,
    key_id: str | None = None,
    team_id: str | None = None,
    model: str | None = None,
    cache_hits: int = 0,
    errors: int = 0,
) -> UsageRow:
    """The summary row for ``requests`` records made by :func:`record` costing ``cost`` in all."""
    return UsageRow(
        day=day,
        key_id=key_id,
        team_id=team_id,
        model=model,
        requests=requests,
        prompt_tokens=10 * requests,
        completion_tokens=5 * requests,
        cached_tokens=2 * requests,
        cost_micro_usd=cost,
        baseline_cost_micro_usd=2 * cost,
        cache_hits=cache_hits,
        errors=errors,
    )


# -- keys -------------------------------------------------------------------------------------


async def test_a_key_round_trips_with_every_field(store: Store) -> None:
    secret = new_secret()
    stored = new_key(
        secret,
        role=Role.USER,
        name="ci",
        team_id="t1",
        user="ada@example.com",
        allowed_models=frozenset({"gpt-*", "claude"}),
        quota=QUOTA,
        expires_at=NOV_27 + 30 * DAY_S,
        metadata={"priority": "high", "tier": "gold"},
    )
    await store.put(stored)
    assert await store.get_by_hash(hash_secret(secret)) == stored
    assert await store.get_key(stored.id) == stored
    assert await store.get_key("key_missing") is None
    assert await store.get_by_hash(hash_secret("hr_other")) is None


async def test_put_replaces_a_key_by_id(store: Store) -> None:
    first = key("a", created_at=NOV_27, quota=QUOTA, user="ada", expires_at=NOV_27 + 1)
    second = dataclasses.replace(
        first, name="b", role=Role.ADMIN, quota=NO_QUOTA, user=None, expires_at=None
    )
    await store.put(first)
    await store.put(second)
    assert await store.list_keys() == [second]


async def test_keys_list_oldest_first_and_by_team(store: Store) -> None:
    keys = [
        key("k0", created_at=NOV_27 + 2, team_id="t1"),
        key("k1", created_at=NOV_27 + 1, team_id="t2"),
        key("k2", created_at=NOV_27 + 3, team_id="t1"),
        key("k3", created_at=NOV_27 + 0),
    ]
    for each in keys:
        await store.put(each)
    assert [k.id for k in await store.list_keys()] == ["key_k3", "key_k1", "key_k0", "key_k2"]
    assert [k.id for k in await store.list_keys("t1")] == ["key_k0", "key_k2"]
    assert [k.id for k in await store.list_keys(team_id="t2")] == ["key_k1"]
    assert await store.list_keys("t-none") == []


async def test_revoke_marks_the_key_and_reports_unknown_ids(store: Store) -> None:
    stored = key("a", created_at=NOV_27, quota=QUOTA)
    await store.put(stored)
    assert await store.revoke(stored.id) is True
    assert await store.revoke("key_missing") is False
    assert await store.get_key(stored.id) == dataclasses.replace(stored, revoked=True)


# -- teams ------------------------------------------------------------------------------------


async def test_a_team_round_trips_and_put_replaces_it(store: Store) -> None:
    stored = team("t1", created_at=NOV_27, organization="acme", quota=QUOTA, metadata={"a": "b"})
    await store.put_team(stored)
    assert await store.get_team("t1") == stored
    assert await store.get_team("t-missing") is None
    renamed = dataclasses.replace(stored, name="Renamed", quota=NO_QUOTA, metadata={})
    await store.put_team(renamed)
    assert await store.list_teams() == [renamed]


async def test_teams_list_oldest_first(store: Store) -> None:
    for team_id, offset in [("t1", 2), ("t2", 0), ("t3", 1)]:
        await store.put_team(team(team_id, created_at=NOV_27 + offset))
    assert [t.id for t in await store.list_teams()] == ["t2", "t3", "t1"]


async def test_a_team_with_keys_cannot_be_deleted(store: Store) -> None:
    await store.put_team(team("t1", created_at=NOV_27))
    owned = key("a", created_at=NOV_27, team_id="t1")
    await store.put(owned)
    await store.revoke(owned.id)  # revoked keys still belong to the team
    with pytest.raises(ValueError, match="still owns 1 key"):
        await store.delete_team("t1")
    assert await store.get_team("t1") is not None

    await store.put(dataclasses.replace(owned, team_id=None))
    assert await store.delete_team("t1") is True
    assert await store.get_team("t1") is None
    assert await store.delete_team("t1") is False


# -- usage ------------------------------------------------------------------------------------


async def test_write_usage_is_idempotent_by_record_id(store: Store) -> None:
    batch = [record("u1", cost=100), record("u2", cost=200), record("u3", cost=300)]
    assert await store.write_usage(batch) == 3
    assert await store.write_usage(batch) == 0  # a replay
    assert await store.write_usage([]) == 0
    overlapping = [record("u3", cost=300), record("u4", cost=400), record("u4", cost=400)]
    assert await store.write_usage(overlapping) == 1
    assert await store.count_usage_records() == 4
    assert await store.usage_summary([]) == [row(4, 1000)]
    spent = await store.spend_since(key_id="k1", team_id=None, since=NOV_27)
    assert spent == 1000


async def test_a_large_batch_is_written_once_whatever_its_size(store: Store) -> None:
    # 1,500 distinct ids (beyond what one SQLite statement carries), each of 100 of them twice.
    batch = [record(f"u{n:04d}", cost=1) for n in range(1500)]
    batch += [record(f"u{n:04d}", cost=1) for n in range(0, 1500, 15)]
    assert await store.write_usage(batch) == 1500
    assert await store.write_usage(batch[700:1300]) == 0  # a replay of part of it
    more = [record(f"u{n:04d}", cost=1) for n in range(1400, 1637)]  # 137 of them new
    assert await store.write_usage(more) == 137
    assert await store.count_usage_records() == 1637
    assert await store.usage_summary([]) == [row(1637, 1637)]


async def test_summary_counts_errors_and_cache_hits(store: Store) -> None:
    await store.write_usage(
        [
            record("u1", status=200, cache_hit=True),
            record("u2", status=399),
            record("u3", status=400),
            record("u4", status=503, cache_hit=True),
        ]
    )
    assert await store.usage_summary([]) == [row(4, 400, cache_hits=2, errors=2)]


@pytest.fixture
async def usage(store: Store) -> Store:
    """Two days of usage by two keys in two teams (one key without a team), two models."""
    day2 = NOV_27 + DAY_S
    await store.write_usage(
        [
            record("a", at=NOV_27 + 10, key_id="k1", team_id="t1", model="gpt-a", cost=1),
            record("b", at=NOV_27 + 20, key_id="k1", team_id="t1", model="gpt-b", cost=2),
            record("c", at=NOV_27 + 30, key_id="k2", team_id="t2", model="gpt-a", cost=4),
            record("d", at=day2 - 1, key_id="k3", team_id=None, model="gpt-a", cost=8),
            record("e", at=day2, key_id="k1", team_id="t1", model="gpt-a", cost=16),
            record("f", at=day2 + 50, key_id="k2", team_id="t2", model="gpt-b", cost=32),
        ]
    )
    return store


async def test_summary_by_each_group(usage: Store) -> None:
    assert await usage.usage_summary(["day"]) == [
        row(4, 15, day="2026-11-27"),
        row(2, 48, day="2026-11-28"),
    ]
    assert await usage.usage_summary(["key"]) == [
        row(3, 19, key_id="k1"),
        row(2, 36, key_id="k2"),
        row(1, 8, key_id="k3"),
    ]
    assert await usage.usage_summary(["team"]) == [
        row(1, 8, team_id=None),  # no team sorts first
        row(3, 19, team_id="t1"),
        row(2, 36, team_id="t2"),
    ]
    assert await usage.usage_summary(["model"]) == [
        row(4, 29, model="gpt-a"),
        row(2, 34, model="gpt-b"),
    ]


async def test_summary_by_several_groups_is_ordered_by_them(usage: Store) -> None:
    assert await usage.usage_summary(["model", "day"]) == [
        row(3, 13, model="gpt-a", day="2026-11-27"),
        row(1, 16, model="gpt-a", day="2026-11-28"),
        row(1, 2, model="gpt-b", day="2026-11-27"),
        row(1, 32, model="gpt-b", day="2026-11-28"),
    ]
    assert await usage.usage_summary(["team", "key", "team"]) == [
        row(1, 8, team_id=None, key_id="k3"),
        row(3, 19, team_id="t1", key_id="k1"),
        row(2, 36, team_id="t2", key_id="k2"),
    ]


async def test_summary_filters(usage: Store) -> None:
    assert await usage.usage_summary(["day"], since_day="2026-11-28") == [
        row(2, 48, day="2026-11-28")
    ]
    assert await usage.usage_summary(["day"], until_day="2026-11-27") == [
        row(4, 15, day="2026-11-27")
    ]
    assert await usage.usage_summary(
        ["model"], since_day="2026-11-27", until_day="2026-11-27", team_id="t1"
    ) == [row(1, 1, model="gpt-a"), row(1, 2, model="gpt-b")]
    assert await usage.usage_summary(["day"], key_id="k2", model="gpt-b") == [
        row(1, 32, day="2026-11-28")
    ]
    assert await usage.usage_summary([], team_id="t2") == [row(2, 36)]
    assert await usage.usage_summary(["key"], since_day="2026-12-01") == []
    assert await usage.usage_summary([], model="gpt-z") == []


async def test_spend_since_counts_whole_utc_days_from_since(usage: Store) -> None:
    day2 = NOV_27 + DAY_S
    assert await usage.spend_since(key_id="k1", team_id=None, since=NOV_27) == 19
    assert await usage.spend_since(key_id="k1", team_id=None, since=day2) == 16
    assert await usage.spend_since(key_id=None, team_id="t2", since=NOV_27) == 36
    assert await usage.spend_since(key_id=None, team_id="t2", since=day2) == 32
    # The key wins over the team when both are given.
    assert await usage.spend_since(key_id="k1", team_id="t2", since=NOV_27) == 19
    assert await usage.spend_since(key_id=None, team_id=None, since=0.0) == 63
    assert await usage.spend_since(key_id="k9", team_id=None, since=0.0) == 0
    assert await usage.spend_since(key_id="k1", team_id=None, since=day2 + DAY_S) == 0


async def test_count_usage_records(usage: Store) -> None:
    assert await usage.count_usage_records() == 6


async def test_purge_usage_deletes_the_oldest_records_and_keeps_the_aggregates(
    usage: Store,
) -> None:
    day2 = NOV_27 + DAY_S
    by_day = await usage.usage_summary(["day"])
    assert await usage.purge_usage(NOV_27 + 25, 100) == 2  # "a" and "b"
    assert await usage.count_usage_records() == 4
    # "c" and "d" are older than day 2 too; at most one at a time here.
    assert await usage.purge_usage(day2, 1) == 1
    assert await usage.purge_usage(day2, 1) == 1
    assert await usage.purge_usage(day2, 1) == 0
    assert await usage.count_usage_records() == 2  # "e" (at day 2 exactly) and "f"
    assert await usage.usage_summary(["day"]) == by_day  # reports read the aggregates
    assert await usage.spend_since(key_id=None, team_id=None, since=0.0) == 63


async def test_a_purged_record_written_again_is_stored_again(store: Store) -> None:
    # What usage.retention_days of a day at least guards against: the record's id is
    # forgotten with it, so a replay from an old spool file would count it twice.
    await store.write_usage([record("old", at=NOV_27)])
    assert await store.purge_usage(NOV_27 + 1, 100) == 1
    assert await store.write_usage([record("old", at=NOV_27)]) == 1


async def test_request_recorded_looks_within_a_team_or_a_key(usage: Store) -> None:
    # Record "a" is request "req-a" of key k1 in team t1; "d" is key k3's, without a team.
    assert await usage.request_recorded("req-a")
    assert await usage.request_recorded("req-a", team_id="t1")
    assert not await usage.request_recorded("req-a", team_id="t2")
    assert await usage.request_recorded("req-d", key_id="k3")
    assert not await usage.request_recorded("req-d", key_id="k1")
    assert not await usage.request_recorded("req-zzz")
    # A client's own X-Request-Id may repeat in another team: each team finds its own.
    await usage.write_usage([record("twin", key_id="k2", team_id="t2")])
    twin = record("twin2", key_id="k2", team_id="t2")._replace(request_id="req-a")
    await usage.write_usage([twin])
    assert await usage.request_recorded("req-a", team_id="t2")


def feedback(feedback_id: str, at: float, **fields: Any) -> Feedback:
    values: dict[str, Any] = {"request_id": "req-a", "key_id": "k1", "team_id": "t1"}
    values.update(fields)
    return Feedback(id=feedback_id, created_at=at, **values)


async def test_feedback_is_listed_newest_first_by_every_filter(store: Store) -> None:
    given = [
        feedback("f1", NOV_27, score=1.0, metadata={"ui": "web"}),
        feedback("f2", NOV_27 + 1, key_id="k2", label="wrong", comment="no such paper"),
        feedback("f3", NOV_27 + 2, request_id="req-b", score=-0.25),
        feedback("f4", NOV_27 + 3, key_id="k3", team_id=None, score=0.0),
    ]
    for item in given:
        await store.add_feedback(item)
    assert await store.list_feedback() == given[::-1]
    assert [f.id for f in await store.list_feedback(team_id="t1")] == ["f3", "f2", "f1"]
    assert [f.id for f in await store.list_feedback(key_id="k3")] == ["f4"]
    assert [f.id for f in await store.list_feedback(request_id="req-a")] == ["f4", "f2", "f1"]
    assert [f.id for f in await store.list_feedback(team_id="t1", key_id="k2")] == ["f2"]
    assert [f.id for f in await store.list_feedback(team_id="t1", limit=2)] == ["f3", "f2"]
    assert await store.list_feedback(team_id="t9") == []
