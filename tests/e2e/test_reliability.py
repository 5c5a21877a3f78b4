"""Reliability end to end: failover, breakers, rate-limit rests, TTFT guard, fallbacks, drain.

Real processes on real sockets: three ``headrace mock-upstream`` (A and B behind the model
``rel``, C behind its fallback ``rel-fallback``) and one ``headrace serve``, driven with the
official ``openai`` SDK with ``max_retries=0``, so every retry seen here is the gateway's.
Each test sets faults with ``PUT /_mock/faults``; the ``rig`` fixture clears them and brings
every breaker of ``rel`` back to closed before the next test. The SIGTERM tests start a
gateway and a mock of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import ADMIN_KEY, Server, free_port, serve, start

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "tell me about rivers"}]
# What every mock answers to USER (mock answers are deterministic; see mock_upstream/answers.py).
ANSWER = "mock answer: " + " ".join((["tell", "me", "about", "rivers"] * 4)[:14])
DEGRADED = "Our assistant is busy right now; please try again in a minute."

COOLDOWN_S = 2.0
FAILURE_THRESHOLD = 3
FIRST_TOKEN_S = 1.0
RETRY_AFTER_S = 2
GRACE_S = 5.0
# Slack for process scheduling on a busy two-core machine, on top of the configured times.
SLACK_S = 0.75

_TIMEOUTS = f"{{connect_s: 1, first_token_s: {FIRST_TOKEN_S}, total_s: 5}}"
_RETRY = "{max_attempts: 3, base_delay_s: 0.01, max_delay_s: 0.05, max_total_s: 5}"


def reliability_config(a: str, b: str, c: str, dead: str) -> str:
    return f"""
log: {{format: json}}
router:
  # These tests fail over dozens of times within seconds; the retry budget (unit-tested in
  # tests/unit/test_retry.py) must not be what they measure.
  retry_budget: {{min_per_s: 100}}
models:
  - name: rel
    strategy: round_robin
    retry: {_RETRY}
    # min_requests out of reach: only consecutive failures open it, so counts are exact.
    breaker: {{failure_threshold: {FAILURE_THRESHOLD}, cooldown_s: {COOLDOWN_S}, window_s: 10,
               min_requests: 1000}}
    fallbacks: [rel-fallback]
    deployments:
      - {{provider: openai_compatible, model: mock-model, base_url: "{a}/v1",
          timeouts: {_TIMEOUTS}}}
      - {{provider: openai_compatible, model: mock-model, base_url: "{b}/v1",
          timeouts: {_TIMEOUTS}}}
  - name: rel-fallback
    deployments:
      - {{provider: openai_compatible, model: mock-model, base_url: "{c}/v1"}}
  - name: rel-ordered
    strategy: cost_first  # equal prices: always A first, then B
    retry: {_RETRY}
    deployments:
      - {{provider: openai_compatible, model: mock-model, base_url: "{a}/v1"}}
      - {{provider: openai_compatible, model: mock-model, base_url: "{b}/v1"}}
  - name: rel-degraded
    degraded_answer: "{DEGRADED}"
    retry: {_RETRY}
    deployments:
      - {{provider: openai_compatible, model: mock-model, base_url: "{dead}/v1",
          timeouts: {_TIMEOUTS}}}
"""


# -- processes and helpers ---------------------------------------------------------------------


def start_mock(log: Path, *flags: str) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(["mock-upstream", "--port", str(port), *flags], f"{url}/health", log)
    server.url = url
    return server


def start_gateway(root: Path, config: str, grace_s: float = 30) -> Server:
    path = root / "headrace.yaml"
    path.write_text(config)
    grace = {"HEADRACE_SERVER__GRACEFUL_SHUTDOWN_S": str(grace_s)}
    return serve(path, root / "serve.log", root / "data", grace)


def put_faults(mock: Server, **settings: Any) -> None:
    """Replace the mock's fault settings; no arguments clears every fault."""
    httpx.put(f"{mock.url}/_mock/faults", json=settings).raise_for_status()


