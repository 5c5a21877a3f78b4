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
import functools
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

from headrace.domain import Call, Principal
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


class Estimate(NamedTuple):
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
    end: float  # when the period ends (unix time; inf: never)

    def ttl_s(self, now: float) -> float:
        """How long a counter created ``now`` must live: a day past its period's end."""
        return TOTAL_BUDGET_TTL_S if math.isinf(self.end) else self.end - now + _DAY_S


# What a demand's amount is: one request (RPM, parallel), the estimated tokens, or the cost.
_ONE, _TOKENS, _COST = 0, 1, 2
_CONCURRENCY = LimitKind.CONCURRENCY  # a global's lookup, not an enum class attribute's
_Alerting = list[tuple[int, _Budget]]  # (position in a settlement, its budget with a soft ratio)


@dataclass(frozen=True, slots=True)
class _Plan:
    """A principal's demands, built once and reused until its first budget period ends.

    ``demands`` are templates: those whose amount is ``_ONE`` are used as they are, the
    others (``filled``) are copied with the request's estimate. ``settled``: the demands a
    settlement moves (TPM, parallel, budget; an RPM counter's delta is always 0).
    """

    principal: Principal
    until: float  # unix time (inf: no budget period ends)
    demands: tuple[Demand, ...]
    amounts: tuple[int, ...]  # _ONE, _TOKENS or _COST, per demand
    budgets: tuple[_Budget | None, ...]  # per demand: set for BUDGET demands
    filled: tuple[int, ...]  # the demands whose amount is the estimate (indexes)
    settled: tuple[int, ...]
    policy: str  # the RateLimit-Policy header ("" without RATE counters)
    rates: tuple[tuple[int, str], ...]  # (demand index, '"key-rpm";r=') for RateLimit


class Reservation(NamedTuple):
    lease: str
    demands: tuple[Demand, ...]
    estimate: Estimate
    budgets: tuple[_Budget | None, ...]  # parallel to demands: set for BUDGET demands
    settled: tuple[int, ...]  # the demands a settlement moves (indexes)
    amounts: tuple[int, ...]  # per demand: _ONE, _TOKENS or _COST


