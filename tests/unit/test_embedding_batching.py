"""BatchingProvider: concurrent compatible embeddings become one upstream call, split back."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

import pytest

from headrace.domain import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Deployment,
    EmbeddingRequest,
    EmbeddingResponse,
)
from headrace.errors import UpstreamStatusError, UpstreamUnavailableError
from headrace.providers.base import Provider
from headrace.providers.batching import BatchingProvider, apportion
from headrace.providers.echo import EchoProvider
from headrace.providers.http import SessionPool
from headrace.providers.registry import ProviderContext

DEPLOYMENT = Deployment(name="emb", kind="echo", model="echo-embed-1")


class RecordingProvider:
    """EchoProvider's embeddings, recording every upstream request; can fail once or stall."""

    def __init__(self, *, delay_s: float = 0.0, exhausted_for_s: float | None = None) -> None:
        self.echo = EchoProvider(DEPLOYMENT, ProviderContext(http=SessionPool()))
        self.delay_s = delay_s
        self.exhausted_for_s = exhausted_for_s
        self.requests: list[EmbeddingRequest] = []
        self.fail_next: Exception | None = None
        self.cancelled = 0
        self.closed = False
        self.last_stream: AsyncGenerator[ChatChunk, None] | None = None

    @property
    def deployment(self) -> Deployment:
        return DEPLOYMENT

    async def chat(self, request: ChatRequest) -> ChatResponse:
        return await self.echo.chat(request)

    def stream_chat(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        self.last_stream = self.echo.stream_chat(request)
        return self.last_stream

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        self.requests.append(request)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        response = await self.echo.embed(request)
        return replace(response, exhausted_for_s=self.exhausted_for_s)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closed = True


def req(
    *texts: str, model: str = "m", dimensions: int | None = None, **body: Any
) -> EmbeddingRequest:
    wire_input: str | list[str] = texts[0] if len(texts) == 1 else list(texts)
    return EmbeddingRequest(
        model=model,
        inputs=list(texts),
        body={"model": model, "input": wire_input, **body},
        dimensions=dimensions,
    )


async def unbatched(request: EmbeddingRequest) -> list[list[float]]:
    """What the echo provider answers for ``request`` on its own."""
    response = await EchoProvider(DEPLOYMENT, ProviderContext(http=SessionPool())).embed(request)
    return [list(v) for v in response.vectors]


@pytest.fixture
def inner() -> RecordingProvider:
    return RecordingProvider()


async def test_fifty_concurrent_calls_make_one_upstream_call(inner: RecordingProvider) -> None:
    provider: Provider = BatchingProvider(inner, window_s=0.05)
    requests = [req(f"text number {i}") for i in range(50)]
    responses = await asyncio.gather(*(provider.embed(r) for r in requests))
    assert len(inner.requests) == 1
    merged = inner.requests[0]
    assert list(merged.inputs) == [f"text number {i}" for i in range(50)]
    assert merged.body["input"] == list(merged.inputs)
    assert merged.body["model"] == "m"
    for request, response in zip(requests, responses, strict=True):
        assert [list(v) for v in response.vectors] == await unbatched(request)
        assert response.model == DEPLOYMENT.model


@pytest.mark.parametrize("max_inputs", [1, 7, 16, 50, 256])
async def test_max_inputs_splits_batches(inner: RecordingProvider, max_inputs: int) -> None:
    provider = BatchingProvider(inner, window_s=0.05, max_inputs=max_inputs)
    requests = [req(f"t{i}") for i in range(50)]
    responses = await asyncio.gather(*(provider.embed(r) for r in requests))
    assert len(inner.requests) == math.ceil(50 / max_inputs)
    assert all(len(r.inputs) <= max_inputs for r in inner.requests)
    for request, response in zip(requests, responses, strict=True):
        assert [list(v) for v in response.vectors] == await unbatched(request)


async def test_multi_input_callers_get_their_vectors_in_order(inner: RecordingProvider) -> None:
    provider = BatchingProvider(inner, window_s=0.05)
    requests = [req(*(f"c{c} i{i}" for i in range(c + 1))) for c in range(6)]
    responses = await asyncio.gather(*(provider.embed(r) for r in requests))
    assert len(inner.requests) == 1
    for request, response in zip(requests, responses, strict=True):
        assert [list(v) for v in response.vectors] == await unbatched(request)


def test_apportion_is_exact_and_proportional() -> None:
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(100, [1, 3]) == [25, 75]
    assert apportion(5, [0, 0]) == [3, 2]
    assert apportion(0, [4, 9]) == [0, 0]
    assert apportion(7, [2, 1, 4]) == [2, 1, 4]
    rng = random.Random(7)
    for _ in range(500):
        weights = [rng.randint(0, 50) for _ in range(rng.randint(1, 12))]
        total = rng.randint(0, 10_000)
        shares = apportion(total, weights)
        assert sum(shares) == total
        whole = sum(weights) or len(weights)
        for share, weight in zip(
            shares, weights if sum(weights) else [1] * len(weights), strict=True
        ):
            assert abs(share - total * weight / whole) < 1


async def test_usage_shares_sum_to_the_upstream_total(inner: RecordingProvider) -> None:
    provider = BatchingProvider(inner, window_s=0.05)
    requests = [req("one two three four"), req("five"), req("six seven", "eight nine ten")]
    responses = await asyncio.gather(*(provider.embed(r) for r in requests))
    upstream_total = 10  # the echo provider counts words
    assert sum(r.usage.prompt_tokens for r in responses) == upstream_total
    chars = [sum(len(t) for t in r.inputs) for r in requests]
    assert [r.usage.prompt_tokens for r in responses] == apportion(upstream_total, chars)
    for response, weight in zip(responses, chars, strict=True):
        assert abs(response.usage.prompt_tokens - upstream_total * weight / sum(chars)) < 1


async def test_exhausted_for_s_reaches_every_caller() -> None:
    provider = BatchingProvider(RecordingProvider(exhausted_for_s=12.5), window_s=0.05)
    responses = await asyncio.gather(*(provider.embed(req(f"x{i}")) for i in range(3)))
    assert [r.exhausted_for_s for r in responses] == [12.5] * 3


async def test_a_lone_caller_passes_through_untouched(inner: RecordingProvider) -> None:
    provider = BatchingProvider(inner, window_s=0.001)
    request = req("alone", "together")
    response = await provider.embed(request)
    assert inner.requests == [request]
    assert inner.requests[0] is request
    assert response.usage.prompt_tokens == 2


async def test_incompatible_requests_are_not_merged(inner: RecordingProvider) -> None:
    provider = BatchingProvider(inner, window_s=0.05)
    requests = [
        req("a"),
        req("b"),
        req("c", dimensions=4),
        req("d", model="other"),
        req("e", user="alice"),
        req("f", user="alice"),
    ]
    responses = await asyncio.gather(*(provider.embed(r) for r in requests))
    assert sorted(tuple(r.inputs) for r in inner.requests) == [
        ("a", "b"),
        ("c",),
        ("d",),
        ("e", "f"),
    ]
    for request, response in zip(requests, responses, strict=True):
        assert [list(v) for v in response.vectors] == await unbatched(request)
    merged_users = [r.body.get("user") for r in inner.requests if list(r.inputs) == ["e", "f"]]
    assert merged_users == ["alice"]


async def test_calls_further_apart_than_the_window_are_not_merged(inner: RecordingProvider) -> None:
    provider = BatchingProvider(inner, window_s=0.01)
    first = asyncio.create_task(provider.embed(req("early")))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(provider.embed(req("late")))
    await asyncio.gather(first, second)
    assert [list(r.inputs) for r in inner.requests] == [["early"], ["late"]]


async def test_an_oversized_request_goes_alone(inner: RecordingProvider) -> None:
    provider = BatchingProvider(inner, window_s=0.05, max_inputs=4)
    big = req(*(f"b{i}" for i in range(6)))
    responses = await asyncio.gather(
        provider.embed(req("x")), provider.embed(big), provider.embed(req("y"))
    )
    assert [list(r.inputs) for r in inner.requests] == [list(big.inputs), ["x", "y"]]
    assert [list(v) for v in responses[1].vectors] == await unbatched(big)


async def test_an_upstream_error_reaches_every_caller_of_that_batch_only(
    inner: RecordingProvider,
) -> None:
    provider = BatchingProvider(inner, window_s=0.02)
    error = UpstreamStatusError("upstream broke", deployment="emb")
    inner.fail_next = error
    outcomes = await asyncio.gather(
        *(provider.embed(req(f"x{i}")) for i in range(5)), return_exceptions=True
    )
    assert all(outcome is error for outcome in outcomes)
    responses = await asyncio.gather(*(provider.embed(req(f"y{i}")) for i in range(5)))
    assert len(inner.requests) == 2
    assert [list(r.vectors[0]) for r in responses] == [
        (await unbatched(req(f"y{i}")))[0] for i in range(5)
    ]


async def test_a_wrong_vector_count_fails_the_batch() -> None:
    class Short(RecordingProvider):
        async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
            response = await super().embed(request)
            return replace(response, vectors=response.vectors[1:])

    provider = BatchingProvider(Short(), window_s=0.02)
    outcomes = await asyncio.gather(
        *(provider.embed(req(f"x{i}")) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, UpstreamStatusError) for o in outcomes)
    assert "3 inputs" in str(outcomes[0])


async def test_a_caller_cancelled_before_dispatch_does_not_hurt_the_others(
    inner: RecordingProvider,
) -> None:
    provider = BatchingProvider(inner, window_s=0.05)
    tasks = [asyncio.create_task(provider.embed(req(f"x{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [list(r.inputs) for r in inner.requests] == [["x0", "x2"]]
    for i in (0, 2):
        result = results[i]
        assert isinstance(result, EmbeddingResponse)
        assert [list(v) for v in result.vectors] == await unbatched(req(f"x{i}"))


async def test_a_caller_cancelled_in_flight_does_not_hurt_the_others() -> None:
    inner = RecordingProvider(delay_s=0.05)
    provider = BatchingProvider(inner, window_s=0.001)
    tasks = [asyncio.create_task(provider.embed(req(f"x{i}"))) for i in range(3)]
    await asyncio.sleep(0.02)
    assert len(inner.requests) == 1
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(r, EmbeddingResponse) for r in results[1:])
    assert inner.cancelled == 0


async def test_all_callers_cancelled_before_dispatch_skips_the_upstream(
    inner: RecordingProvider,
) -> None:
    provider = BatchingProvider(inner, window_s=0.02)
    tasks = [asyncio.create_task(provider.embed(req(f"x{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.06)
    assert inner.requests == []
    response = await provider.embed(req("after"))  # the key is free again
    assert [list(r.inputs) for r in inner.requests] == [["after"]]
    assert len(response.vectors) == 1


async def test_all_callers_cancelled_in_flight_cancels_the_upstream() -> None:
    inner = RecordingProvider(delay_s=10)
    provider = BatchingProvider(inner, window_s=0.001)
    tasks = [asyncio.create_task(provider.embed(req(f"x{i}"))) for i in range(3)]
    await asyncio.sleep(0.02)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.wait_for(provider.aclose(), timeout=1)  # waits out the in-flight task
    assert inner.cancelled == 1


async def test_aclose_flushes_pending_batches_then_closes_the_inner(
    inner: RecordingProvider,
) -> None:
    provider = BatchingProvider(inner, window_s=60)
    tasks = [asyncio.create_task(provider.embed(req(f"x{i}"))) for i in range(4)]
    await asyncio.sleep(0)
    assert inner.requests == []
    await asyncio.wait_for(provider.aclose(), timeout=1)
    assert inner.closed
    assert [list(r.inputs) for r in inner.requests] == [["x0", "x1", "x2", "x3"]]
    responses = await asyncio.wait_for(asyncio.gather(*tasks), timeout=1)
    assert [len(r.vectors) for r in responses] == [1] * 4
    assert asyncio.all_tasks() == {asyncio.current_task()}  # no batching task outlives aclose
    with pytest.raises(UpstreamUnavailableError, match="shutting down"):
        await provider.embed(req("late"))


async def test_other_methods_delegate(inner: RecordingProvider) -> None:
    provider = BatchingProvider(inner)
    assert provider.deployment is DEPLOYMENT
    chat = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], body={})
    assert (await provider.chat(chat)).usage.prompt_tokens == 1
    stream = provider.stream_chat(chat)
    assert stream is inner.last_stream
    assert [chunk async for chunk in stream][-1].usage is not None
    await provider.check()


@pytest.mark.parametrize(("window_s", "max_inputs"), [(-1.0, 1), (0.0, 0)])
def test_bad_settings_are_refused(window_s: float, max_inputs: int) -> None:
    with pytest.raises(ValueError, match="max_inputs >= 1"):
        BatchingProvider(RecordingProvider(), window_s=window_s, max_inputs=max_inputs)


async def test_random_concurrent_load_is_answered_exactly() -> None:
    rng = random.Random(20240501)
    inner = RecordingProvider(delay_s=0.003)
    max_inputs = 8
    provider = BatchingProvider(inner, window_s=0.002, max_inputs=max_inputs)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]

    def random_request() -> EmbeddingRequest:
        texts = [
            " ".join(rng.choices(words, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 10))
        ]
        return req(
            *texts,
            model=rng.choice(["m1", "m2"]),
            dimensions=rng.choice([None, 4]),
            **rng.choice([{}, {"user": "u"}]),
        )

    async def one(request: EmbeddingRequest, start_s: float) -> EmbeddingResponse:
        await asyncio.sleep(start_s)
        return await provider.embed(request)

    requests = [random_request() for _ in range(200)]
    starts = [rng.uniform(0, 0.03) for _ in requests]
    responses = await asyncio.gather(*(one(r, s) for r, s in zip(requests, starts, strict=True)))

    for request, response in zip(requests, responses, strict=True):
        assert [list(v) for v in response.vectors] == await unbatched(request)
    upstream_tokens = sum(len(t.split()) for r in inner.requests for t in r.inputs)
    assert sum(r.usage.prompt_tokens for r in responses) == upstream_tokens
    assert sorted(t for r in inner.requests for t in r.inputs) == sorted(
        t for r in requests for t in r.inputs
    )
    assert len(inner.requests) < len(requests)  # some merging happened
    for upstream in inner.requests:
        if not any(upstream is r for r in requests):  # a merged call
            assert len(upstream.inputs) <= max_inputs
            assert upstream.body["input"] == list(upstream.inputs)
    await provider.aclose()
    assert inner.closed
