"""QuotaGuard over the in-memory limiter: key and team limits, budgets, settle, alerts."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from headrace.domain import NO_QUOTA, BudgetPeriod, Call, Principal, Quota, Role, UsageRecord
from headrace.errors import BudgetExceededError, RateLimitExceededError
from headrace.gateway.quota import BudgetAlert, Estimate, QuotaGuard
from headrace.limits.base import Settlement
from headrace.limits.memory import MemoryLimiter
from headrace.store.memory import MemoryStore


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


NOV_27 = datetime(2026, 11, 27, 12, tzinfo=UTC).timestamp()


def principal(
    quota: Quota = NO_QUOTA, team: Quota = NO_QUOTA, team_id: str | None = "t1"
) -> Principal:
    return Principal(key_id="k1", role=Role.USER, team_id=team_id, quota=quota, team_quota=team)


def call(p: Principal, n: int = 0) -> Call:
    return Call(request_id=f"req-{n}", principal=p)


def guard(clock: Clock, store: MemoryStore | None = None, **kwargs: object) -> QuotaGuard:
    limiter = MemoryLimiter(clock=clock)
    return QuotaGuard(limiter, store, clock=clock, **kwargs)  # type: ignore[arg-type]


async def test_no_quota_means_no_reservation() -> None:
    g = guard(Clock(NOV_27))
    assert await g.reserve(call(principal()), Estimate(10, 10)) is None


async def test_rpm_refuses_with_retry_after_and_ratelimit_headers() -> None:
    g = guard(Clock(NOV_27))
    p = principal(Quota(rpm=2))
    for n in range(2):
        c = call(p, n)
        assert await g.reserve(c, Estimate(0, 0)) is not None
    assert c.quota_headers is not None
    assert c.quota_headers["ratelimit-policy"] == '"key-rpm";q=2;w=60'
    assert c.quota_headers["ratelimit"].startswith('"key-rpm";r=0;')
    refused = call(p, 3)
    with pytest.raises(RateLimitExceededError) as info:
        await g.reserve(refused, Estimate(0, 0))
    assert info.value.status == 429
    assert info.value.to_openai()["error"]["type"] == "requests"
    assert int(info.value.headers["Retry-After"]) >= 1
    assert refused.quota_headers is not None  # the 429 carries RateLimit too


async def test_team_limit_applies_and_refusal_takes_nothing_from_the_key() -> None:
    g = guard(Clock(NOV_27))
    p = principal(Quota(rpm=10), Quota(rpm=1))
    assert await g.reserve(call(p, 0), Estimate(0, 0)) is not None
    with pytest.raises(RateLimitExceededError, match="team:t1"):
        await g.reserve(call(p, 1), Estimate(0, 0))
    # The key's counter holds only the admitted request: 9 left of 10.
    other_team = principal(Quota(rpm=10), Quota(), team_id="t2")
    c = call(other_team, 2)
    await g.reserve(c, Estimate(0, 0))
    assert c.quota_headers is not None
    assert '"key-rpm";r=8;' in c.quota_headers["ratelimit"]


async def test_tpm_reserves_the_estimate_and_settles_to_the_actual() -> None:
    g = guard(Clock(NOV_27))
    p = principal(Quota(tpm=1000))
    first = await g.reserve(call(p, 0), Estimate(tokens=800, cost_micro_usd=0))
    assert first is not None
    with pytest.raises(RateLimitExceededError) as info:
        await g.reserve(call(p, 1), Estimate(tokens=300, cost_micro_usd=0))
    assert info.value.to_openai()["error"]["type"] == "tokens"
    await g.settle(first, tokens=100, cost_micro_usd=0)  # refund 700
    assert await g.reserve(call(p, 2), Estimate(tokens=300, cost_micro_usd=0)) is not None


async def test_a_request_larger_than_the_whole_tpm_limit_says_so() -> None:
    g = guard(Clock(NOV_27))
    with pytest.raises(RateLimitExceededError, match="lower max_tokens") as info:
        await g.reserve(call(principal(Quota(tpm=100))), Estimate(tokens=500, cost_micro_usd=0))
    assert "Retry-After" not in info.value.headers


async def test_parallel_slots_are_released_by_settle() -> None:
    g = guard(Clock(NOV_27))
    p = principal(Quota(max_parallel=1))
    held = await g.reserve(call(p, 0), Estimate(0, 0))
    assert held is not None
    with pytest.raises(RateLimitExceededError, match="in flight"):
        await g.reserve(call(p, 1), Estimate(0, 0))
    await g.settle(held, tokens=0, cost_micro_usd=0)
    assert await g.reserve(call(p, 2), Estimate(0, 0)) is not None


async def test_settle_later_frees_the_slot_before_it_returns() -> None:
    # The answer goes out right after it: the client's next request must find its slot free.
    g = guard(Clock(NOV_27))
    p = principal(Quota(max_parallel=1))
    held = await g.reserve(call(p, 0), Estimate(0, 0))
    assert held is not None
    g.settle_later(held, tokens=0, cost_micro_usd=0)
    assert await g.reserve(call(p, 1), Estimate(0, 0)) is not None
    await g.aclose()


async def test_budget_reserves_cost_refuses_with_402_and_settles() -> None:
    g = guard(Clock(NOV_27))
    p = principal(Quota(budget_micro_usd=1000))
    first = await g.reserve(call(p, 0), Estimate(0, 600))
    assert first is not None
    with pytest.raises(BudgetExceededError) as info:
        await g.reserve(call(p, 1), Estimate(0, 600))
    assert info.value.status == 402
    await g.settle(first, tokens=0, cost_micro_usd=200)
    assert await g.reserve(call(p, 2), Estimate(0, 600)) is not None  # 200 + 600 <= 1000


async def test_budget_starts_from_the_spend_already_recorded_this_period() -> None:
    store = MemoryStore()
    await store.start()
    spent = UsageRecord(
        id="u1",
        request_id="r1",
        created_at=NOV_27 - 3600,
        operation="chat",
        key_id="k1",
        team_id="t1",
        model="m",
        requested_model="m",
        deployment="m/0",
        cost_micro_usd=900,
    )
    await store.write_usage([spent])
    g = guard(Clock(NOV_27), store)
    with pytest.raises(BudgetExceededError):
        await g.reserve(call(principal(Quota(budget_micro_usd=1000))), Estimate(0, 200))


async def test_budget_resets_with_the_period_without_a_job() -> None:
    clock = Clock(NOV_27)
    g = guard(clock)
    p = principal(Quota(budget_micro_usd=1000, budget_period=BudgetPeriod.DAY))
    r = await g.reserve(call(p, 0), Estimate(0, 1000))
    assert r is not None
    await g.settle(r, tokens=0, cost_micro_usd=1000)
    with pytest.raises(BudgetExceededError):
        await g.reserve(call(p, 1), Estimate(0, 1))
    clock.now += 86_400
    assert await g.reserve(call(p, 2), Estimate(0, 1000)) is not None


async def test_soft_threshold_alerts_once_per_period_across_processes() -> None:
    clock = Clock(NOV_27)
    limiter = MemoryLimiter(clock=clock)
    alerts: list[BudgetAlert] = []

    async def sink(alert: BudgetAlert) -> None:
        alerts.append(alert)

    # Two guards on one limiter stand for two gateway processes sharing Redis.
    guards = [QuotaGuard(limiter, None, clock=clock, alert=sink) for _ in range(2)]
    p = principal(Quota(budget_micro_usd=1000, soft_budget_ratio=0.5))
    for n in range(6):
        g = guards[n % 2]
        r = await g.reserve(call(p, n), Estimate(0, 100))
        assert r is not None
        await g.settle(r, tokens=0, cost_micro_usd=100)
    for g in guards:
        await g.aclose()
    assert [(a.scope, a.id, a.spent_micro_usd) for a in alerts] == [("key", "k1", 500)]


async def test_a_settlement_left_to_the_limiter_alerts_with_its_own_budgets_spend() -> None:
    clock = Clock(NOV_27)
    alerts: list[BudgetAlert] = []

    async def sink(alert: BudgetAlert) -> None:
        alerts.append(alert)

    g = guard(clock, alert=sink)
    # Settled together: the key's TPM and parallel slot, its budget (soft threshold), the
    # team's budget (none): the alert must read the key budget's value, not a neighbour's.
    p = principal(
        Quota(tpm=10_000, max_parallel=5, budget_micro_usd=1000, soft_budget_ratio=0.5),
        Quota(budget_micro_usd=1_000_000),
    )
    for n in range(3):
        r = await g.reserve(call(p, n), Estimate(tokens=100, cost_micro_usd=300))
        assert r is not None
        g.settle_later(r, tokens=40, cost_micro_usd=250)
    await g.aclose()
    assert [(a.scope, a.id, a.spent_micro_usd) for a in alerts] == [("key", "k1", 500)]


class SlowSettling(MemoryLimiter):
    """A limiter whose settlements wait for ``release``, and that records what they carry."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.release = asyncio.Event()
        self.settled: list[tuple[str, int]] = []

    def settle(
        self, settlements: Sequence[Settlement], lease: str
    ) -> asyncio.Future[tuple[int, ...]]:
        async def later() -> tuple[int, ...]:
            await self.release.wait()
            self.settled += [(s.key, s.delta) for s in settlements]
            return await super(SlowSettling, self).settle(settlements, lease)

        return asyncio.ensure_future(later())


