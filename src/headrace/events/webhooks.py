"""One webhook delivery attempt, and the wait before the next one.

:meth:`WebhookSender.deliver` is stateless: it builds the event envelope, signs it (Standard
Webhooks), POSTs it once and says what happened, as a :class:`DeliveryAttempt`. It never
raises for a network failure; the durable outbox that calls it records each attempt as the
delivery history, and schedules the next with :func:`next_retry_delay`.

What an answer means (the Standard Webhooks recommendations, made concrete)::

    2xx                                   delivered
    410 Gone                              gone: the receiver asks for no more (final)
    3xx                                   failed: redirects are not followed (final)
    4xx other than 408 and 429            failed: retrying will not help (final)
    408, 429, 5xx, other codes            retry (Retry-After honoured)
    timeout, connection refused or reset  retry
    URL or resolved address refused       failed (final): see headrace.events.ssrf

The body is ``{"id", "type", "created_at", "data"}``; ``id`` is the stable event id, also sent
as ``webhook-id``, so receivers deduplicate at-least-once deliveries on it.
"""

from __future__ import annotations

import asyncio
import enum
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver

from headrace.events.signing import sign
from headrace.events.ssrf import GuardedResolver, UnsafeWebhookUrlError, validate_webhook_url
from headrace.observability.tracing import trace_headers

__all__ = [
    "RESPONSE_SNIPPET_BYTES",
    "DeliveryAttempt",
    "DeliveryOutcome",
    "SessionFactory",
    "WebhookSender",
    "build_envelope",
    "classify_status",
    "next_retry_delay",
]

RESPONSE_SNIPPET_BYTES = 1024
"""How much of a receiver's answer is kept in the delivery history."""

_ERROR_CHARS = 1024
_MAX_EXPONENT = 62  # 2**62 times any sane base is past any cap; keeps the power finite

SessionFactory = Callable[[aiohttp.BaseConnector], aiohttp.ClientSession]
"""Builds the sender's session around the connector it is given. The connector carries the
SSRF guard, so the session must use it and must not route through a proxy
(``trust_env=False``): a proxy would resolve the host where the guard cannot see it."""


