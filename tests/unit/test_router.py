"""The Router against scripted providers, with a fake clock and no real sleeping."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from headrace.domain import (
    Call,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Deployment,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelRoute,
    RequestControls,
    Usage,
)
from headrace.errors import (
    HeadraceError,
    InvalidRequestError,
    OverloadedError,
    UpstreamRateLimitedError,
    UpstreamRejectedError,
    UpstreamStatusError,
    UpstreamUnavailableError,
)
from headrace.observability.metrics import Metrics
from headrace.routing.breaker import BreakerConfig, BreakerState
from headrace.routing.catalog import Catalog
from headrace.routing.classify import ErrorClass
from headrace.routing.retry import RetryBudget, RetryPolicy
from headrace.routing.router import RoutePolicy, Router

REQUEST = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], body={})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Scripted:
    """A provider that plays a script: each entry is an error to raise or None to answer."""

    deployment: Deployment
    script: list[HeadraceError | None] = field(default_factory=list)
    calls: int = 0
    stream_error_after_first: HeadraceError | None = None
    hang_s: float = 0.0
    text: str | None = None  # stream this text in two chunks instead of the deployment name

    def _next(self) -> HeadraceError | None:
        self.calls += 1
        return self.script.pop(0) if self.script else None

    async def chat(self, request: ChatRequest) -> ChatResponse:
        error = self._next()
        if error is not None:
            raise error
        return ChatResponse(
            body={"choices": [{"message": {"content": self.deployment.name}}]},
            usage=Usage(1, 1),
        )

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        error = self._next()
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if error is not None:
            raise error
        text = self.text or self.deployment.name
        half = max(1, len(text) // 2)
        yield ChatChunk(
            {"id": self.deployment.name, "choices": [{"delta": {"content": text[:half]}}]}
        )
        if self.stream_error_after_first is not None:
            raise self.stream_error_after_first
        if text[half:]:
            yield ChatChunk(
                {"id": self.deployment.name, "choices": [{"delta": {"content": text[half:]}}]}
            )
        yield ChatChunk({"choices": [], "usage": {}}, usage=Usage(1, 1))

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        error = self._next()
        if error is not None:
            raise error
        return EmbeddingResponse(vectors=[[1.0]], usage=Usage(1), model=self.deployment.model)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def failure(name: str) -> UpstreamStatusError:
    return UpstreamStatusError("boom", deployment=name, upstream_status=500)


@dataclass
class World:
    router: Router
    providers: dict[str, Scripted]
    clock: Clock
    sleeps: list[float]


def world(
    models: dict[str, Sequence[str]],
    policies: dict[str, RoutePolicy] | None = None,
    *,
    budget: RetryBudget | None = None,
    first_token_s: float = 60.0,
    max_concurrency: int | None = None,
) -> World:
    from headrace.domain import Timeouts

    clock = Clock()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    routes = []
    providers: dict[str, Scripted] = {}
    for model, names in models.items():
        deployments = [
            Deployment(
                name=n,
                kind="scripted",
                model=n,
                timeouts=Timeouts(first_token_s=first_token_s),
                max_concurrency=max_concurrency,
            )
            for n in names
        ]
        routes.append(
            ModelRoute(
                name=model,
                deployments=deployments,
                capabilities=frozenset({"chat", "embeddings"}),
            )
        )
        for d in deployments:
            providers[d.name] = Scripted(d)
    router = Router(
        Catalog(routes),
        providers,  # type: ignore[arg-type]
        policies or {},
        budget=budget or RetryBudget(clock=clock),
        metrics=Metrics(),
        rng=random.Random(1),
        clock=clock,
        sleep=sleep,
    )
    return World(router, providers, clock, sleeps)


def round_robin(**kwargs: object) -> RoutePolicy:
    return RoutePolicy(strategy="round_robin", **kwargs)  # type: ignore[arg-type]


def call(**controls: object) -> Call:
    return Call(request_id="r", controls=RequestControls(**controls))  # type: ignore[arg-type]


async def test_a_transient_failure_retries_on_another_deployment() -> None:
    w = world({"m": ["a", "b"]}, {"m": round_robin()})
    first = w.router.slots("m")[0].name
    w.providers[first].script = [failure(first)]
    c = call()
    response = await w.router.chat(c, REQUEST)
    other = "b" if first == "a" else "a"
    assert response.body["choices"][0]["message"]["content"] == other
    assert c.attempts == 2
    assert c.deployment == other
    assert len(w.sleeps) == 1


async def test_a_permanent_failure_is_never_retried() -> None:
    w = world({"m": ["a", "b"]})
    for p in w.providers.values():
        p.script = [UpstreamRejectedError("bad", deployment="x", upstream_status=400)]
    c = call()
    with pytest.raises(UpstreamRejectedError):
        await w.router.chat(c, REQUEST)
    assert c.attempts == 1
    assert w.sleeps == []


async def test_retries_stop_at_max_attempts_and_the_last_error_is_raised() -> None:
    w = world({"m": ["a"]}, {"m": RoutePolicy(retry=RetryPolicy(max_attempts=3))})
    w.providers["a"].script = [failure("a")] * 5
    c = call()
    with pytest.raises(UpstreamStatusError):
        await w.router.chat(c, REQUEST)
    assert w.providers["a"].calls == 3
    assert c.attempts == 3


async def test_a_429_moves_on_at_once_and_cools_the_deployment_down() -> None:
    w = world({"m": ["a", "b"]}, {"m": round_robin()})
    first = w.router.slots("m")[0].name
    other = "b" if first == "a" else "a"
    w.providers[first].script = [
        UpstreamRateLimitedError("slow down", deployment=first, retry_after_s=7)
    ]
    c = call()
    await w.router.chat(c, REQUEST)
    assert c.deployment == other
    assert all(s < 1 for s in w.sleeps)  # Retry-After is A's business, not B's
    breaker = next(s for s in w.router.slots("m") if s.name == first).breaker
    assert breaker.state is BreakerState.CLOSED  # a 429 is not a failure
    for _ in range(4):
        c = call()
        await w.router.chat(c, REQUEST)
        assert c.deployment == other
    w.clock.now += 7
    seen = set()
    for _ in range(2):
        c = call()
        await w.router.chat(c, REQUEST)
        seen.add(c.deployment)
    assert seen == {"a", "b"}


async def test_with_one_deployment_retry_after_is_waited_out() -> None:
    w = world({"m": ["a"]})
    w.providers["a"].script = [UpstreamRateLimitedError("slow", deployment="a", retry_after_s=7)]
    c = call()
    await w.router.chat(c, REQUEST)
    assert c.attempts == 2
    assert w.sleeps[0] >= 7
    # Longer than the retry policy's total time: the 429 goes back to the client.
    w.providers["a"].script = [UpstreamRateLimitedError("slow", deployment="a", retry_after_s=90)]
    with pytest.raises(UpstreamRateLimitedError):
        await w.router.chat(call(), REQUEST)


async def test_the_breaker_opens_and_recovers_after_its_cooldown() -> None:
    policy = RoutePolicy(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerConfig(failure_threshold=3, cooldown_s=10, min_requests=100),
    )
    w = world({"m": ["a"]}, {"m": policy})
    w.providers["a"].script = [failure("a")] * 3
    for _ in range(3):
        with pytest.raises(UpstreamStatusError):
            await w.router.chat(call(), REQUEST)
    slot = w.router.slots("m")[0]
    assert slot.breaker.state is BreakerState.OPEN
    with pytest.raises(OverloadedError):
        await w.router.chat(call(), REQUEST)
    assert w.providers["a"].calls == 3  # the open breaker kept the call away
    w.clock.now += 10
    assert slot.breaker.state is BreakerState.HALF_OPEN
    await w.router.chat(call(), REQUEST)  # the probe succeeds
    assert slot.breaker.state is BreakerState.CLOSED


async def test_fallback_chain_and_client_narrowing() -> None:
    once = RetryPolicy(max_attempts=1)
    policies = {
        "m": RoutePolicy(fallbacks=("f1", "f2"), retry=once),
        "f1": RoutePolicy(retry=once),
    }
    w = world({"m": ["a"], "f1": ["x"], "f2": ["y"]}, policies)
    w.providers["a"].script = [UpstreamUnavailableError("down", deployment="a")] * 3
    w.providers["x"].script = [UpstreamUnavailableError("down", deployment="x")]
    c = call()
    response = await w.router.chat(c, REQUEST)
    assert response.body["choices"][0]["message"]["content"] == "y"
    assert c.model == "f2"
    assert c.attempts == 3
    # Narrowed to f2 only: f1 is skipped.
    c = call(fallbacks=("f2",))
    await w.router.chat(c, REQUEST)
    assert c.model == "f2"
    assert c.attempts == 2
    # Disabled.
    with pytest.raises(UpstreamUnavailableError):
        await w.router.chat(call(fallbacks=()), REQUEST)


async def test_context_length_goes_to_the_context_window_fallbacks() -> None:
    policies = {"m": RoutePolicy(fallbacks=("cheap",), context_fallbacks=("big",))}
    w = world({"m": ["a", "b"], "cheap": ["c"], "big": ["g"]}, policies)
    too_long = InvalidRequestError("too long", code="context_length_exceeded")
    for name in ("a", "b"):
        w.providers[name].script = [too_long]
    c = call()
    await w.router.chat(c, REQUEST)
    assert c.model == "big"
    assert c.attempts == 2  # no retry of the same model for a too-long prompt
    assert w.providers["c"].calls == 0


async def test_degraded_answer_when_everything_fails() -> None:
    policies = {"m": RoutePolicy(retry=RetryPolicy(max_attempts=2), degraded_answer="Try later.")}
    w = world({"m": ["a"]}, policies)
    w.providers["a"].script = [failure("a")] * 10
    c = call()
    response = await w.router.chat(c, REQUEST)
    assert response.body["choices"][0]["message"]["content"] == "Try later."
    assert response.usage == Usage()
    assert c.degraded is True
    chunks = [chunk async for chunk in w.router.stream_chat(call(), REQUEST)]
    assert chunks[0].body["choices"][0]["delta"]["content"] == "Try later."
    assert chunks[-1].usage == Usage()
    with pytest.raises(UpstreamStatusError):
        await w.router.chat(call(fallbacks=()), REQUEST)


async def test_the_retry_budget_stops_retry_storms() -> None:
    clock_budget = RetryBudget(ratio=0.0, window_s=10, min_per_s=0.0)
    w = world({"m": ["a", "b"]}, budget=clock_budget)
    for p in w.providers.values():
        p.script = [failure(p.deployment.name)] * 10
    c = call()
    with pytest.raises(UpstreamStatusError):
        await w.router.chat(c, REQUEST)
    assert c.attempts == 1


async def test_stream_retries_before_the_first_chunk_only() -> None:
    w = world({"m": ["a", "b"]}, {"m": round_robin()})
    first = w.router.slots("m")[0].name
    other = "b" if first == "a" else "a"
    w.providers[first].script = [failure(first)]
    c = call()
    chunks = [chunk async for chunk in w.router.stream_chat(c, REQUEST)]
    assert chunks[0].body["choices"][0]["delta"]["content"] == other
    assert c.attempts == 2
    # After the first chunk, a cut stream whose retry diverges is a partial failure: raised.
    for p in w.providers.values():
        p.stream_error_after_first = failure(p.deployment.name)
    c = call()
    with pytest.raises(UpstreamStatusError):
        async for _ in w.router.stream_chat(c, REQUEST):
            pass


async def test_a_cut_stream_is_resumed_when_the_retry_reproduces_what_was_sent() -> None:
    w = world({"m": ["a", "b"]}, {"m": round_robin()})
    for p in w.providers.values():
        p.text = "hello world"
    first = w.router.slots("m")[0].name
    w.providers[first].stream_error_after_first = failure(first)
    c = call()
    chunks = [chunk async for chunk in w.router.stream_chat(c, REQUEST)]
    text = "".join(ch.body["choices"][0]["delta"]["content"] for ch in chunks if ch.body["choices"])
    assert text == "hello world"
    assert {ch.body.get("id") for ch in chunks if ch.body.get("id")} == {first}
    assert c.attempts == 2
    assert chunks[-1].usage == Usage(1, 1)


async def test_a_cut_stream_with_tool_calls_is_not_resumed() -> None:
    w = world({"m": ["a", "b"]}, {"m": round_robin()})
    first = w.router.slots("m")[0].name
    provider = w.providers[first]

    async def tool_stream(request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        yield ChatChunk({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]})
        raise failure(first)

    provider.stream_chat = tool_stream  # type: ignore[method-assign]
    c = call()
    with pytest.raises(UpstreamStatusError):
        async for _ in w.router.stream_chat(c, REQUEST):
            pass
    assert c.attempts == 1


async def test_a_hanging_stream_start_fails_over_to_the_next_deployment() -> None:
    w = world({"m": ["a", "b"]}, {"m": round_robin()}, first_token_s=0.05)
    first = w.router.slots("m")[0].name
    other = "b" if first == "a" else "a"
    w.providers[first].hang_s = 5
    c = call()
    chunks = [chunk async for chunk in w.router.stream_chat(c, REQUEST)]
    assert chunks[0].body["choices"][0]["delta"]["content"] == other
    assert c.attempts == 2


async def test_deployments_at_their_concurrency_limit_are_skipped() -> None:
    w = world({"m": ["a", "b"]}, max_concurrency=1)
    slots = w.router.slots("m")
    slots[0].in_flight = 1
    c = call()
    await w.router.chat(c, REQUEST)
    assert c.deployment == slots[1].name
    slots[1].in_flight = 1
    with pytest.raises(OverloadedError) as info:
        await w.router.chat(call(), REQUEST)
    assert info.value.headers["Retry-After"] == "1"


async def test_embeddings_are_retried_too() -> None:
    w = world({"m": ["a", "b"]}, {"m": round_robin()})
    first = w.router.slots("m")[0].name
    w.providers[first].script = [failure(first)]
    c = call()
    request = EmbeddingRequest(model="m", inputs=["x"], body={})
    response = await w.router.embed(c, request)
    assert response.vectors == [[1.0]]
    assert c.attempts == 2


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (UpstreamUnavailableError("x", deployment="d"), ErrorClass.TRANSIENT),
        (UpstreamRateLimitedError("x", deployment="d"), ErrorClass.TRANSIENT),
        (UpstreamStatusError("x", deployment="d", upstream_status=500), ErrorClass.TRANSIENT),
        (UpstreamStatusError("x", deployment="d", upstream_status=401), ErrorClass.PERMANENT),
        (UpstreamRejectedError("x", deployment="d", upstream_status=400), ErrorClass.PERMANENT),
        (
            UpstreamRejectedError("This model's maximum context length is 8192", deployment="d"),
            ErrorClass.CONTEXT_LENGTH,
        ),
        (InvalidRequestError("x", code="context_length_exceeded"), ErrorClass.CONTEXT_LENGTH),
        (InvalidRequestError("x"), ErrorClass.PERMANENT),
    ],
)
def test_classification(error: HeadraceError, kind: ErrorClass) -> None:
    from headrace.routing.classify import classify

    assert classify(error) is kind


_unused: Callable[..., object] = world  # keep the helper's signature visible to readers


async def test_a_deployment_whose_upstream_quota_is_used_up_is_skipped_until_reset() -> None:
    w = world({"m": ["a", "b"]}, {"m": round_robin()})
    first = w.router.slots("m")[0].name
    other = "b" if first == "a" else "a"
    original = w.providers[first].chat

    async def exhausted(request: ChatRequest) -> ChatResponse:
        response = await original(request)
        return ChatResponse(response.body, response.usage, exhausted_for_s=30)

    w.providers[first].chat = exhausted  # type: ignore[method-assign]
    c = call()
    await w.router.chat(c, REQUEST)
    assert c.deployment == first
    for _ in range(3):
        c = call()
        await w.router.chat(c, REQUEST)
        assert c.deployment == other
    w.clock.now += 31
    seen = set()
    for _ in range(2):
        c = call()
        await w.router.chat(c, REQUEST)
        seen.add(c.deployment)
    assert seen == {"a", "b"}
