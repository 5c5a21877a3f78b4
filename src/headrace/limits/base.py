"""The limiter seam: counters that a request reserves against and settles afterwards.

One mechanism serves every limit a key or a team carries:

* ``RATE`` — requests or tokens per window (RPM, TPM). A leaky bucket: the counter drains at
  ``limit / window_s`` per second, a demand is admitted while ``used + amount <= limit``.
  Settling adds ``actual - reserved`` (a refund when negative), so token limits reserve an
  estimate at admission and end up charged what the call really used.
* ``CONCURRENCY`` — requests in flight. Each admitted request holds a lease (named by
  ``lease``) until it settles; leases expire after ``window_s`` so a crashed process cannot
  leak them forever.
* ``BUDGET`` — micro-dollars spent in a period. The counter's ``key`` names the period, so a
  new period is a new counter (no reset job); it expires ``window_s`` after creation. A new
  counter starts at ``seed`` (the spend the usage store already holds for the period).

:meth:`Limiter.acquire` is all or nothing and atomic across every process sharing the
backend: either every demand is taken, or none is and the decision says which refused.

The values here, like the quota guard's estimate and reservation, are named tuples, not
the frozen dataclasses used for values elsewhere: just as immutable, and built in half the
time (a frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``), and a
request with a key and a team builds about fifteen of them before its answer goes out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from enum import StrEnum
from typing import NamedTuple, Protocol


class LimitKind(StrEnum):
    RATE = "rate"
    CONCURRENCY = "concurrency"
    BUDGET = "budget"


class Demand(NamedTuple):
    """What one request asks of one counter."""

    key: str  # the counter's name, e.g. "key:key_1:tpm" or "team:t1:budget:2026-11"
    kind: LimitKind
    limit: int  # per window (RATE), at once (CONCURRENCY), per period (BUDGET)
    amount: int  # requests or estimated tokens (RATE), 1 (CONCURRENCY), estimated micro-USD
    window_s: float = 60.0  # RATE: drain window; CONCURRENCY: lease TTL; BUDGET: counter TTL
    seed: int = 0  # BUDGET only: starting spend when the counter does not exist yet


class CounterState(NamedTuple):
    """One counter after a decision: what is left and when it is whole again."""

    key: str
    limit: int
    remaining: int  # never negative
    reset_s: float  # seconds until the counter is back to its full limit (RATE, CONCURRENCY
    # report 0 when already whole; BUDGET reports the seconds until the counter expires)


class Decision(NamedTuple):
    allowed: bool
    states: tuple[CounterState, ...]  # one per demand, in the demands' order
    refused: int | None = None  # index of the first demand that could not be met
    retry_after_s: float = 0.0  # when the refused demand could next be met (inf: never)


class Settlement(NamedTuple):
    """Settle one counter after the call. ``delta`` = actual - reserved (RATE, BUDGET)."""

    key: str
    kind: LimitKind
    delta: int  # ignored for CONCURRENCY, whose lease is released
    window_s: float  # as in the Demand (RATE needs it to drain correctly)
    limit: int  # as in the Demand

    @classmethod
    def of(cls, demand: Demand, delta: int = 0) -> Settlement:
        return cls(demand.key, demand.kind, delta, demand.window_s, demand.limit)


class Limiter(Protocol):
    async def start(self) -> None: ...

    async def acquire(self, demands: Sequence[Demand], lease: str) -> Decision:
        """Take every demand or none, atomically; one round trip for a remote backend.

        ``lease`` identifies this request's CONCURRENCY slots for :meth:`settle`. An amount
        larger than its limit is refused with ``retry_after_s = inf``. Each counter may appear
        at most once per call.
        """
        ...

    def settle(
        self, settlements: Sequence[Settlement], lease: str
    ) -> asyncio.Future[tuple[int, ...]]:
        """Take each settlement now; the future gives each counter's value once it is applied
        (spend, for budgets), or raises :class:`LimiterUnavailableError`.

        Release ``lease``'s CONCURRENCY slots. A BUDGET counter that no longer exists (its
        period ended) is skipped (value 0); a missing RATE counter counts as empty. Taken
        before this returns, with no await: a local backend has applied it, and a remote one
        holds it for its next call (the next :meth:`acquire` of this process applies it before
        its own demands, or it goes on its own at the next event-loop turn, or within a few
        milliseconds when the backend lingers). :meth:`aclose` sends every one still held.
        Cancelling the future does not withdraw the settlement.
        """
        ...

    async def first_time(self, flag: str, ttl_s: float) -> bool:
        """True for the first caller (across processes) to raise ``flag`` within ``ttl_s``."""
        ...

    async def check(self) -> None:
        """Raise if the backend cannot be reached (for ``/health/ready``)."""
        ...

    async def aclose(self) -> None: ...


class LimiterUnavailableError(Exception):
    """The limiter's backend cannot be reached (raised by remote backends, not by memory)."""
