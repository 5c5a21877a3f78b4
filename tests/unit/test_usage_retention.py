"""UsagePurger: usage records past ``usage.retention_days`` go in batches, in the background.

The store's own purge runs against SQLite and PostgreSQL in tests/contract/test_store.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from headrace.accounting.retention import UsagePurger
from headrace.config import ConfigError, UsageConfig, load_settings
from headrace.store.memory import MemoryStore
from headrace.wiring import build_runtime
from tests.conftest import make_settings
from tests.contract.test_store import DAY_S, NOV_27, record

NOW = NOV_27 + 100 * DAY_S


class Counting(MemoryStore):
    """A memory store that counts its purges, or fails them (``down``)."""

    def __init__(self) -> None:
        super().__init__()
        self.purges: list[tuple[float, int]] = []
        self.down = False

    async def purge_usage(self, created_before: float, limit: int) -> int:
        self.purges.append((created_before, limit))
        if self.down:
            raise ConnectionError("the database is down")
        return await super().purge_usage(created_before, limit)


async def aged(store: MemoryStore, *days_old: float) -> None:
    """One record per age, ``days_old`` days before NOW."""
    await store.write_usage([record(f"r{i}", at=NOW - d * DAY_S) for i, d in enumerate(days_old)])


async def test_a_round_deletes_what_is_past_the_retention_in_batches() -> None:
    store = Counting()
    await aged(store, 95, 94, 93, 92, 91, 89, 1)
    report = await store.usage_summary(["day"])
    purger = UsagePurger(store, 90 * DAY_S, batch=2, clock=lambda: NOW)
    with capture_logs() as logs:
        assert await purger.purge() == 5
    assert [limit for _, limit in store.purges] == [2, 2, 2]  # full, full, short: done
    assert {before for before, _ in store.purges} == {NOW - 90 * DAY_S}
    assert await store.count_usage_records() == 2  # 89 days and 1 day old
    assert await store.usage_summary(["day"]) == report  # the aggregates stay
    [done] = [e for e in logs if e["event"] == "usage_purged"]
    assert done["records"] == 5
    assert await purger.purge() == 0


async def test_a_failed_round_is_logged_and_the_next_one_goes_on() -> None:
    store = Counting()
    await aged(store, 100, 99)
    store.down = True
    purger = UsagePurger(store, 90 * DAY_S, clock=lambda: NOW)
    with capture_logs() as logs:
        assert await purger.purge() == 0
    [failed] = [e for e in logs if e["event"] == "usage_purge_failed"]
    assert "database is down" in failed["error"]
    store.down = False
    assert await purger.purge() == 2


async def test_it_purges_after_start_and_every_period_until_stopped() -> None:
    store = Counting()
    await aged(store, 100)
    purger = UsagePurger(store, 90 * DAY_S, every_s=0.02, first_after_s=0.0, clock=lambda: NOW)
    await purger.start()
    for _ in range(200):
        if len(store.purges) >= 3:
            break
        await asyncio.sleep(0.01)
    await purger.stop()
    rounds = len(store.purges)
    assert rounds >= 3
    assert await store.count_usage_records() == 0
    await asyncio.sleep(0.05)
    assert len(store.purges) == rounds  # stopped


def test_a_retention_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        UsagePurger(MemoryStore(), 0)


def test_retention_days_is_zero_or_a_day_at_least_and_wires_a_purger(tmp_path: Path) -> None:
    config = tmp_path / "headrace.yaml"
    config.write_text("models: []\nusage: {retention_days: 0.5}\n")
    with pytest.raises(ConfigError, match=r"retention_days must be 0 \(keep forever\)"):
        load_settings(config)
    kept = build_runtime(make_settings(tmp_path), store=MemoryStore())
    assert not [s for s in kept.services if isinstance(s, UsagePurger)]
    settings = make_settings(tmp_path, usage=UsageConfig(retention_days=90))
    purged = build_runtime(settings, store=MemoryStore())
    assert [s for s in purged.services if isinstance(s, UsagePurger)]
