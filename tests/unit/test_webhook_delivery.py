"""One webhook delivery attempt against a real local receiver that verifies every signature,
how each answer is classified, the connect-time SSRF refusal, and the backoff between tries."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import aiohttp
import orjson
import pytest
from aiohttp import web

from headrace.events.signing import WebhookVerificationError, new_secret, verify
from headrace.events.ssrf import StaticResolver, resolve_and_check
from headrace.events.webhooks import (
    RESPONSE_SNIPPET_BYTES,
    DeliveryAttempt,
    DeliveryOutcome,
    WebhookSender,
    build_envelope,
    classify_status,
    next_retry_delay,
)
from tests.fakes import serve
from tests.sockets import free_port

SECRET = new_secret()
EVENT_ID = "evt_0123456789abcdef"
CREATED_AT = datetime(2026, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)
PAYLOAD = {"job_id": "job_42", "status": "completed", "usage": {"total_tokens": 17}}


@dataclass(frozen=True)
class Reply:
    status: int = 204
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    hang: bool = False
    stall_after: bytes | None = None
    """Send the status line and these body bytes, then stall until the test ends."""


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    verification_error: str | None


@dataclass
class Receiver:
    """A webhook endpoint: verifies each delivery with :func:`verify`, records it, and answers
    with the next scripted :class:`Reply` (204 once the script runs out)."""

    secret: str
    url: str = ""
    script: list[Reply] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        return app

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            verify(self.secret, request.headers, body)
            error = None
        except WebhookVerificationError as exc:
            error = str(exc)
        self.received.append(Received(dict(request.headers), body, error))
        reply = self.script.pop(0) if self.script else Reply()
        if reply.hang:
            await asyncio.wait_for(self.release.wait(), timeout=10)
        if reply.stall_after is not None:
            response = web.StreamResponse(status=reply.status)
            await response.prepare(request)
            await response.write(reply.stall_after)
            await asyncio.wait_for(self.release.wait(), timeout=10)
            return response
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver(secret=SECRET)
    async with serve(receiver.app()) as url:
        receiver.url = url + "/hook"
        yield receiver
        receiver.release.set()  # let a hanging handler finish so the server can stop


@pytest.fixture
async def sender() -> AsyncIterator[WebhookSender]:
    async with WebhookSender(timeout_s=5.0, allow_private=True) as sender:
        yield sender


async def send(sender: WebhookSender, url: str, *, event_id: str = EVENT_ID) -> DeliveryAttempt:
    return await sender.deliver(
        url, SECRET, event_id, "job.completed", PAYLOAD, created_at=CREATED_AT
    )


async def test_2xx_is_delivered_signed_and_verifiable(
    receiver: Receiver, sender: WebhookSender
) -> None:
    receiver.script.append(Reply(200, b'{"ok":true}'))
    attempt = await sender.deliver(
        receiver.url, SECRET, EVENT_ID, "job.completed", PAYLOAD, created_at=CREATED_AT
    )

    assert attempt.outcome is DeliveryOutcome.DELIVERED
    assert attempt.delivered
    assert attempt.outcome.final
    assert attempt.status_code == 200
    assert attempt.error is None
    assert attempt.response_snippet == '{"ok":true}'
    assert attempt.event_id == EVENT_ID
    assert 0 < attempt.duration_s < 5
    assert attempt.attempted_at.tzinfo is not None

    [got] = receiver.received
    assert got.verification_error is None
    assert got.headers["webhook-id"] == EVENT_ID
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"].startswith("Headrace-Webhooks/")
    assert orjson.loads(got.body) == {
        "id": EVENT_ID,
        "type": "job.completed",
        "created_at": "2026-05-01T12:30:15.250000Z",
        "data": PAYLOAD,
    }


async def test_the_reference_library_accepts_a_real_delivery(
    receiver: Receiver, sender: WebhookSender
) -> None:
    standardwebhooks = pytest.importorskip("standardwebhooks")
    await send(sender, receiver.url)
    [got] = receiver.received
    assert standardwebhooks.Webhook(SECRET).verify(got.body, got.headers)["id"] == EVENT_ID


async def test_500_is_retried_with_the_same_event_id_and_body(
    receiver: Receiver, sender: WebhookSender
) -> None:
    receiver.script += [Reply(500, b"database is down"), Reply(202)]

    first = await sender.deliver(
        receiver.url, SECRET, EVENT_ID, "job.completed", PAYLOAD, created_at=CREATED_AT
    )
    assert first.outcome is DeliveryOutcome.RETRY
    assert not first.outcome.final
    assert first.status_code == 500
    assert first.error is not None
    assert "HTTP 500" in first.error
    assert first.response_snippet == "database is down"
    delay = next_retry_delay(1, retry_after_s=first.retry_after_s, rng=random.Random(7))
    assert 0 <= delay <= 1

    second = await sender.deliver(
        receiver.url, SECRET, EVENT_ID, "job.completed", PAYLOAD, created_at=CREATED_AT
    )
    assert second.outcome is DeliveryOutcome.DELIVERED
    assert second.status_code == 202

    a, b = receiver.received
    assert a.verification_error is None
    assert b.verification_error is None
    assert a.headers["webhook-id"] == b.headers["webhook-id"] == EVENT_ID
    assert a.body == b.body


async def test_410_gone_is_final(receiver: Receiver, sender: WebhookSender) -> None:
    receiver.script.append(Reply(410, b"unsubscribed"))
    attempt = await send(sender, receiver.url)
    assert attempt.outcome is DeliveryOutcome.GONE
    assert attempt.outcome.final
    assert attempt.status_code == 410
    assert "no more deliveries" in (attempt.error or "")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (400, DeliveryOutcome.FAILED),
        (401, DeliveryOutcome.FAILED),
        (404, DeliveryOutcome.FAILED),
        (408, DeliveryOutcome.RETRY),
        (429, DeliveryOutcome.RETRY),
        (502, DeliveryOutcome.RETRY),
        (503, DeliveryOutcome.RETRY),
    ],
)
async def test_status_classes_over_the_wire(
    receiver: Receiver, sender: WebhookSender, status: int, outcome: DeliveryOutcome
) -> None:
    receiver.script.append(Reply(status))
    attempt = await send(sender, receiver.url)
    assert attempt.outcome is outcome
    assert attempt.status_code == status


async def test_retry_after_seconds_and_dates_are_read(
    receiver: Receiver, sender: WebhookSender
) -> None:
    later = datetime.now(UTC) + timedelta(seconds=120)
    receiver.script += [
        Reply(429, headers=(("Retry-After", "30"),)),
        Reply(503, headers=(("Retry-After", format_datetime(later, usegmt=True)),)),
        Reply(503, headers=(("Retry-After", "soon"),)),
    ]
    seconds = await send(sender, receiver.url)
    dated = await send(sender, receiver.url)
    junk = await send(sender, receiver.url)
    assert seconds.retry_after_s == 30
    assert dated.retry_after_s is not None
    assert 100 < dated.retry_after_s < 121
    assert junk.retry_after_s is None
    delay = next_retry_delay(1, retry_after_s=seconds.retry_after_s, rng=random.Random(1))
    assert delay == 30


async def test_redirects_are_not_followed(receiver: Receiver, sender: WebhookSender) -> None:
    receiver.script.append(Reply(302, headers=(("Location", receiver.url + "?again=1"),)))
    attempt = await send(sender, receiver.url)
    assert attempt.outcome is DeliveryOutcome.FAILED
    assert "redirects are not followed" in (attempt.error or "")
    assert len(receiver.received) == 1


async def test_the_snippet_is_capped_at_one_kib(receiver: Receiver, sender: WebhookSender) -> None:
    receiver.script.append(Reply(500, b"x" * 50_000))
    attempt = await send(sender, receiver.url)
    assert attempt.response_snippet == "x" * RESPONSE_SNIPPET_BYTES


async def test_timeout_is_retried(receiver: Receiver) -> None:
    receiver.script.append(Reply(hang=True))
    async with WebhookSender(timeout_s=0.3, allow_private=True) as sender:
        attempt = await send(sender, receiver.url)
    assert attempt.outcome is DeliveryOutcome.RETRY
    assert attempt.status_code is None
    assert attempt.error == "No answer within 0.3 s."
    assert 0.25 < attempt.duration_s < 5


async def test_a_2xx_whose_body_stalls_is_still_delivered(receiver: Receiver) -> None:
    receiver.script.append(Reply(200, stall_after=b"accepted, thinking"))
    async with WebhookSender(timeout_s=0.3, allow_private=True) as sender:
        attempt = await send(sender, receiver.url)
    assert attempt.outcome is DeliveryOutcome.DELIVERED
    assert attempt.status_code == 200
    assert attempt.response_snippet == "accepted, thinking"


async def test_connection_refused_is_retried(sender: WebhookSender) -> None:
    attempt = await send(sender, f"http://127.0.0.1:{free_port()}/hook")
    assert attempt.outcome is DeliveryOutcome.RETRY
    assert attempt.status_code is None
    assert "ClientConnectorError" in (attempt.error or "")


async def test_unresolvable_host_is_retried() -> None:
    async with WebhookSender(
        allow_private=False, resolver=StaticResolver({}), timeout_s=5
    ) as sender:
        attempt = await send(sender, "https://gone.example.com/hook")
    assert attempt.outcome is DeliveryOutcome.RETRY
    assert "ClientConnectorDNSError" in (attempt.error or "")


async def test_private_target_is_refused_before_any_request(receiver: Receiver) -> None:
    async with WebhookSender(timeout_s=5, allow_private=False) as sender:
        literal = await send(sender, receiver.url)  # http://127.0.0.1:<port>/hook
        named = await send(sender, receiver.url.replace("127.0.0.1", "localhost"))
    for attempt in (literal, named):
        assert attempt.outcome is DeliveryOutcome.FAILED
        assert attempt.status_code is None
        assert "jobs.webhooks.allow_private_targets" in (attempt.error or "")
    assert receiver.received == []


async def test_dns_rebinding_is_refused_at_connect_time(receiver: Receiver) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    url = f"http://hooks.example.com:{port}/hook"
    # At submit time the name resolves to a public address and passes ...
    await resolve_and_check(
        url, allow_private=False, resolver=StaticResolver({"hooks.example.com": ["93.184.215.14"]})
    )
    # ... by delivery it points at loopback: the connector's resolver refuses to connect.
    rebound = StaticResolver({"hooks.example.com": ["127.0.0.1"]})
    async with WebhookSender(timeout_s=5, allow_private=False, resolver=rebound) as sender:
        attempt = await send(sender, url)
    assert attempt.outcome is DeliveryOutcome.FAILED
    assert "loopback address 127.0.0.1" in (attempt.error or "")
    assert f"hooks.example.com:{port}" in (attempt.error or "")
    assert receiver.received == []


async def test_a_name_resolving_to_the_receiver_is_delivered_when_private_is_allowed(
    receiver: Receiver,
) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    pinned = StaticResolver({"hooks.example.com": ["127.0.0.1"]})
    async with WebhookSender(timeout_s=5, allow_private=True, resolver=pinned) as sender:
        attempt = await send(sender, f"http://hooks.example.com:{port}/hook")
    assert attempt.outcome is DeliveryOutcome.DELIVERED
    [got] = receiver.received
    assert got.headers["Host"] == f"hooks.example.com:{port}"
    assert got.verification_error is None


async def test_session_factory_gets_the_guarded_connector(receiver: Receiver) -> None:
    built: list[aiohttp.BaseConnector] = []

    def factory(connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
        built.append(connector)
        return aiohttp.ClientSession(connector=connector, trust_env=False)

    async with WebhookSender(factory, timeout_s=5, allow_private=True) as sender:
        await send(sender, receiver.url)
        await send(sender, receiver.url, event_id="evt_second")
    assert len(built) == 1  # one pooled session, reused
    assert len(receiver.received) == 2


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, DeliveryOutcome.DELIVERED),
        (201, DeliveryOutcome.DELIVERED),
        (299, DeliveryOutcome.DELIVERED),
        (301, DeliveryOutcome.FAILED),
        (308, DeliveryOutcome.FAILED),
        (400, DeliveryOutcome.FAILED),
        (403, DeliveryOutcome.FAILED),
        (408, DeliveryOutcome.RETRY),
        (410, DeliveryOutcome.GONE),
        (413, DeliveryOutcome.FAILED),
        (429, DeliveryOutcome.RETRY),
        (500, DeliveryOutcome.RETRY),
        (504, DeliveryOutcome.RETRY),
        (599, DeliveryOutcome.RETRY),
    ],
)
def test_classify_status(status: int, outcome: DeliveryOutcome) -> None:
    assert classify_status(status) is outcome


def test_envelope_is_compact_utc_json() -> None:
    other_zone = CREATED_AT.astimezone(timezone(timedelta(hours=2)))
    body = build_envelope("evt_1", "job.failed", {"error": "boom"}, other_zone)
    assert body == (
        b'{"id":"evt_1","type":"job.failed","created_at":"2026-05-01T12:30:15.250000Z",'
        b'"data":{"error":"boom"}}'
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        build_envelope("evt_1", "job.failed", {}, datetime(2026, 5, 1))


def test_backoff_grows_exponentially_under_full_jitter() -> None:
    rng = random.Random(42)
    for attempt in range(1, 12):
        ceiling = min(3600.0, 2.0 ** (attempt - 1))
        delays = [next_retry_delay(attempt, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # the jitter spans the whole window
    assert next_retry_delay(10_000, rng=rng) <= 3600


def test_backoff_honours_base_and_cap() -> None:
    rng = random.Random(3)
    assert all(0 <= next_retry_delay(3, base_s=5, cap_s=60, rng=rng) <= 20 for _ in range(100))
    assert all(0 <= next_retry_delay(30, base_s=5, cap_s=60, rng=rng) <= 60 for _ in range(100))


def test_backoff_honours_retry_after_up_to_the_cap() -> None:
    rng = random.Random(5)
    assert next_retry_delay(1, retry_after_s=120, rng=rng) == 120
    assert next_retry_delay(1, retry_after_s=86_400, cap_s=3600, rng=rng) == 3600
    # A Retry-After shorter than the jittered wait does not shorten it.
    assert next_retry_delay(20, retry_after_s=0.5, rng=random.Random(5)) == next_retry_delay(
        20, rng=random.Random(5)
    )


@pytest.mark.parametrize(
    ("attempt", "base_s", "cap_s", "message"),
    [
        (0, 1.0, 3600.0, "attempt counts from 1"),
        (1, 0.0, 3600.0, "0 < base_s <= cap_s"),
        (1, 10.0, 5.0, "0 < base_s <= cap_s"),
    ],
)
def test_backoff_refuses_nonsense(attempt: int, base_s: float, cap_s: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        next_retry_delay(attempt, base_s=base_s, cap_s=cap_s, rng=random.Random(0))
