"""Key and team quotas: RPM, TPM, parallel requests and budgets, reserved before the call.

:meth:`QuotaGuard.reserve` turns a principal's two quotas (its key's and its team's) into
limiter demands and takes them in one atomic round trip: one request, the estimated tokens
(prompt tokens from the offline tokenizer plus ``max_tokens`` or a configured default), one
parallel slot, and the estimated cost. A refusal raises 429 (rate) or 402 (budget) before any
upstream call. :meth:`QuotaGuard.settle` then charges what the call really used: the token and
budget counters move by ``actual - reserved`` and the parallel slot is released.

Budgets cannot be overspent by concurrent requests beyond the estimates: each request must fit
``spent + reserved by others + its own estimate``. The estimate is an upper bound whenever the
request sets ``max_tokens`` (the upstream cannot bill more output than that).

Crossing a soft threshold raises one alert per period across all processes
(:meth:`Limiter.first_time`). See docs/adr/0009-limits-and-budgets.md.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from headrace.domain import BudgetPeriod, Call, Principal, Quota
from headrace.errors import BudgetExceededError, OverloadedError, RateLimitExceededError
from headrace.limits.base import (
    CounterState,
    Decision,
    Demand,
    Limiter,
    LimiterUnavailableError,
    LimitKind,
    Settlement,
)
from headrace.observability.metrics import Metrics
from headrace.store.base import UsageStore

log = structlog.get_logger("headrace")

MINUTE_S = 60.0
TOTAL_BUDGET_TTL_S = 10 * 365 * 86_400.0
_DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a request is expected to use, reserved before the call."""

    tokens: int
    cost_micro_usd: int


@dataclass(frozen=True, slots=True)
class BudgetAlert:
    """A key or team crossed its soft budget threshold in ``period``."""

    scope: str  # "key" or "team"
    id: str
    period: str
    spent_micro_usd: int
    budget_micro_usd: int
    threshold: float


