"""When to retry an upstream call: backoff policy, a retry budget, and upstream rate-limit hints.

- ``RetryPolicy`` caps attempts and total time and computes full-jitter backoff delays that
  honour the upstream's Retry-After.
- ``RetryBudget`` caps retries to a fraction of recent traffic (Finagle's / Envoy's retry
  budget), so an upstream outage cannot be multiplied by the retry factor.

Upstream rate-limit headers are read by the providers (:mod:`headrace.providers.hints`).

Pure: randomness comes from an injected ``random.Random``, time from an injected clock.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from headrace.routing.breaker import WindowCounts

__all__ = ["RetryBudget", "RetryPolicy"]

# 2**64 times any sane base delay is far past any cap; bounding the exponent avoids overflow.
_MAX_EXPONENT = 64


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times and how long to retry. Durations are seconds.

    ``max_attempts`` counts every attempt including the first (1 disables retries);
    ``max_total_s`` bounds the time from the first attempt to the start of the last one.
    """

    max_attempts: int = 3
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    max_total_s: float = 30.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.max_attempts < 1:
            problems.append(
                f"max_attempts counts the first attempt too, so it must be >= 1 "
                f"(1 disables retries); got {self.max_attempts}."
            )
        if not (math.isfinite(self.base_delay_s) and self.base_delay_s >= 0.0):
            problems.append(f"base_delay_s must be finite and >= 0; got {self.base_delay_s!r}.")
        if not (math.isfinite(self.max_delay_s) and self.max_delay_s >= self.base_delay_s):
            problems.append(
                f"max_delay_s must be finite and >= base_delay_s ({self.base_delay_s!r}); "
                f"got {self.max_delay_s!r}."
            )
        if not (math.isfinite(self.max_total_s) and self.max_total_s > 0.0):
            problems.append(f"max_total_s must be finite and > 0; got {self.max_total_s!r}.")
        if problems:
            raise ValueError("Invalid retry policy: " + " ".join(problems))

    def delay_s(
        self, retry_number: int, rng: random.Random, retry_after_s: float | None = None
    ) -> float:
        """Seconds to wait before retry ``retry_number`` (0 for the first retry).

        Full jitter: uniform in ``[0, min(max_delay_s, base_delay_s * 2**retry_number)]``. When
        the upstream said when to come back (``retry_after_s``), never sooner than that, even
        past ``max_delay_s``; ``may_retry`` then decides whether the wait still fits.
        """
        if retry_number < 0:
            raise ValueError(f"retry_number starts at 0 for the first retry; got {retry_number}.")
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** min(retry_number, _MAX_EXPONENT))
        jitter = rng.uniform(0.0, ceiling)
        if retry_after_s is None:
            return jitter
        return max(retry_after_s, jitter)

    def may_retry(self, attempts_made: int, elapsed_s: float, next_delay_s: float) -> bool:
        """Whether another attempt is allowed after ``attempts_made`` attempts, ``elapsed_s``
        seconds since the first began, if it would start after waiting ``next_delay_s``."""
        return attempts_made < self.max_attempts and elapsed_s + next_delay_s <= self.max_total_s


class RetryBudget:
    """Allows retries only while they stay a fraction of recent traffic.

    Over the last ``window_s`` seconds, a retry is allowed while
    ``retries < ratio * requests + min_per_s * window_s``; the floor keeps retries possible at
    low traffic. Call ``record_request()`` for every original request and ``try_spend()``
    before every retry (a True counts the retry). Shared by all deployments of a route or of
    the whole gateway, as the caller chooses. One-second resolution, bounded memory.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        window_s: float = 10.0,
        min_per_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(ratio) and ratio >= 0.0):
            raise ValueError(
                f"ratio is retries per original request, e.g. 0.2; it must be finite and >= 0; "
                f"got {ratio!r}."
            )
        if not (math.isfinite(min_per_s) and min_per_s >= 0.0):
            raise ValueError(
                f"min_per_s is the retries per second always allowed; it must be finite and "
                f">= 0; got {min_per_s!r}."
            )
        self.ratio = ratio
        self.window_s = window_s
        self.min_per_s = min_per_s
        self._clock = clock
        self._counts = WindowCounts(window_s)  # (requests, retries)

    @property
    def requests_in_window(self) -> int:
        return self._counts.totals(self._clock())[0]

    @property
    def retries_in_window(self) -> int:
        return self._counts.totals(self._clock())[1]

    def record_request(self) -> None:
        self._counts.add(self._clock(), first=1)

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one; True means the retry may go."""
        now = self._clock()
        requests, retries = self._counts.totals(now)
        if retries >= self.ratio * requests + self.min_per_s * self.window_s:
            return False
        self._counts.add(now, second=1)
        return True
