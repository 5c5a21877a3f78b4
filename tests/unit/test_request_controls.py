"""controls(): the gateway's request-control headers, read in one pass over the raw headers."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from headrace.api.context import controls
from headrace.domain import CacheControl, Priority
from headrace.errors import InvalidRequestError


def request(*headers: tuple[str, str]) -> Request:
    raw = [(name.lower().encode(), value.encode("latin-1")) for name, value in headers]
    return Request({"type": "http", "headers": [(b"host", b"gw"), *raw]})


def test_no_control_headers_gives_the_defaults() -> None:
    got = controls(request(("Authorization", "Bearer hr_x"), ("Content-Type", "text/plain")))
    assert (got.priority, got.fallbacks, got.cache, dict(got.hints)) == (
        Priority.NORMAL,
        None,
        CacheControl(),
        {},
    )


def test_every_control_is_read_and_other_headrace_headers_are_hints() -> None:
    got = controls(
        request(
            ("X-Headrace-Priority", " High "),
            ("X-Headrace-Fallbacks", "small, , tiny"),
            ("Cache-Control", "no-store, max-age=30"),
            ("X-Headrace-Route", "cheap"),
            ("X-Headrace-Tier", "gold"),
            ("X-Other", "ignored"),
        )
    )
    assert got.priority is Priority.HIGH
    assert got.fallbacks == ("small", "tiny")
    assert got.cache == CacheControl(no_store=True, max_age_s=30.0)
    assert dict(got.hints) == {"x-headrace-route": "cheap", "x-headrace-tier": "gold"}


@pytest.mark.parametrize("value", ["none", "", " , "])
def test_fallbacks_none_or_empty_turn_the_chain_off(value: str) -> None:
    assert controls(request(("X-Headrace-Fallbacks", value))).fallbacks == ()


def test_the_keys_default_priority_applies_unless_the_header_says_otherwise() -> None:
    assert controls(request(), default_priority="low").priority is Priority.LOW
    assert controls(request(), default_priority="bogus").priority is Priority.NORMAL
    header = request(("X-Headrace-Priority", "normal"))
    assert controls(header, default_priority="low").priority is Priority.NORMAL


def test_the_first_of_a_repeated_control_header_counts() -> None:
    got = controls(
        request(
            ("X-Headrace-Priority", "low"),
            ("X-Headrace-Priority", "high"),
            ("Cache-Control", "no-cache"),
            ("Cache-Control", "no-store"),
        )
    )
    assert got.priority is Priority.LOW
    assert got.cache == CacheControl(no_cache=True)


def test_a_bad_priority_is_a_400_naming_the_header() -> None:
    with pytest.raises(InvalidRequestError, match="high, normal or low") as raised:
        controls(request(("X-Headrace-Priority", "urgent")))
    assert raised.value.param == "X-Headrace-Priority"
