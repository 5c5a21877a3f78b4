import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from headrace.providers.hints import RateLimitHints, exhausted_for_s, parse_rate_limit_hints
from headrace.routing.retry import RetryBudget, RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("retry_number", "ceiling"), [(0, 0.05), (1, 0.1), (3, 0.4), (10, 2.0)])
def test_full_jitter_stays_within_bounds_and_spreads(retry_number: int, ceiling: float) -> None:
    policy = RetryPolicy(base_delay_s=0.05, max_delay_s=2.0)
    rng = random.Random(7)
    delays = [policy.delay_s(retry_number, rng) for _ in range(5000)]
    assert all(0.0 <= d <= ceiling for d in delays)
    mean = sum(delays) / len(delays)
    assert mean == pytest.approx(ceiling / 2, rel=0.05)  # uniform over [0, ceiling]
    assert min(delays) < ceiling * 0.05
    assert max(delays) > ceiling * 0.95


def test_huge_retry_numbers_do_not_overflow() -> None:
    assert RetryPolicy().delay_s(10_000, random.Random(1)) <= 2.0


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(base_delay_s=0.05, max_delay_s=2.0)
    rng = random.Random(3)
    assert policy.delay_s(0, rng, retry_after_s=7.5) == 7.5  # past max_delay_s too
    delays = [policy.delay_s(5, rng, retry_after_s=0.5) for _ in range(1000)]
    assert all(0.5 <= d <= 1.6 for d in delays)
    assert any(d > 0.5 for d in delays)


def test_delay_is_deterministic_for_a_seed() -> None:
    policy = RetryPolicy()
    a = [policy.delay_s(n, random.Random(42)) for n in range(5)]
    b = [policy.delay_s(n, random.Random(42)) for n in range(5)]
    assert a == b


def test_negative_retry_number_is_an_error() -> None:
    with pytest.raises(ValueError, match="starts at 0"):
        RetryPolicy().delay_s(-1, random.Random(0))


def test_may_retry_caps_attempts_and_total_time() -> None:
    policy = RetryPolicy(max_attempts=3, max_total_s=10.0)
    assert policy.may_retry(1, 0.0, 0.1)
    assert policy.may_retry(2, 5.0, 5.0)
    assert not policy.may_retry(3, 0.0, 0.0)  # third attempt was the last
    assert not policy.may_retry(2, 5.0, 5.1)  # the wait would pass max_total_s
    assert not RetryPolicy(max_attempts=1).may_retry(1, 0.0, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"max_attempts": 0}, "1 disables retries"),
        ({"base_delay_s": -1.0}, "base_delay_s"),
        ({"base_delay_s": 3.0, "max_delay_s": 2.0}, "max_delay_s must be finite and >="),
        ({"max_total_s": 0.0}, "max_total_s"),
    ],
)
def test_policy_validation_says_how_to_fix(kwargs: dict[str, float], hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_budget_caps_retries_at_ratio_plus_floor() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, window_s=10, min_per_s=0.5, clock=clock)
    for _ in range(100):
        budget.record_request()
    # 0.2 * 100 + 0.5 * 10 = 25 retries in the window
    spent = sum(budget.try_spend() for _ in range(40))
    assert spent == 25
    assert budget.retries_in_window == 25
    assert budget.requests_in_window == 100


def test_budget_floor_allows_retries_without_traffic() -> None:
    budget = RetryBudget(ratio=0.2, window_s=10, min_per_s=0.3, clock=Clock())
    assert sum(budget.try_spend() for _ in range(10)) == 3


def test_budget_recovers_as_the_window_slides() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, window_s=10, min_per_s=0.2, clock=clock)
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    clock.now += 5
    assert not budget.try_spend()
    clock.now += 5  # the first two retries leave the 10 s window
    assert budget.retries_in_window == 0
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]