def calls(*mocks: Server) -> int:
    """Requests the mocks received since their last reset, whatever the outcome."""
    return sum(int(httpx.get(f"{m.url}/_mock/stats").json()["total"]) for m in mocks)


def breaker_state(gateway: Server, deployment: str) -> float:
    """``headrace_breaker_state`` of ``deployment``: 0 closed, 1 half-open, 2 open."""
    text = httpx.get(f"{gateway.url}/metrics").text
    pattern = rf'^headrace_breaker_state\{{deployment="{re.escape(deployment)}"\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    assert match is not None, f"no breaker gauge for {deployment!r}"
    return float(match.group(1))


@dataclass(frozen=True)
class Reply:
    """One answered chat request as the client saw it."""

    text: str
    model: str
    deployment: str | None
    attempts: int
    degraded: bool
    elapsed_s: float


def chat(
    client: openai.OpenAI,
    model: str = "rel",
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> Reply:
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=USER, stream=stream, extra_headers=headers
    )
    parsed = raw.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    else:
        text = parsed.choices[0].message.content or ""
    return _reply(raw.headers, text, started)


async def achat(client: openai.AsyncOpenAI, *, stream: bool = False) -> Reply:
    started = time.monotonic()
    raw = await client.chat.completions.with_raw_response.create(
        model="rel", messages=USER, stream=stream
    )
    parsed = raw.parse()
    if stream:
        text = "".join([c.choices[0].delta.content or "" async for c in parsed if c.choices])
    else:
        text = parsed.choices[0].message.content or ""
    return _reply(raw.headers, text, started)


def _reply(headers: httpx.Headers, text: str, started: float) -> Reply:
    return Reply(
        text=text,
        model=headers["x-headrace-model"],
        deployment=headers.get("x-headrace-deployment"),
        attempts=int(headers.get("x-headrace-attempts", "0")),
        degraded=headers.get("x-headrace-degraded") == "true",
        elapsed_s=time.monotonic() - started,
    )


def async_client(gateway: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30
    )


@dataclass
class Rig:
    gateway: Server
    a: Server
    b: Server
    c: Server
    client: openai.OpenAI

    @property
    def mocks(self) -> tuple[Server, Server, Server]:
        return self.a, self.b, self.c

    def settle(self) -> None:
        """Clear every fault, then send requests until both breakers of ``rel`` are closed
        and both deployments have answered (which also zeroes their failure streaks)."""
        for mock in self.mocks:
            put_faults(mock)
        deadline = time.monotonic() + COOLDOWN_S + RETRY_AFTER_S + 5
        served: set[str | None] = set()
        while True:
            served.add(chat(self.client).deployment)
            states = [breaker_state(self.gateway, d) for d in ("rel/0", "rel/1")]
            if served >= {"rel/0", "rel/1"} and states == [0, 0]:
                break
            assert time.monotonic() < deadline, f"rel did not recover: {states}, {served}"
            time.sleep(0.1)
        for mock in self.mocks:
            httpx.post(f"{mock.url}/_mock/reset").raise_for_status()


@pytest.fixture(scope="module")
def shared_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("reliability")
    with ThreadPoolExecutor(3) as pool:
        a, b, c = pool.map(lambda name: start_mock(root / f"mock-{name}.log"), "abc")
    try:
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        gateway = start_gateway(root, reliability_config(a.url, b.url, c.url, dead))
        client = openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30
        )
        yield Rig(gateway, a, b, c, client)
        client.close()
        gateway.stop()
    finally:
        for mock in (a, b, c):
            mock.stop()


@pytest.fixture
def rig(shared_rig: Rig) -> Iterator[Rig]:
    shared_rig.settle()
    yield shared_rig
    for mock in shared_rig.mocks:
        put_faults(mock)


# -- (a) breaker ---------------------------------------------------------------------------------


