"""Per-deployment circuit breaker: stop sending traffic to a deployment that keeps failing.

States and transitions::

    CLOSED ──(failure_threshold consecutive failures, or failure ratio over the window)──► OPEN
    OPEN ──(cooldown_s elapsed; observed lazily)──► HALF_OPEN
    HALF_OPEN ──(successes_to_close probe successes)──► CLOSED (window cleared)
    HALF_OPEN ──(any probe failure)──► OPEN (fresh cooldown)

Independently of the state, ``cool_down(seconds)`` parks the deployment (an upstream 429 with
Retry-After): it is unavailable until then, but no failure is counted and the state stays.

Pure and single-threaded: time comes from the injected ``clock`` (seconds, monotonic), so tests
drive it with a fake. The router calls ``try_acquire()`` before a call and exactly one of
``record_success()``, ``record_failure()`` or ``release()`` after it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker", "WindowCounts"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class WindowCounts:
    """Two counters (``first``, ``second``) summed over a sliding window of ``window_s`` seconds.

    Counts live in one-second buckets, so memory is bounded by ``ceil(window_s) + 1`` buckets
    whatever the traffic, and the window's resolution is one second: a count made at time ``t``
    leaves the window once ``floor(now) - floor(t) >= ceil(window_s)``.
    """

    __slots__ = ("_buckets", "_span")

    def __init__(self, window_s: float) -> None:
        if not (math.isfinite(window_s) and window_s >= 1.0):
            raise ValueError(
                f"window_s must be a finite number of seconds >= 1 (counts are kept in "
                f"one-second buckets); got {window_s!r}."
            )
        self._span = math.ceil(window_s)
        self._buckets: deque[list[int]] = deque()  # [second, first, second] oldest first

    def add(self, now: float, first: int = 0, second: int = 0) -> None:
        """Count ``first``/``second`` at time ``now`` (seconds, same clock as every other call)."""
        sec = math.floor(now)
        self._expire(sec)
        if self._buckets and self._buckets[-1][0] == sec:
            bucket = self._buckets[-1]
            bucket[1] += first
            bucket[2] += second
        else:
            self._buckets.append([sec, first, second])

    def totals(self, now: float) -> tuple[int, int]:
        """``(first, second)`` summed over the window ending at ``now``."""
        self._expire(math.floor(now))
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def clear(self) -> None:
        self._buckets.clear()

    def _expire(self, sec: int) -> None:
        oldest_kept = sec - self._span + 1
        while self._buckets and self._buckets[0][0] < oldest_kept:
            self._buckets.popleft()


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and how it recovers. Durations are seconds.

    The breaker opens on ``failure_threshold`` consecutive failures, or when over the last
    ``window_s`` seconds at least ``min_requests`` calls finished and failures/calls reached
    ``failure_ratio``. After ``cooldown_s`` it lets ``half_open_probes`` concurrent probe calls
    through; ``successes_to_close`` probe successes close it, one probe failure reopens it.
    """

    failure_threshold: int = 5
    failure_ratio: float = 0.5
    window_s: float = 30.0
    min_requests: int = 10
    cooldown_s: float = 15.0
    half_open_probes: int = 1
    successes_to_close: int = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.failure_threshold < 1:
            problems.append(
                f"failure_threshold must be >= 1 consecutive failures; got "
                f"{self.failure_threshold}. Use a large number to rely on the ratio alone."
            )
        if not (0.0 < self.failure_ratio <= 1.0):
            problems.append(
                f"failure_ratio must be in (0, 1], e.g. 0.5 for half the calls failing; "
                f"got {self.failure_ratio!r}."
            )
        if not (math.isfinite(self.window_s) and self.window_s >= 1.0):
            problems.append(
                f"window_s must be a finite number of seconds >= 1; got {self.window_s!r}."
            )
        if self.min_requests < 1:
            problems.append(
                f"min_requests must be >= 1 so a single failure cannot trip the ratio; "
                f"got {self.min_requests}."
            )
        if not (math.isfinite(self.cooldown_s) and self.cooldown_s >= 0.0):
            problems.append(
                f"cooldown_s must be a finite number of seconds >= 0; got {self.cooldown_s!r}."
            )
        if self.half_open_probes < 1:
            problems.append(
                f"half_open_probes must be >= 1 or a breaker could never close; "
                f"got {self.half_open_probes}."
            )
        if self.successes_to_close < 1:
            problems.append(f"successes_to_close must be >= 1; got {self.successes_to_close}.")
        if problems:
            raise ValueError("Invalid breaker config: " + " ".join(problems))


