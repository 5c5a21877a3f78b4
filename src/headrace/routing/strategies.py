"""Load-balancing strategies: in which order to try the deployments that are available now.

A strategy gets the candidates already filtered to available ones and returns all of them, in
the order to try: the first is the primary, the rest are where retries and fallbacks go. Pick
one by name through ``STRATEGIES`` / ``make_strategy``. Randomness comes from the caller's
``random.Random``, so a seeded one makes every strategy deterministic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

__all__ = [
    "STRATEGIES",
    "Candidate",
    "CostFirst",
    "Ewma",
    "LatencyAware",
    "LeastInFlight",
    "RoundRobin",
    "Strategy",
    "WeightedRandom",
    "make_strategy",
]


@dataclass(slots=True, kw_only=True)
class Candidate:
    """One deployment as a strategy sees it; the router builds these per request.

    ``weight`` is relative (0 = only when nothing else is left); ``in_flight`` counts calls now
    in progress; ``ewma_latency_s`` is the smoothed latency in seconds, None until measured;
    ``cost_per_mtok_micro_usd`` is input + output price per million tokens in micro-dollars;
    ``order`` is the position in the config, which breaks ties.
    """

    name: str
    weight: float = 1.0
    in_flight: int = 0
    max_concurrency: int | None = None
    ewma_latency_s: float | None = None
    cost_per_mtok_micro_usd: int = 0
    order: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0.0):
            raise ValueError(
                f"Deployment {self.name!r}: weight must be finite and >= 0; got {self.weight!r}."
            )
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(
                f"Deployment {self.name!r}: max_concurrency must be >= 1 or unset; "
                f"got {self.max_concurrency}."
            )


class Strategy(Protocol):
    def order(self, candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
        """Every candidate exactly once, in the order to try them (first = primary).

        ``candidates`` are the available ones; an empty sequence gives an empty list.
        """
        ...


class WeightedRandom:
    """Weighted sampling without replacement: the primary is picked with probability
    weight / total weight, the next among the rest likewise, and so on. Zero-weight candidates
    come last, in config order. (Efraimidis-Spirakis: sort by ``u ** (1 / weight)``.)"""

    def order(self, candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
        keyed = [
            (rng.random() ** (1.0 / c.weight) if c.weight > 0 else -1.0, -c.order, c)
            for c in candidates
        ]
        keyed.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [c for _, _, c in keyed]


class RoundRobin:
    """Each call starts at the next deployment by name after the previous call's primary.

    Rotating by name rather than by a position keeps the cycle fair when deployments drop out
    and come back: the one after "b" is "c" whether or not "a" is available. One instance per
    model route; the state is the last primary's name.
    """

    def __init__(self) -> None:
        self._last: str | None = None

    def order(self, candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
        ring = sorted(candidates, key=lambda c: (c.name, c.order))
        if not ring:
            return []
        start = 0
        if self._last is not None:
            start = next((i for i, c in enumerate(ring) if c.name > self._last), 0)
        rotated = ring[start:] + ring[:start]
        self._last = rotated[0].name
        return rotated


class LeastInFlight:
    """Ascending load, where load is ``in_flight / max_concurrency`` (a deployment without a
    limit counts as capacity 1, so load = in_flight); ties in random order."""

    def order(self, candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
        keyed = [(c.in_flight / (c.max_concurrency or 1), rng.random(), c) for c in candidates]
        keyed.sort(key=lambda item: (item[0], item[1]))
        return [c for _, _, c in keyed]


def _latency_key(candidate: Candidate) -> tuple[float, int]:
    # Unknown latency sorts first so new or recovered deployments get measured.
    latency = candidate.ewma_latency_s
    return (-math.inf if latency is None else latency, candidate.order)


class LatencyAware:
    """Power of two choices on EWMA latency: of two candidates drawn at random, the faster is
    the primary (unknown latency counts as fastest); the rest follow by ascending latency.

    Two random choices rather than the global minimum keep one fast deployment from taking
    every request at once and going slow before its EWMA catches up.
    """

    def order(self, candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
        if len(candidates) < 2:
            return list(candidates)
        first, second = rng.sample(range(len(candidates)), 2)
        if _latency_key(candidates[second])[0] < _latency_key(candidates[first])[0]:
            first = second
        primary = candidates[first]
        rest = sorted(
            (c for i, c in enumerate(candidates) if i != first),
            key=_latency_key,
        )
        return [primary, *rest]


class CostFirst:
    """Cheapest first by ``cost_per_mtok_micro_usd``; ties in config order."""

    def order(self, candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (c.cost_per_mtok_micro_usd, c.order))


STRATEGIES: Mapping[str, Callable[[], Strategy]] = MappingProxyType(
    {
        "weighted_random": WeightedRandom,
        "round_robin": RoundRobin,
        "least_in_flight": LeastInFlight,
        "latency_aware": LatencyAware,
        "cost_first": CostFirst,
    }
)


def make_strategy(name: str) -> Strategy:
    """A new strategy instance for ``name`` (one per model route: some keep state)."""
    factory = STRATEGIES.get(name)
    if factory is None:
        raise ValueError(
            f"Unknown load-balancing strategy {name!r}. "
            f"Use one of: {', '.join(sorted(STRATEGIES))}."
        )
    return factory()


class Ewma:
    """Exponentially weighted moving average: ``value = alpha * sample + (1 - alpha) * value``.

    ``value`` is None until the first sample, which it then equals. Units are the samples'
    (seconds for latency). Larger ``alpha`` (in (0, 1]) follows recent samples faster.
    """

    __slots__ = ("_value", "alpha")

    def __init__(self, alpha: float = 0.3) -> None:
        if not (0.0 < alpha <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], e.g. 0.3; got {alpha!r}.")
        self.alpha = alpha
        self._value: float | None = None

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, sample: float) -> float:
        """Fold in ``sample`` (must be finite) and return the new value."""
        if not math.isfinite(sample):
            raise ValueError(f"EWMA samples must be finite numbers; got {sample!r}.")
        if self._value is None:
            self._value = sample
        else:
            self._value = self.alpha * sample + (1.0 - self.alpha) * self._value
        return self._value