def test_failing_deployment_is_routed_around_then_recovers(rig: Rig) -> None:
    put_faults(rig.a, error_rate=1.0, error_statuses="500")
    replies = [chat(rig.client) for _ in range(6)]
    assert [r.deployment for r in replies] == ["rel/1"] * 6
    assert all(r.text == ANSWER for r in replies)
    assert breaker_state(rig.gateway, "rel/0") == 2
    assert calls(rig.a) == FAILURE_THRESHOLD

    # Open: A gets nothing at all, B answers at once.
    replies = [chat(rig.client) for _ in range(6)]
    assert [(r.deployment, r.attempts) for r in replies] == [("rel/1", 1)] * 6
    assert calls(rig.a) == FAILURE_THRESHOLD

    put_faults(rig.a)
    time.sleep(COOLDOWN_S)
    served = [chat(rig.client).deployment for _ in range(4)]
    assert "rel/0" in served
    assert breaker_state(rig.gateway, "rel/0") == 0
    assert calls(rig.a) > FAILURE_THRESHOLD


# -- (b) 429 with Retry-After ------------------------------------------------------------------


async def test_rate_limited_deployment_rests_for_retry_after(rig: Rig) -> None:
    put_faults(rig.a, error_rate=1.0, error_statuses="429", retry_after_s=RETRY_AFTER_S)
    async with async_client(rig.gateway) as client, httpx.AsyncClient() as http:

        async def a_calls() -> int:
            return int((await http.get(f"{rig.a.url}/_mock/stats")).json()["total"])

        # Two at once: round robin gives one of them to A, which answers 429.
        first = [asyncio.create_task(achat(client)) for _ in range(2)]
        for _ in range(100):
            if await a_calls() >= 1:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("neither of two concurrent requests went to A")
        limited_at = time.monotonic()
        during: list[Reply] = []
        while time.monotonic() - limited_at < RETRY_AFTER_S - SLACK_S:
            during += await asyncio.gather(*(achat(client, stream=i % 2 == 1) for i in range(4)))
        assert await a_calls() == 1, "A was called while resting after its 429"
        assert len(during) >= 8
        assert {r.deployment for r in during} == {"rel/1"}
        assert all(r.text == ANSWER and r.attempts == 1 for r in during)
        firsts = await asyncio.gather(*first)
        assert all(r.text == ANSWER and r.deployment == "rel/1" for r in firsts)
        assert sorted(r.attempts for r in firsts) == [1, 2]

    put_faults(rig.a)
    await asyncio.sleep(max(0.0, limited_at + RETRY_AFTER_S - time.monotonic()))
    assert "rel/0" in {chat(rig.client).deployment for _ in range(3)}


def test_failover_after_429_does_not_wait_for_the_rate_limited_deployment(rig: Rig) -> None:
    put_faults(rig.a, error_rate=1.0, error_statuses="429", retry_after_s=RETRY_AFTER_S)
    started = time.monotonic()
    reply = chat(rig.client, "rel-ordered")
    short = (reply.deployment, reply.elapsed_s < SLACK_S)
    time.sleep(max(0.0, started + RETRY_AFTER_S + 0.1 - time.monotonic()))  # A rested

    put_faults(rig.a, error_rate=1.0, error_statuses="429", retry_after_s=10)  # > max_total_s
    try:
        long: tuple[str | None, int] = (chat(rig.client, "rel-ordered").deployment, 200)
    except openai.APIStatusError as exc:
        long = (exc.response.headers.get("x-headrace-deployment"), exc.status_code)
    assert (short, long) == (("rel-ordered/1", True), ("rel-ordered/1", 200))


# -- (c) time to first token -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [{"hang_rate": 1.0}, {"ttft_ms": (FIRST_TOKEN_S + 1.5) * 1000}],
    ids=["hang", "slow-first-token"],
)
def test_stream_that_does_not_start_fails_over(rig: Rig, fault: dict[str, float]) -> None:
    put_faults(rig.a, **fault)
    failovers: list[Reply] = []
    for _ in range(3):  # round robin: at most one of three goes to B first
        reply = chat(rig.client, stream=True)
        assert (reply.deployment, reply.text) == ("rel/1", ANSWER)
        if reply.attempts == 2:
            failovers.append(reply)
        if len(failovers) == 2:
            break
    assert len(failovers) == 2
    for reply in failovers:
        assert FIRST_TOKEN_S <= reply.elapsed_s < FIRST_TOKEN_S + SLACK_S


