import random
from collections import Counter

import pytest

from headrace.routing.strategies import (
    STRATEGIES,
    Candidate,
    CostFirst,
    Ewma,
    LatencyAware,
    LeastInFlight,
    RoundRobin,
    WeightedRandom,
    make_strategy,
)


def candidates(*names: str, **per_name: dict[str, float]) -> list[Candidate]:
    return [
        Candidate(name=name, order=i, **per_name.get(name, {}))  # type: ignore[arg-type]
        for i, name in enumerate(names)
    ]


def names(ordered: list[Candidate]) -> list[str]:
    return [c.name for c in ordered]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_returns_every_candidate_once(name: str) -> None:
    strategy = make_strategy(name)
    rng = random.Random(1)
    pool = candidates("a", "b", "c", "d")
    for _ in range(20):
        assert sorted(names(strategy.order(pool, rng))) == ["a", "b", "c", "d"]
    assert strategy.order([], rng) == []
    assert names(strategy.order(pool[:1], rng)) == ["a"]


def test_unknown_strategy_lists_known_names() -> None:
    with pytest.raises(ValueError, match="Use one of: cost_first, latency_aware") as info:
        make_strategy("fastest")
    assert "'fastest'" in str(info.value)


def test_make_strategy_gives_fresh_instances() -> None:
    assert make_strategy("round_robin") is not make_strategy("round_robin")


def test_weighted_random_primary_follows_weights() -> None:
    pool = candidates("a", "b", "c", a={"weight": 1}, b={"weight": 3}, c={"weight": 6})
    rng = random.Random(1234)
    n = 20_000
    firsts = Counter(WeightedRandom().order(pool, rng)[0].name for _ in range(n))
    assert firsts["a"] / n == pytest.approx(0.1, abs=0.01)
    assert firsts["b"] / n == pytest.approx(0.3, abs=0.015)
    assert firsts["c"] / n == pytest.approx(0.6, abs=0.015)


def test_weighted_random_second_is_sampled_among_the_rest() -> None:
    pool = candidates("a", "b", "c", a={"weight": 1}, b={"weight": 1}, c={"weight": 1000})
    rng = random.Random(5)
    seconds = Counter(
        names(WeightedRandom().order(pool, rng))[1:] == ["a", "b"] for _ in range(4000)
    )
    assert seconds[True] / 4000 == pytest.approx(0.5, abs=0.05)


def test_weighted_random_puts_zero_weight_last_in_config_order() -> None:
    pool = candidates("z1", "a", "z2", z1={"weight": 0}, z2={"weight": 0})
    rng = random.Random(0)
    for _ in range(50):
        assert names(WeightedRandom().order(pool, rng)) == ["a", "z1", "z2"]


def test_round_robin_cycles_by_name() -> None:
    rr = RoundRobin()
    rng = random.Random(0)
    pool = candidates("c", "a", "b")
    orders = [names(rr.order(pool, rng)) for _ in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_round_robin_is_stable_when_deployments_come_and_go() -> None:
    rr = RoundRobin()
    rng = random.Random(0)
    a, b, c = candidates("a", "b", "c")
    assert rr.order([a, b, c], rng)[0].name == "a"
    assert rr.order([a, c], rng)[0].name == "c"  # b is down: the next after a is c
    assert rr.order([a, b, c], rng)[0].name == "a"
    assert rr.order([a, b, c], rng)[0].name == "b"


def test_least_in_flight_picks_the_idlest() -> None:
    pool = candidates(
        "busy",
        "idle",
        "half",
        "unbounded",
        busy={"in_flight": 9, "max_concurrency": 10},
        idle={"in_flight": 0, "max_concurrency": 10},
        half={"in_flight": 5, "max_concurrency": 10},
        unbounded={"in_flight": 2},
    )
    assert names(LeastInFlight().order(pool, random.Random(0))) == [
        "idle",
        "half",
        "busy",
        "unbounded",
    ]


def test_least_in_flight_breaks_ties_at_random() -> None:
    pool = candidates("a", "b", "c")
    rng = random.Random(9)
    firsts = Counter(LeastInFlight().order(pool, rng)[0].name for _ in range(3000))
    assert set(firsts) == {"a", "b", "c"}
    assert min(firsts.values()) > 800


def test_latency_aware_prefers_lower_ewma_most_of_the_time() -> None:
    pool = candidates(
        "fast",
        "mid",
        "slow",
        fast={"ewma_latency_s": 0.1},
        mid={"ewma_latency_s": 0.5},
        slow={"ewma_latency_s": 2.0},
    )
    rng = random.Random(11)
    n = 9000
    firsts = Counter(LatencyAware().order(pool, rng)[0].name for _ in range(n))
    # Two of three drawn: fast wins whenever drawn (2/3), mid only against slow (1/3).
    assert firsts["fast"] / n == pytest.approx(2 / 3, abs=0.02)
    assert firsts["mid"] / n == pytest.approx(1 / 3, abs=0.02)
    assert firsts["slow"] == 0


def test_latency_aware_orders_the_rest_unknown_first_then_by_ewma() -> None:
    pool = candidates(
        "a",
        "b",
        "c",
        "d",
        a={"ewma_latency_s": 3},
        b={"ewma_latency_s": 1},
        d={"ewma_latency_s": 2},
    )
    full = ["c", "b", "d", "a"]  # c has no latency yet
    rng = random.Random(2)
    for _ in range(50):
        ordered = names(LatencyAware().order(pool, rng))
        assert ordered[0] != "a"  # the slowest never wins a draw of two
        assert ordered[1:] == [n for n in full if n != ordered[0]]


def test_latency_aware_probes_unknown_latency() -> None:
    pool = candidates(
        "fast", "new", "slow", fast={"ewma_latency_s": 0.01}, slow={"ewma_latency_s": 1.0}
    )
    rng = random.Random(4)
    firsts = Counter(LatencyAware().order(pool, rng)[0].name for _ in range(3000))
    assert firsts["new"] / 3000 == pytest.approx(2 / 3, abs=0.03)
    assert firsts["slow"] == 0


def test_cost_first_orders_by_price_then_config_order() -> None:
    pool = candidates(
        "dear",
        "cheap",
        "mid",
        "cheap2",
        dear={"cost_per_mtok_micro_usd": 30_000_000},
        cheap={"cost_per_mtok_micro_usd": 750_000},
        mid={"cost_per_mtok_micro_usd": 5_000_000},
        cheap2={"cost_per_mtok_micro_usd": 750_000},
    )
    assert names(CostFirst().order(pool, random.Random(0))) == ["cheap", "cheap2", "mid", "dear"]


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [({"weight": -1.0}, "weight must be"), ({"max_concurrency": 0}, "max_concurrency must be")],
)
def test_candidate_validation(kwargs: dict[str, float], hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        Candidate(name="x", order=0, **kwargs)  # type: ignore[arg-type]


def test_ewma() -> None:
    ewma = Ewma(alpha=0.5)
    assert ewma.value is None
    assert ewma.update(1.0) == 1.0
    assert ewma.update(3.0) == 2.0
    ewma.update(2.0)
    assert ewma.value == 2.0
    with pytest.raises(ValueError, match="finite"):
        ewma.update(float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        Ewma(alpha=0.0)
