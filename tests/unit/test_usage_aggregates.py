"""aggregate(): one row per (UTC day, key, team, model), with each day formatted once a batch."""

from __future__ import annotations

from headrace.store.aggregates import aggregate
from tests.contract.test_store import NOV_27, record


def test_records_either_side_of_midnight_fall_on_their_own_days() -> None:
    batch = [
        record("a", at=NOV_27 - 0.000_001),  # the last microsecond of Nov 26
        record("b", at=NOV_27),
        record("c", at=NOV_27 + 86_399.999_999),  # the last microsecond of Nov 27
        record("d", at=NOV_27 + 86_400),
        record("e", at=NOV_27 + 3600, status=500),
    ]
    totals = aggregate(batch)
    assert {day: row.requests for (day, _, _, _), row in totals.items()} == {
        "2026-11-26": 1,
        "2026-11-27": 3,
        "2026-11-28": 1,
    }
    assert totals[("2026-11-27", "k1", "t1", "gpt-a")].errors == 1


def test_a_key_without_a_team_and_a_long_model_name() -> None:
    totals = aggregate([record("a", team_id=None, model="m" * 300)])
    assert list(totals) == [("2026-11-27", "k1", "", "m" * 255)]