AlertSink = Callable[[BudgetAlert], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class _Budget:
    scope: str
    id: str
    period: str
    limit: int
    soft_ratio: float | None
    ttl_s: float


@dataclass(frozen=True, slots=True)
class Reservation:
    lease: str
    demands: tuple[Demand, ...]
    estimate: Estimate
    budgets: tuple[_Budget | None, ...]  # parallel to demands: set for BUDGET demands


class QuotaGuard:
    def __init__(
        self,
        limiter: Limiter,
        spend: UsageStore | None = None,
        *,
        lease_ttl_s: float = 900.0,
        alert: AlertSink | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._limiter = limiter
        self._spend = spend
        self._lease_ttl_s = lease_ttl_s
        self._alert = alert
        self._clock = clock
        self._seeds: dict[str, int] = {}  # budget counter -> spend recorded before this process
        self._alerted: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def limiter(self) -> Limiter:
        return self._limiter

    @staticmethod
    def needs_estimate(principal: Principal | None) -> bool:
        """Whether any token limit or budget applies (the tokenizer runs only then)."""
        if principal is None:
            return False
        return any(
            q.tpm is not None or q.budget_micro_usd is not None
            for q in (principal.quota, principal.team_quota)
        )

    @staticmethod
    def applies(principal: Principal | None) -> bool:
        return principal is not None and not (
            principal.quota.unlimited and principal.team_quota.unlimited
        )

    async def reserve(self, call: Call, estimate: Estimate) -> Reservation | None:
        """Take the request's quota or raise 429/402; None when no quota applies."""
        principal = call.principal
        if principal is None or not self.applies(principal):
            return None
        now = self._clock()
        demands: list[Demand] = []
        budgets: list[_Budget | None] = []
        scopes = [("key", principal.key_id, principal.quota)]
        if principal.team_id is not None:
            scopes.append(("team", principal.team_id, principal.team_quota))
        for scope, owner, quota in scopes:
            for demand, budget in await self._demands(scope, owner, quota, estimate, now):
                demands.append(demand)
                budgets.append(budget)
        lease = call.request_id
        try:
            decision = await self._limiter.acquire(demands, lease)
        except LimiterUnavailableError as exc:
            raise OverloadedError(
                f"The rate-limit backend is unavailable ({exc}); requests are refused while it "
                "is down (limits.on_backend_down: refuse).",
                code="limits_unavailable",
                headers={"Retry-After": "5"},
            ) from None
        call.quota_headers = _headers(demands, decision.states)
        if not decision.allowed:
            raise self._refusal(demands, budgets, decision)
        return Reservation(lease, tuple(demands), estimate, tuple(budgets))

    async def settle(self, reservation: Reservation, tokens: int, cost_micro_usd: int) -> None:
        """Charge what the call really used and free its parallel slot."""
        estimate = reservation.estimate
        settlements = []
        for demand in reservation.demands:
            delta = 0
            if demand.kind is LimitKind.RATE and demand.key.endswith(":tpm"):
                delta = tokens - estimate.tokens
            elif demand.kind is LimitKind.BUDGET:
                delta = cost_micro_usd - estimate.cost_micro_usd
            settlements.append(Settlement.of(demand, delta))
        try:
            values = await self._limiter.settle(settlements, reservation.lease)
        except LimiterUnavailableError as exc:
            # Counters stay as reserved (an over-estimate) and leases expire on their TTL.
            log.warning("quota_settle_failed", error=str(exc), lease=reservation.lease)
            return
        for budget, value in zip(reservation.budgets, values, strict=True):
            if budget is not None and budget.soft_ratio is not None:
                await self._maybe_alert(budget, value)

    def settle_later(self, reservation: Reservation, tokens: int, cost_micro_usd: int) -> None:
        """Settle from a task: for a request being cancelled, which must not await."""
        task = asyncio.get_running_loop().create_task(
            self.settle(reservation, tokens, cost_micro_usd)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------

    async def _demands(
        self, scope: str, owner: str, quota: Quota, estimate: Estimate, now: float
    ) -> list[tuple[Demand, _Budget | None]]:
        base = f"{scope}:{owner}"
        out: list[tuple[Demand, _Budget | None]] = []
        if quota.rpm is not None:
            out.append((Demand(f"{base}:rpm", LimitKind.RATE, quota.rpm, 1, MINUTE_S), None))
        if quota.tpm is not None:
            demand = Demand(f"{base}:tpm", LimitKind.RATE, quota.tpm, estimate.tokens, MINUTE_S)
            out.append((demand, None))
        if quota.max_parallel is not None:
            demand = Demand(
                f"{base}:parallel",
                LimitKind.CONCURRENCY,
                quota.max_parallel,
                1,
                self._lease_ttl_s,
            )
            out.append((demand, None))
        if quota.budget_micro_usd is not None:
            period, start, end = quota.budget_period.current(now)
            key = f"{base}:budget:{period}"
            ttl = TOTAL_BUDGET_TTL_S if math.isinf(end) else end - now + _DAY_S
            budget = _Budget(
                scope, owner, period, quota.budget_micro_usd, quota.soft_budget_ratio, ttl
            )
            seed = await self._seed(key, scope, owner, quota.budget_period, start)
            demand = Demand(
                key,
                LimitKind.BUDGET,
                quota.budget_micro_usd,
                estimate.cost_micro_usd,
                ttl,
                seed,
            )
            out.append((demand, budget))
        return out

    async def _seed(
        self, key: str, scope: str, owner: str, period: BudgetPeriod, start: float
    ) -> int:
        """Spend already recorded for the period: a new budget counter starts from it."""
        seed = self._seeds.get(key)
        if seed is None:
            seed = 0
            if self._spend is not None:
                seed = await self._spend.spend_since(
                    key_id=owner if scope == "key" else None,
                    team_id=owner if scope == "team" else None,
                    since=start,
                )
            self._seeds[key] = seed
        return seed

    def _refusal(
        self,
        demands: Sequence[Demand],
        budgets: Sequence[_Budget | None],
        decision: Decision,
    ) -> RateLimitExceededError | BudgetExceededError:
        index = decision.refused if decision.refused is not None else 0
        demand = demands[index]
        if self._metrics is not None:
            scope, limit = demand.key.partition(":")[0], demand.key.split(":")[2]
            self._metrics.quota_refusals.labels(scope, limit).inc()
        state = decision.states[index]
        budget = budgets[index]
        owner = demand.key.rsplit(":", 1)[0]  # "key:<id>" or "team:<id>"
        if budget is not None:
            return BudgetExceededError(
                f"The {budget.scope} {budget.id!r} would exceed its budget of "
                f"${budget.limit / 1e6:.6f} for {budget.period} "
                f"(${state.remaining / 1e6:.6f} left, this request may cost "
                f"${demand.amount / 1e6:.6f}). Raise the budget or wait for the next period."
            )
        what = demand.key.rsplit(":", 1)[1]
        never = math.isinf(decision.retry_after_s)
        retry_after = max(1, math.ceil(decision.retry_after_s)) if not never else None
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        names = {"rpm": "requests per minute", "tpm": "tokens per minute"}
        if what == "parallel":
            message = (
                f"{owner} already has {demand.limit} requests in flight (its max_parallel); "
                "retry when one finishes."
            )
        elif never:
            message = (
                f"This request needs about {demand.amount} tokens, more than {owner}'s whole "
                f"limit of {demand.limit} {names.get(what, what)}; lower max_tokens or "
                "raise the limit."
            )
        else:
            message = (
                f"{owner} reached its limit of {demand.limit} {names.get(what, what)}; "
                f"retry after {retry_after} s."
            )
        return RateLimitExceededError(
            message, limit_type="tokens" if what == "tpm" else "requests", headers=headers
        )

    async def _maybe_alert(self, budget: _Budget, spent: int) -> None:
        assert budget.soft_ratio is not None
        threshold = budget.soft_ratio * budget.limit
        flag = f"alert:{budget.scope}:{budget.id}:{budget.period}"
        if spent < threshold or flag in self._alerted:
            return
        self._alerted.add(flag)
        if not await self._limiter.first_time(flag, budget.ttl_s):
            return
        alert = BudgetAlert(
            budget.scope, budget.id, budget.period, spent, budget.limit, budget.soft_ratio
        )
        log.warning(
            "budget_soft_threshold_crossed",
            scope=alert.scope,
            id=alert.id,
            period=alert.period,
            spent_usd=spent / 1e6,
            budget_usd=budget.limit / 1e6,
            threshold=budget.soft_ratio,
        )
        if self._alert is not None:
            task = asyncio.get_running_loop().create_task(self._alert(alert))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _headers(demands: Sequence[Demand], states: Sequence[CounterState]) -> dict[str, str]:
    """``RateLimit-Policy`` and ``RateLimit`` (IETF httpapi draft) for the RPM/TPM counters."""
    policies: list[str] = []
    current: list[str] = []
    for demand, state in zip(demands, states, strict=True):
        if demand.kind is not LimitKind.RATE:
            continue
        scope = demand.key.partition(":")[0]
        what = demand.key.rsplit(":", 1)[1]
        name = f'"{scope}-{what}"'
        policies.append(f"{name};q={demand.limit};w={int(demand.window_s)}")
        current.append(f"{name};r={state.remaining};t={math.ceil(state.reset_s)}")
    if not policies:
        return {}
    return {"ratelimit-policy": ", ".join(policies), "ratelimit": ", ".join(current)}