async def test_aclose_waits_for_settlements_the_limiter_has_not_answered() -> None:
    clock = Clock(NOV_27)
    limiter = SlowSettling(clock)
    g = QuotaGuard(limiter, None, clock=clock)
    p = principal(Quota(rpm=100, tpm=1000, max_parallel=1), Quota(rpm=100))
    held = await g.reserve(call(p, 0), Estimate(tokens=50, cost_micro_usd=0))
    assert held is not None
    g.settle_later(held, tokens=20, cost_micro_usd=0)
    with pytest.raises(RateLimitExceededError, match="in flight"):
        await g.reserve(call(p, 1), Estimate(tokens=50, cost_micro_usd=0))
    closing = asyncio.create_task(g.aclose())
    await asyncio.sleep(0.01)
    assert not closing.done()  # the settlement is still waiting for the limiter
    limiter.release.set()
    await closing
    # RPM counters are left out of the settlement: their delta is always 0.
    assert limiter.settled == [("key:k1:tpm", -30), ("key:k1:parallel", 0)]
    assert await g.reserve(call(p, 2), Estimate(tokens=50, cost_micro_usd=0)) is not None


async def test_a_changed_quota_applies_to_the_next_request() -> None:
    g = guard(Clock(NOV_27))
    assert await g.reserve(call(principal(Quota(rpm=10)), 0), Estimate(0, 0)) is not None
    lowered = principal(Quota(rpm=1))  # the same key, read again with a lower limit
    with pytest.raises(RateLimitExceededError, match="limit of 1 requests per minute"):
        await g.reserve(call(lowered, 1), Estimate(0, 0))