class QuotaGuard:
    """Reserves and settles quotas (see the module doc).

    Each principal's demands (counter names, limits, budget period and seed, the
    ``RateLimit-Policy`` header) are built on its first request and reused until its budget
    period ends or its quota changes, so a request only fills in its estimate.
    :meth:`settle_later` hands the settlement to the limiter without waiting for its answer;
    :meth:`aclose` waits for every answer and alert outstanding.
    """

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
        self._plans: dict[str, _Plan] = {}  # key id -> its principal's demands
        self._alerted: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # alerts being sent
        self._settling: set[asyncio.Future[tuple[int, ...]]] = set()  # settlements unanswered

    @property
    def limiter(self) -> Limiter:
        return self._limiter

    @staticmethod
    def needs_estimate(principal: Principal | None) -> bool:
        """Whether any token limit or budget applies (the tokenizer runs only then)."""
        if principal is None:
            return False
        key, team = principal.quota, principal.team_quota
        return (
            key.tpm is not None
            or key.budget_micro_usd is not None
            or team.tpm is not None
            or team.budget_micro_usd is not None
        )

    @staticmethod
    def applies(principal: Principal | None) -> bool:
        return principal is not None and not (
            principal.quota.unlimited and principal.team_quota.unlimited
        )

    async def reserve(self, call: Call, estimate: Estimate) -> Reservation | None:
        """Take the request's quota or raise 429/402; None when no quota applies."""
        principal = call.principal
        if principal is None:
            return None
        now = self._clock()
        plan = self._plans.get(principal.key_id)
        if (
            plan is None
            or now >= plan.until
            or (plan.principal is not principal and plan.principal != principal)
        ):
            if not self.applies(principal):  # a plan is only made for a principal it applies to
                return None
            plan = await self._plan(principal, now)
        demands = plan.demands
        if plan.filled:  # some amounts are this request's estimate
            demands = self._fill(plan, estimate, now)
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
        call.quota_headers = _headers(plan, decision.states)
        if not decision.allowed:
            raise self._refusal(demands, plan.budgets, decision)
        return Reservation(lease, demands, estimate, plan.budgets, plan.settled, plan.amounts)

    async def settle(self, reservation: Reservation, tokens: int, cost_micro_usd: int) -> None:
        """Charge what the call really used and free its parallel slot; return once the
        limiter has applied it (and sent a soft-budget alert it raised)."""
        taken = self._take(reservation, tokens, cost_micro_usd)
        if taken is None:
            return
        done, alerting = taken
        try:
            values = await done
        except LimiterUnavailableError as exc:
            # Counters stay as reserved (an over-estimate) and leases expire on their TTL.
            log.warning("quota_settle_failed", error=str(exc), lease=reservation.lease)
            return
        for position, budget in alerting:
            await self._maybe_alert(budget, values[position])

    def settle_later(self, reservation: Reservation, tokens: int, cost_micro_usd: int) -> None:
        """:meth:`settle` without waiting: the limiter takes the settlement before this
        returns (a local one has applied it, a remote one holds it for its next call), and its
        answer is handled when it comes; :meth:`aclose` waits for it."""
        taken = self._take(reservation, tokens, cost_micro_usd)
        if taken is None:
            return
        done, alerting = taken
        if done.done():
            self._settled(reservation.lease, alerting, done)
        else:
            self._settling.add(done)
            done.add_done_callback(functools.partial(self._settled, reservation.lease, alerting))

    async def aclose(self) -> None:
        """Wait for every settlement and alert started (new ones may start meanwhile)."""
        while self._tasks or self._settling:
            await asyncio.gather(*self._tasks, *self._settling, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------

    def _take(
        self, reservation: Reservation, tokens: int, cost_micro_usd: int
    ) -> tuple[asyncio.Future[tuple[int, ...]], _Alerting] | None:
        """Hand the settlement to the limiter: its answer, and the settled budgets that have a
        soft threshold (by position in the answer); None when nothing would move."""
        estimate = reservation.estimate
        deltas = (0, tokens - estimate.tokens, cost_micro_usd - estimate.cost_micro_usd)
        demands, amounts, budget_of = reservation.demands, reservation.amounts, reservation.budgets
        settlements: list[Settlement] = []
        alerting: _Alerting = []
        for index in reservation.settled:
            demand = demands[index]
            delta = deltas[amounts[index]]
            budget = budget_of[index]
            if budget is not None and budget.soft_ratio is not None:
                alerting.append((len(settlements), budget))  # an alert needs its value
            elif delta == 0 and demand.kind is not _CONCURRENCY:
                continue  # nothing would move
            settlements.append(
                Settlement(demand.key, demand.kind, delta, demand.window_s, demand.limit)
            )
        if not settlements:
            return None
        return self._limiter.settle(settlements, reservation.lease), alerting

    def _settled(
        self, lease: str, alerting: _Alerting, done: asyncio.Future[tuple[int, ...]]
    ) -> None:
        """The limiter's answer to :meth:`settle_later`: log a failure, start a due alert."""
        self._settling.discard(done)
        if done.cancelled():
            return
        if (exc := done.exception()) is not None:
            if isinstance(exc, LimiterUnavailableError):
                # Counters stay as reserved (an over-estimate) and leases expire on their TTL.
                log.warning("quota_settle_failed", error=str(exc), lease=lease)
            else:
                log.error("quota_settle_error", error=repr(exc), lease=lease)
            return
        if not alerting:
            return
        values = done.result()
        for position, budget in alerting:
            value = values[position]
            assert budget.soft_ratio is not None
            if value >= budget.soft_ratio * budget.limit:
                self._spawn(self._maybe_alert(budget, value))  # a task only when one is due

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("quota_alert_error", error=repr(exc))

    @staticmethod
    def _fill(plan: _Plan, estimate: Estimate, now: float) -> tuple[Demand, ...]:
        """The plan's demands with this request's estimate (and a budget counter's TTL)."""
        out = list(plan.demands)
        for index in plan.filled:
            d = out[index]
            if plan.amounts[index] == _TOKENS:
                out[index] = Demand(d.key, d.kind, d.limit, estimate.tokens, d.window_s)
            else:  # _COST
                budget = plan.budgets[index]
                assert budget is not None
                ttl = budget.ttl_s(now)
                out[index] = Demand(d.key, d.kind, d.limit, estimate.cost_micro_usd, ttl, d.seed)
        return tuple(out)

    async def _plan(self, principal: Principal, now: float) -> _Plan:
        demands: list[Demand] = []
        amounts: list[int] = []
        budgets: list[_Budget | None] = []
        policies: list[str] = []
        rates: list[tuple[int, str]] = []
        until = math.inf

        def add(demand: Demand, amount: int, budget: _Budget | None = None) -> None:
            if demand.kind is LimitKind.RATE:
                scope, what = demand.key.partition(":")[0], demand.key.rsplit(":", 1)[1]
                name = f'"{scope}-{what}"'
                policies.append(f"{name};q={demand.limit};w={int(demand.window_s)}")
                rates.append((len(demands), f"{name};r="))
            demands.append(demand)
            amounts.append(amount)
            budgets.append(budget)

        scopes = [("key", principal.key_id, principal.quota)]
        if principal.team_id is not None:
            scopes.append(("team", principal.team_id, principal.team_quota))
        for scope, owner, quota in scopes:
            base = f"{scope}:{owner}"
            if quota.rpm is not None:
                add(Demand(f"{base}:rpm", LimitKind.RATE, quota.rpm, 1, MINUTE_S), _ONE)
            if quota.tpm is not None:
                add(Demand(f"{base}:tpm", LimitKind.RATE, quota.tpm, 0, MINUTE_S), _TOKENS)
            if quota.max_parallel is not None:
                demand = Demand(
                    f"{base}:parallel",
                    LimitKind.CONCURRENCY,
                    quota.max_parallel,
                    1,
                    self._lease_ttl_s,
                )
                add(demand, _ONE)
            if quota.budget_micro_usd is not None:
                period, start, end = quota.budget_period.current(now)
                key = f"{base}:budget:{period}"
                limit = quota.budget_micro_usd
                budget = _Budget(scope, owner, period, limit, quota.soft_budget_ratio, end)
                seed = await self._seed(key, scope, owner, start)
                add(Demand(key, LimitKind.BUDGET, limit, 0, budget.ttl_s(now), seed), _COST, budget)
                until = min(until, end)
        settled = tuple(
            i
            for i, (d, amount) in enumerate(zip(demands, amounts, strict=True))
            if d.kind is not LimitKind.RATE or amount != _ONE
        )
        plan = _Plan(
            principal,
            until,
            tuple(demands),
            tuple(amounts),
            tuple(budgets),
            tuple(i for i, amount in enumerate(amounts) if amount != _ONE),
            settled,
            ", ".join(policies),
            tuple(rates),
        )
        if len(self._plans) >= 100_000:  # bounded, as the key cache is
            self._plans.clear()
        self._plans[principal.key_id] = plan
        return plan

    async def _seed(self, key: str, scope: str, owner: str, start: float) -> int:
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
        if not await self._limiter.first_time(flag, budget.ttl_s(self._clock())):
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
            self._spawn(self._alert(alert))


def _headers(plan: _Plan, states: Sequence[CounterState]) -> dict[str, str]:
    """``RateLimit-Policy`` and ``RateLimit`` (IETF httpapi draft) for the RPM/TPM counters."""
    if not plan.rates:
        return {}
    current = ", ".join(
        [f"{name}{states[i].remaining};t={math.ceil(states[i].reset_s)}" for i, name in plan.rates]
    )
    return {"ratelimit-policy": plan.policy, "ratelimit": current}