def test_budget_memory_is_bounded() -> None:
    clock = Clock()
    budget = RetryBudget(window_s=5, clock=clock)
    for _ in range(10_000):
        budget.record_request()
        clock.now += 0.01
    assert budget.requests_in_window <= 600
    assert len(budget._counts._buckets) <= 6


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [({"ratio": -0.1}, "ratio"), ({"min_per_s": -1.0}, "min_per_s"), ({"window_s": 0.2}, ">= 1")],
)
def test_budget_validation(kwargs: dict[str, float], hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, RateLimitHints()),
        (
            {
                "x-ratelimit-remaining-requests": "59",
                "x-ratelimit-remaining-tokens": "149984",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-reset-tokens": "6m0s",
            },
            RateLimitHints(59, 149984, 1.0, 360.0, None),
        ),
        ({"X-RateLimit-Reset-Tokens": "20ms"}, RateLimitHints(reset_tokens_s=0.02)),
        ({"x-ratelimit-reset-requests": "1h2m3.5s"}, RateLimitHints(reset_requests_s=3723.5)),
        ({"x-ratelimit-reset-requests": "2.5"}, RateLimitHints(reset_requests_s=2.5)),
        ({"x-ratelimit-reset-requests": "soon"}, RateLimitHints()),
        ({"x-ratelimit-remaining-requests": "-1"}, RateLimitHints()),
        ({"x-ratelimit-remaining-tokens": "lots"}, RateLimitHints()),
        ({"Retry-After": "12"}, RateLimitHints(retry_after_s=12.0)),
        ({"retry-after": " 1.5 "}, RateLimitHints(retry_after_s=1.5)),
        ({"Retry-After": "-3"}, RateLimitHints()),
        ({"retry-after-ms": "250"}, RateLimitHints(retry_after_s=0.25)),
        ({"retry-after-ms": "250", "Retry-After": "9"}, RateLimitHints(retry_after_s=0.25)),
        ({"retry-after-ms": "x", "Retry-After": "9"}, RateLimitHints(retry_after_s=9.0)),
        (
            {"Retry-After": format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True)},
            RateLimitHints(retry_after_s=30.0),
        ),
        ({"Retry-After": "Thu, 02 Jan 2025 03:03:00 GMT"}, RateLimitHints(retry_after_s=0.0)),
        ({"Retry-After": "Thu, 02 Jan 2025 03:04:15 -0000"}, RateLimitHints(retry_after_s=10.0)),
        ({"Retry-After": "tomorrow"}, RateLimitHints()),
    ],
)
def test_parse_rate_limit_hints(headers: dict[str, str], expected: RateLimitHints) -> None:
    assert parse_rate_limit_hints(headers, now=NOW) == expected


@pytest.mark.parametrize(
    ("hints", "expected"),
    [
        (RateLimitHints(), None),
        (RateLimitHints(remaining_requests=3, reset_requests_s=5.0), None),
        (RateLimitHints(remaining_requests=0, reset_requests_s=5.0), 5.0),
        (RateLimitHints(remaining_tokens=0, reset_tokens_s=60.0, reset_requests_s=1.0), 60.0),
        (
            RateLimitHints(
                remaining_requests=0, remaining_tokens=0, reset_requests_s=2.0, reset_tokens_s=1.0
            ),
            2.0,
        ),
        (RateLimitHints(remaining_requests=0), None),  # exhausted but no reset given
    ],
)
def test_exhausted_for_s(hints: RateLimitHints, expected: float | None) -> None:
    assert hints.exhausted_for_s == expected


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-requests": "1s"},
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"},
        {"X-RateLimit-Remaining-Tokens": " 0 ", "X-RateLimit-Reset-Tokens": "6m0s"},
        {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-remaining-tokens": "00",
            "x-ratelimit-reset-requests": "2s",
            "x-ratelimit-reset-tokens": "1s",
        },
        {"x-ratelimit-remaining-requests": "0"},  # exhausted, no reset given
        {"x-ratelimit-remaining-tokens": "lots", "x-ratelimit-reset-tokens": "1s"},
        {"x-ratelimit-remaining-requests": "-0", "x-ratelimit-reset-requests": "1s"},
    ],
)
def test_exhausted_for_s_from_headers_agrees_with_the_full_parse(headers: dict[str, str]) -> None:
    expected = parse_rate_limit_hints(headers).exhausted_for_s
    assert exhausted_for_s(headers) == expected
    assert exhausted_for_s(CIMultiDictProxy(CIMultiDict(headers))) == expected
