"""What must and must not change a cache key."""

from __future__ import annotations

import pytest

from headrace.cache.keys import cache_key, is_deterministic

BASE = {
    "model": "m",
    "messages": [{"role": "user", "content": "hello"}],
    "temperature": 0,
}


def key(body: dict, namespace: str = "team:a", kind: str = "json", model: str = "m") -> str:
    return cache_key(namespace, kind, model, body)


@pytest.mark.parametrize(
    "change",
    [
        {"stream": True},
        {"stream_options": {"include_usage": True}},
        {"user": "alice"},
        {"metadata": {"trace": "1"}},
        {"n": 1},
        {"top_p": 1},
        {"top_p": 1.0},
        {"presence_penalty": 0},
        {"frequency_penalty": 0.0},
        {"seed": None},
        {"store": False},
    ],
)
def test_fields_that_cannot_change_the_answer_do_not_change_the_key(change: dict) -> None:
    assert key({**BASE, **change}) == key(BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "hello!"}]},
        {"messages": [{"role": "system", "content": "be brief"}, *BASE["messages"]]},
        {"temperature": 0.7},
        {"top_p": 0.5},
        {"n": 2},
        {"max_tokens": 10},
        {"seed": 7},
        {"stop": ["\n"]},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"logit_bias": {"1": 5}},
        {"x_vendor_knob": 3},
    ],
)
def test_fields_that_change_the_answer_change_the_key(change: dict) -> None:
    assert key({**BASE, **change}) != key(BASE)


def test_equivalent_spellings_share_a_key() -> None:
    assert key({**BASE, "max_tokens": 5}) == key({**BASE, "max_completion_tokens": 5})
    assert key({**BASE, "stop": "x"}) == key({**BASE, "stop": ["x"]})
    assert key({**BASE, "temperature": 1}) == key(
        {k: v for k, v in BASE.items() if k != "temperature"}
    )
    reordered = {"temperature": 0, "messages": BASE["messages"], "model": "m"}
    assert key(reordered) == key(BASE)


def test_namespace_kind_and_model_separate_entries() -> None:
    assert key(BASE, namespace="team:a") != key(BASE, namespace="team:b")
    assert key(BASE, kind="json") != key(BASE, kind="stream")
    assert key(BASE, model="m") != key(BASE, model="other")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"seed": 1}, True),
        ({"temperature": 0.8, "seed": 3}, True),
        ({}, False),
        ({"temperature": 0.2}, False),
    ],
)
def test_deterministic_requests(body: dict, expected: bool) -> None:
    assert is_deterministic(body) is expected