class CircuitBreaker:
    """The breaker of one deployment, named ``name`` (passed to ``on_change``).

    ``on_change(name, old, new)`` is called after every state change, in order, with the new
    state already in effect. Results recorded while OPEN come from calls started before it
    opened; they are ignored. Results recorded while HALF_OPEN are taken as probe results even
    if the call started earlier: a probe slot never goes below zero, so at worst one extra probe
    is let through.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._window = WindowCounts(config.window_s)  # (calls, failures)
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probes_out = 0
        self._probe_successes = 0
        self._available_at = -math.inf

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose cooldown elapsed becomes HALF_OPEN here."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() >= self._opened_at + self.config.cooldown_s
        ):
            self._probes_out = 0
            self._probe_successes = 0
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    @property
    def available_at(self) -> float:
        """Clock time (seconds) until which ``cool_down`` parks the deployment; -inf if never."""
        return self._available_at

    @property
    def is_cooling_down(self) -> bool:
        return self._clock() < self._available_at

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    def available(self) -> bool:
        """Whether ``try_acquire()`` would succeed now, without acquiring anything."""
        if self.is_cooling_down:
            return False
        state = self.state
        if state is BreakerState.HALF_OPEN:
            return self._probes_out < self.config.half_open_probes
        return state is BreakerState.CLOSED

    def try_acquire(self) -> bool:
        """Ask to send one call. CLOSED: yes; OPEN: no; HALF_OPEN: yes while fewer than
        ``half_open_probes`` probes are outstanding, and the call then counts as a probe.
        Also no while cooling down. A True must be followed by exactly one record/release.
        """
        if not self.available():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._probes_out += 1
        return True

    def record_success(self) -> None:
        """The call succeeded. Half-open: enough probe successes close the breaker."""
        state = self.state
        if state is BreakerState.CLOSED:
            self._consecutive_failures = 0
            self._window.add(self._clock(), first=1)
        elif state is BreakerState.HALF_OPEN:
            self._release_probe()
            self._probe_successes += 1
            if self._probe_successes >= self.config.successes_to_close:
                self._window.clear()
                self._consecutive_failures = 0
                self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """The call failed in a way that blames the deployment (5xx, timeout, connect error)."""
        state = self.state
        if state is BreakerState.CLOSED:
            now = self._clock()
            self._consecutive_failures += 1
            self._window.add(now, first=1, second=1)
            if self._should_open(now):
                self._open(now)
        elif state is BreakerState.HALF_OPEN:
            self._release_probe()
            self._open(self._clock())

    def release(self) -> None:
        """The call ended neither as success nor failure (cancelled, the client's own error):
        free its probe slot, if any, without counting anything."""
        if self.state is BreakerState.HALF_OPEN:
            self._release_probe()

    def cool_down(self, seconds: float) -> None:
        """Park the deployment for ``seconds`` from now (upstream 429 + Retry-After).

        Counts no failure and changes no state; a later, shorter cool-down never shortens an
        earlier, longer one.
        """
        if not (math.isfinite(seconds) and seconds >= 0.0):
            raise ValueError(
                f"cool_down takes a finite number of seconds >= 0; got {seconds!r}. "
                "Cap Retry-After values before passing them."
            )
        self._available_at = max(self._available_at, self._clock() + seconds)

    def _should_open(self, now: float) -> bool:
        if self._consecutive_failures >= self.config.failure_threshold:
            return True
        calls, failures = self._window.totals(now)
        return calls >= self.config.min_requests and failures >= self.config.failure_ratio * calls

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._probes_out = 0
        self._probe_successes = 0
        self._consecutive_failures = 0
        self._transition(BreakerState.OPEN)

    def _release_probe(self) -> None:
        self._probes_out = max(0, self._probes_out - 1)

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if self._on_change is not None and old is not new:
            self._on_change(self.name, old, new)