# -- (d) fallback model ------------------------------------------------------------------------


def test_every_deployment_down_falls_back_to_the_fallback_model(rig: Rig) -> None:
    put_faults(rig.a, error_rate=1.0, error_statuses="503")
    put_faults(rig.b, error_rate=1.0, error_statuses="503")
    replies = [chat(rig.client, stream=stream) for stream in (False, True, False, True)]
    assert {(r.model, r.deployment, r.text) for r in replies} == {
        ("rel-fallback", "rel-fallback/0", ANSWER)
    }
    assert calls(rig.c) == 4

    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            chat(rig.client, stream=stream, headers={"X-Headrace-Fallbacks": "none"})
        assert info.value.status_code == 503
    assert calls(rig.c) == 4


# -- (e) permanent errors ----------------------------------------------------------------------


def test_permanent_upstream_error_is_not_retried(rig: Rig) -> None:
    for mock in (rig.a, rig.b):
        put_faults(mock, error_rate=1.0, error_statuses="400")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            chat(rig.client, stream=stream)
        assert info.value.status_code == 400
    assert calls(*rig.mocks) == 2
    assert breaker_state(rig.gateway, "rel/0") == breaker_state(rig.gateway, "rel/1") == 0


# -- (f) degraded answer -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_degraded_answer_when_the_upstream_is_down(rig: Rig, stream: bool) -> None:
    reply = chat(rig.client, "rel-degraded", stream=stream)
    assert reply.degraded
    assert reply.text == DEGRADED
    assert reply.model == "rel-degraded"


# -- (g) SIGTERM -------------------------------------------------------------------------------


async def _refused(port: int, limit_s: float) -> bool:
    """Whether a new TCP connection to ``port`` is refused within ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        await asyncio.sleep(0.02)
    return False


async def _sigterm_during_requests(gateway: Server, mock: Server) -> tuple[list[Reply], int, float]:
    """Send 20 requests, SIGTERM the gateway once all reached the upstream, and check that
    new connections are refused while they are still in flight. Returns the replies, the exit
    status and the seconds from the signal to the exit."""
    port = int(gateway.url.rsplit(":", 1)[1])
    async with async_client(gateway) as client, httpx.AsyncClient() as http:
        tasks = [asyncio.create_task(achat(client, stream=i % 2 == 0)) for i in range(20)]
        for _ in range(60):  # every request reached the upstream (which takes 1.5 s)
            await asyncio.sleep(0.02)
            stats = (await http.get(f"{mock.url}/_mock/stats")).json()
            if stats["in_flight"] == 20:
                break
        assert stats["in_flight"] == 20, stats
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert await _refused(port, 1.0), "still accepting connections after SIGTERM"
        assert not any(t.done() for t in tasks), "refusal came only after the drain"
        replies = await asyncio.gather(*tasks)
        code = await asyncio.to_thread(gateway.process.wait, GRACE_S + 5)
        return list(replies), code, time.monotonic() - signalled


async def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    mock = start_mock(tmp_path / "mock.log", "--latency-ms", "1500")
    config = f"""
log: {{format: json}}
models:
  - name: rel
    deployments:
      - {{provider: openai_compatible, model: mock-model, base_url: "{mock.url}/v1"}}
"""
    try:
        gateway = start_gateway(tmp_path, config, grace_s=GRACE_S)
        try:
            replies, code, exited_after = await _sigterm_during_requests(gateway, mock)
        finally:
            gateway.stop(signal.SIGKILL)
    finally:
        mock.stop()
    assert [r.text for r in replies] == [ANSWER] * 20
    assert exited_after <= GRACE_S
    assert code == 0, gateway.output()


def test_sigterm_exit_status_is_zero(tmp_path: Path) -> None:
    config = f"""
models:
  - name: rel
    deployments:
      - {{provider: openai_compatible, model: m, base_url: "http://127.0.0.1:{free_port()}/v1"}}
"""
    gateway = start_gateway(tmp_path, config, grace_s=GRACE_S)
    assert gateway.stop(signal.SIGTERM, timeout_s=GRACE_S + 5) == 0
