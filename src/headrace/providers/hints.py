"""What an upstream says about its rate limits, read from its response headers.

OpenAI's ``x-ratelimit-remaining-requests`` / ``-tokens`` and ``x-ratelimit-reset-requests``
/ ``-tokens`` (Go-style durations such as ``6m0s``), ``retry-after-ms`` and ``Retry-After``
(seconds or an HTTP date). The router skips a deployment whose quota is used up until it
resets, and cools one down for Retry-After after a 429.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["RateLimitHints", "exhausted_for_s", "parse_rate_limit_hints"]


@dataclass(frozen=True)
class RateLimitHints:
    """What an upstream said about its rate limits. Durations are seconds; None = not said."""

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None

    @property
    def exhausted_for_s(self) -> float | None:
        """Seconds to skip the deployment because a quota is used up, or None if none is (or
        it is but the upstream did not say when it resets). Both exhausted: the later reset."""
        waits: list[float] = []
        if self.remaining_requests == 0 and self.reset_requests_s is not None:
            waits.append(self.reset_requests_s)
        if self.remaining_tokens == 0 and self.reset_tokens_s is not None:
            waits.append(self.reset_tokens_s)
        return max(waits) if waits else None


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_rate_limit_hints(
    headers: Mapping[str, str], *, now: float | None = None
) -> RateLimitHints:
    """Read rate-limit headers (names matched case-insensitively); malformed values are
    ignored, never raised. ``now`` is the wall-clock Unix time (seconds) that an HTTP-date
    Retry-After is measured from; default ``time.time()``. ``retry-after-ms`` wins over
    ``Retry-After``, as in OpenAI's own SDK."""
    lower = {name.lower(): value.strip() for name, value in headers.items()}
    retry_after_s = _parse_seconds(lower.get("retry-after-ms"), scale=0.001)
    if retry_after_s is None:
        retry_after_s = _parse_retry_after(lower.get("retry-after"), now)
    return RateLimitHints(
        remaining_requests=_parse_count(lower.get("x-ratelimit-remaining-requests")),
        remaining_tokens=_parse_count(lower.get("x-ratelimit-remaining-tokens")),
        reset_requests_s=_parse_duration(lower.get("x-ratelimit-reset-requests")),
        reset_tokens_s=_parse_duration(lower.get("x-ratelimit-reset-tokens")),
        retry_after_s=retry_after_s,
    )


def exhausted_for_s(headers: Mapping[str, str]) -> float | None:
    """``parse_rate_limit_hints(headers).exhausted_for_s``, read on every answer: the two
    ``x-ratelimit-remaining-*`` headers first, and the rest only when one of them is 0, so
    the usual answer costs two lookups (aiohttp's headers match names case-insensitively;
    another mapping is lowercased first)."""
    if not isinstance(headers, CIMultiDict | CIMultiDictProxy):
        headers = {name.lower(): value for name, value in headers.items()}
    for name in ("x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"):
        value = headers.get(name)
        if value is not None and _parse_count(value.strip()) == 0:
            return parse_rate_limit_hints(headers).exhausted_for_s
    return None


def _parse_count(value: str | None) -> int | None:
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return int(value)


def _parse_seconds(value: str | None, *, scale: float = 1.0) -> float | None:
    """A plain non-negative number times ``scale``, or None."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0.0:
        return None
    return number * scale


def _parse_duration(value: str | None) -> float | None:
    """Go-style durations (``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``) or plain seconds."""
    if value is None:
        return None
    if _DURATION.fullmatch(value):
        return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(value))
    return _parse_seconds(value)


def _parse_retry_after(value: str | None, now: float | None) -> float | None:
    """Retry-After as delay-seconds or an HTTP-date (RFC 9110 section 10.2.3)."""
    if value is None:
        return None
    seconds = _parse_seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; the parser leaves "-0000" naive
        when = when.replace(tzinfo=UTC)
    reference = time.time() if now is None else now
    return max(0.0, when.timestamp() - reference)
