import pytest

from headrace.routing.breaker import BreakerConfig, BreakerState, CircuitBreaker, WindowCounts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Change = tuple[str, BreakerState, BreakerState]


def make(clock: Clock, **overrides: float) -> tuple[CircuitBreaker, list[Change]]:
    changes: list[Change] = []
    config = BreakerConfig(**overrides)  # type: ignore[arg-type]
    breaker = CircuitBreaker("dep-a", config, clock=clock, on_change=lambda *c: changes.append(c))
    return breaker, changes


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.try_acquire()
        breaker.record_failure()


def succeed(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.try_acquire()
        breaker.record_success()


def test_consecutive_failures_open_the_breaker() -> None:
    clock = Clock()
    breaker, changes = make(clock, failure_threshold=3)
    fail(breaker, 2)
    succeed(breaker, 1)  # resets the streak
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.available()
    assert not breaker.try_acquire()
    assert changes == [("dep-a", BreakerState.CLOSED, BreakerState.OPEN)]


def test_failure_ratio_over_window_opens_with_enough_requests() -> None:
    clock = Clock()
    breaker, _ = make(clock, failure_threshold=100, failure_ratio=0.5, min_requests=10)
    for _ in range(4):
        succeed(breaker, 1)
        fail(breaker, 1)
        clock.now += 1
    succeed(breaker, 1)
    assert breaker.state is BreakerState.CLOSED  # 4 failures / 9 calls
    fail(breaker, 1)  # 5 / 10
    assert breaker.state is BreakerState.OPEN


def test_ratio_does_not_open_below_min_requests() -> None:
    clock = Clock()
    breaker, changes = make(clock, failure_threshold=100, min_requests=10)
    fail(breaker, 9)
    assert breaker.state is BreakerState.CLOSED
    assert changes == []


def test_old_failures_leave_the_window() -> None:
    clock = Clock()
    breaker, _ = make(clock, failure_threshold=100, window_s=30, min_requests=10)
    fail(breaker, 9)
    clock.now += 30  # those nine are now outside the 30 s window
    succeed(breaker, 9)
    fail(breaker, 1)  # 1 failure / 10 calls in the window
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 7)  # 8 / 17
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 1)  # 9 / 18
    assert breaker.state is BreakerState.OPEN


def test_open_rejects_until_cooldown_then_half_opens() -> None:
    clock = Clock()
    breaker, changes = make(clock, failure_threshold=1, cooldown_s=15)
    fail(breaker, 1)
    clock.now += 14.9
    assert breaker.state is BreakerState.OPEN
    assert not breaker.try_acquire()
    clock.now += 0.1
    assert breaker.available()
    assert breaker.state is BreakerState.HALF_OPEN
    assert changes == [
        ("dep-a", BreakerState.CLOSED, BreakerState.OPEN),
        ("dep-a", BreakerState.OPEN, BreakerState.HALF_OPEN),
    ]


@pytest.mark.parametrize("probes", [1, 3])
def test_half_open_allows_exactly_n_concurrent_probes(probes: int) -> None:
    clock = Clock()
    breaker, _ = make(clock, failure_threshold=1, cooldown_s=5, half_open_probes=probes)
    fail(breaker, 1)
    clock.now += 5
    assert [breaker.try_acquire() for _ in range(probes + 2)] == [True] * probes + [False] * 2
    assert not breaker.available()
    breaker.release()  # a cancelled probe frees its slot without counting
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.available()
    assert breaker.try_acquire()
    assert not breaker.try_acquire()


def test_probe_successes_close_and_clear_the_window() -> None:
    clock = Clock()
    breaker, changes = make(
        clock, failure_threshold=2, cooldown_s=5, half_open_probes=2, successes_to_close=2
    )
    fail(breaker, 2)
    clock.now += 5
    assert breaker.try_acquire()
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    fail(breaker, 1)  # the failures before opening no longer count
    assert breaker.state is BreakerState.CLOSED
    assert [new for _, _, new in changes] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_probe_failure_reopens_with_a_fresh_cooldown() -> None:
    clock = Clock()
    breaker, changes = make(clock, failure_threshold=1, cooldown_s=10)
    fail(breaker, 1)
    clock.now += 10
    assert breaker.try_acquire()
    clock.now += 3
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 9.9
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert [(old, new) for _, old, new in changes] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
    ]


def test_results_of_calls_started_before_opening_are_ignored() -> None:
    clock = Clock()
    breaker, _ = make(clock, failure_threshold=1, cooldown_s=10)
    assert breaker.try_acquire()  # a slow call still in flight
    fail(breaker, 1)
    breaker.record_success()
    assert breaker.state is BreakerState.OPEN


def test_cool_down_parks_without_counting_or_changing_state() -> None:
    clock = Clock()
    breaker, changes = make(clock, failure_threshold=1)
    breaker.cool_down(20)
    assert breaker.is_cooling_down
    assert breaker.available_at == 1020
    assert not breaker.available()
    assert not breaker.try_acquire()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    breaker.cool_down(5)  # a shorter cool-down does not shorten the longer one
    assert breaker.available_at == 1020
    clock.now += 20
    assert not breaker.is_cooling_down
    assert breaker.available()
    assert changes == []


def test_cool_down_rejects_nonsense() -> None:
    breaker, _ = make(Clock())
    with pytest.raises(ValueError, match="Cap Retry-After"):
        breaker.cool_down(float("inf"))
    with pytest.raises(ValueError, match=">= 0"):
        breaker.cool_down(-1)


def test_release_while_closed_counts_nothing() -> None:
    breaker, _ = make(Clock(), failure_threshold=1)
    assert breaker.try_acquire()
    breaker.release()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("failure_threshold", 0, "failure_threshold must be >= 1"),
        ("failure_ratio", 0.0, "failure_ratio must be in"),
        ("failure_ratio", 1.5, "failure_ratio must be in"),
        ("window_s", 0.5, "window_s must be"),
        ("min_requests", 0, "min_requests must be >= 1"),
        ("cooldown_s", -1.0, "cooldown_s must be"),
        ("half_open_probes", 0, "half_open_probes must be >= 1"),
        ("successes_to_close", 0, "successes_to_close must be >= 1"),
    ],
)
def test_config_validation_says_how_to_fix(field: str, value: float, hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        BreakerConfig(**{field: value})  # type: ignore[arg-type]


def test_window_counts_memory_is_bounded() -> None:
    window = WindowCounts(10)
    for second in range(1000):
        window.add(float(second), first=1, second=second % 2)
    assert window.totals(999.5) == (10, 5)
    assert len(window._buckets) <= 11
    assert window.totals(2000.0) == (0, 0)