class DeliveryOutcome(enum.StrEnum):
    """What one attempt came to. Stored as its value."""

    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"
    GONE = "gone"
    """The receiver answered 410: stop delivering to this URL."""

    @property
    def final(self) -> bool:
        """Whether no further attempt should be made."""
        return self is not DeliveryOutcome.RETRY


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One attempt, as it goes into the delivery history.

    ``status_code`` is None when no HTTP answer came (timeout, connection error, refusal).
    ``error`` says what went wrong, None when delivered. ``response_snippet`` is the start of
    the receiver's body (at most :data:`RESPONSE_SNIPPET_BYTES` bytes, decoded leniently).
    ``retry_after_s`` is the receiver's Retry-After, if it sent one, for
    :func:`next_retry_delay`.
    """

    event_id: str
    outcome: DeliveryOutcome
    attempted_at: datetime
    duration_s: float
    status_code: int | None = None
    error: str | None = None
    response_snippet: str = ""
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.outcome is DeliveryOutcome.DELIVERED


def classify_status(status: int) -> DeliveryOutcome:
    """The outcome of an HTTP answer with ``status`` (see the module docstring's table)."""
    if 200 <= status < 300:
        return DeliveryOutcome.DELIVERED
    if status == 410:
        return DeliveryOutcome.GONE
    if status in (408, 429):
        return DeliveryOutcome.RETRY
    if 300 <= status < 500:
        return DeliveryOutcome.FAILED
    return DeliveryOutcome.RETRY


def build_envelope(
    event_id: str, event_type: str, payload: Mapping[str, object], created_at: datetime
) -> bytes:
    """The JSON body of an event: ``{"id", "type", "created_at", "data"}``, compact UTF-8.

    ``created_at`` is when the event happened (timezone-aware; rendered in UTC with a ``Z``).
    Pass the same value on every retry so that every attempt sends the same bytes.
    """
    if created_at.tzinfo is None:
        raise ValueError("created_at must be timezone-aware (UTC); got a naive datetime.")
    stamp = created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return orjson.dumps(
        {"id": event_id, "type": event_type, "created_at": stamp, "data": dict(payload)}
    )


def next_retry_delay(
    attempt: int,
    *,
    base_s: float = 1.0,
    cap_s: float = 3600.0,
    retry_after_s: float | None = None,
    rng: random.Random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first) before the next.

    Exponential backoff with full jitter: uniform in ``[0, min(cap_s, base_s * 2**(attempt-1))]``,
    which spreads a burst of failures instead of retrying them in step. When the receiver sent
    Retry-After (``retry_after_s``), never sooner than that, but never later than ``cap_s``
    either: a receiver cannot park a delivery beyond the cap. How many attempts, and for how
    long, is the outbox's policy.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1 (the first attempt); got {attempt}.")
    if base_s <= 0 or cap_s < base_s:
        raise ValueError(f"Need 0 < base_s <= cap_s; got base_s={base_s}, cap_s={cap_s}.")
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    delay = rng.uniform(0.0, ceiling)
    if retry_after_s is not None and retry_after_s > 0:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay


def _default_session(connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        # Each request carries its own timeout.
        timeout=aiohttp.ClientTimeout(total=None),
    )


class WebhookSender:
    """Makes single webhook delivery attempts over one pooled session per event loop.

    ``timeout_s`` bounds a whole attempt (connect, send, the answer's headers and snippet);
    Standard Webhooks suggests 15 to 30 s. ``allow_private`` and ``allow_hosts`` are the SSRF
    policy (:mod:`headrace.events.ssrf`; config ``jobs.webhooks.allow_private_targets``), checked
    on the URL before each attempt and on every resolved address at connect time. ``resolver``
    replaces DNS underneath that check (tests). ``clock`` gives the Unix time each attempt is
    signed at. Redirects are never followed.
    """

    def __init__(
        self,
        session_factory: SessionFactory | None = None,
        *,
        timeout_s: float = 15.0,
        allow_private: bool,
        allow_hosts: frozenset[str] = frozenset(),
        resolver: AbstractResolver | None = None,
        user_agent: str = "Headrace-Webhooks/1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive; got {timeout_s}.")
        self._session_factory = session_factory or _default_session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._allow_private = allow_private
        self._allow_hosts = allow_hosts
        self._resolver = resolver
        self._user_agent = user_agent
        self._clock = clock
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    async def deliver(
        self,
        url: str,
        secret: str | Sequence[str],
        event_id: str,
        event_type: str,
        payload: Mapping[str, object],
        *,
        created_at: datetime | None = None,
    ) -> DeliveryAttempt:
        """POST the event to ``url`` once, signed with ``secret`` (several while rotating:
        one signature each); say what happened.

        Network failures, timeouts and SSRF refusals come back as the attempt's outcome, never
        as exceptions. A malformed ``secret`` or ``event_id``, or a payload that is not JSON,
        is a bug and raises :class:`ValueError`/:class:`TypeError`. ``created_at`` is the
        event's time (default now); pass the stored one on retries.
        """
        attempted_at = datetime.now(UTC)
        started = time.perf_counter_ns()

        def attempt(
            outcome: DeliveryOutcome,
            error: str | None,
            *,
            status_code: int | None = None,
            snippet: str = "",
            retry_after_s: float | None = None,
        ) -> DeliveryAttempt:
            return DeliveryAttempt(
                event_id=event_id,
                outcome=outcome,
                attempted_at=attempted_at,
                duration_s=(time.perf_counter_ns() - started) / 1e9,
                status_code=status_code,
                error=error,
                response_snippet=snippet,
                retry_after_s=retry_after_s,
            )

        body = build_envelope(event_id, event_type, payload, created_at or attempted_at)
        headers = sign(secret, event_id, math.floor(self._clock()), body)
        headers["Content-Type"] = "application/json"
        headers["User-Agent"] = self._user_agent
        headers = trace_headers(headers)  # the delivery's span, when tracing is on
        try:
            validate_webhook_url(
                url, allow_private=self._allow_private, allow_hosts=self._allow_hosts
            )
            async with self._session().post(
                url, data=body, headers=headers, allow_redirects=False, timeout=self._timeout
            ) as response:
                status = response.status
                snippet = await _read_snippet(response)
                retry_after_s = _retry_after_s(response.headers.get("Retry-After"), self._clock())
                location = response.headers.get("Location")
        except UnsafeWebhookUrlError as exc:
            return attempt(DeliveryOutcome.FAILED, exc.message)
        except TimeoutError:
            return attempt(DeliveryOutcome.RETRY, f"No answer within {self._timeout_s:g} s.")
        except (aiohttp.ClientError, OSError) as exc:
            return attempt(DeliveryOutcome.RETRY, _describe(exc))

        outcome = classify_status(status)
        return attempt(
            outcome,
            _status_error(status, outcome, location),
            status_code=status,
            snippet=snippet,
            retry_after_s=retry_after_s,
        )

    async def aclose(self) -> None:
        """Close the running loop's session (sessions of other loops close with them)."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None and not session.closed:
            await session.close()

    async def __aenter__(self) -> WebhookSender:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(
                    allow_private=self._allow_private,
                    allow_hosts=self._allow_hosts,
                    inner=self._resolver,
                ),
            )
            session = self._session_factory(connector)
            self._sessions[loop] = session
        return session


async def _read_snippet(response: aiohttp.ClientResponse) -> str:
    """The first :data:`RESPONSE_SNIPPET_BYTES` of the body; the rest is never read."""
    data = bytearray()
    try:
        while len(data) < RESPONSE_SNIPPET_BYTES:
            chunk = await response.content.read(RESPONSE_SNIPPET_BYTES - len(data))
            if not chunk:
                break
            data += chunk
    except (aiohttp.ClientError, OSError, TimeoutError):
        # The status line already arrived and decides the outcome; a body that is cut short
        # or stalls until the attempt's timeout does not change it.
        pass
    return data.decode("utf-8", errors="replace")


def _status_error(status: int, outcome: DeliveryOutcome, location: str | None) -> str | None:
    if outcome is DeliveryOutcome.DELIVERED:
        return None
    if outcome is DeliveryOutcome.GONE:
        return "HTTP 410 Gone: the receiver asks for no more deliveries to this URL."
    if 300 <= status < 400:
        where = f" (to {location[:200]})" if location else ""
        return (
            f"HTTP {status}: the receiver redirects{where}; redirects are not followed, "
            "so set the webhook URL to the final address."
        )
    if outcome is DeliveryOutcome.FAILED:
        return f"HTTP {status}: the receiver refused the delivery; retrying will not help."
    return f"HTTP {status}: the receiver could not take the delivery now; will retry."


def _retry_after_s(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from ``now``: delta-seconds or an HTTP date; None if absent or
    malformed."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    described = f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
    return described[:_ERROR_CHARS]
