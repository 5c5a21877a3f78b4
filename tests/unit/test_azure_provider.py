"""The Azure OpenAI adapter against a fake that speaks Azure's documented wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest

from headrace.api.wire import chat_request
from headrace.config import DeploymentConfig, ModelConfig
from headrace.domain import ChatChunk, ChatRequest, Deployment, EmbeddingRequest, Usage
from headrace.errors import (
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamRejectedError,
    UpstreamStatusError,
)
from headrace.providers.azure_openai import AzureOpenAIProvider
from headrace.providers.http import SessionPool
from headrace.providers.registry import PROVIDERS, ProviderContext, load
from headrace.routing.classify import ErrorClass, classify
from tests.conftest import ADMIN_KEY, GatewayFactory
from tests.fakes import load_json, serve
from tests.fakes.azure_fake import AzureFake

KEY = "azure-test-key-0123456789"
DEPLOYMENT = "gpt-4o-prod"
USER = [{"role": "user", "content": "tell me about rivers"}]


@pytest.fixture
async def fake() -> AsyncIterator[AzureFake]:
    fake = AzureFake(api_key=KEY, deployment=DEPLOYMENT)
    async with serve(fake.app()) as url:
        fake.url = url
        yield fake


@pytest.fixture
async def pool() -> AsyncIterator[SessionPool]:
    pool = SessionPool()
    yield pool
    await pool.aclose()


def make(
    fake: AzureFake,
    pool: SessionPool,
    *,
    key: str | None = KEY,
    model: str = DEPLOYMENT,
    base_url: str | None = None,
    **options: Any,
) -> AzureOpenAIProvider:
    deployment = Deployment(
        name="azure/0",
        kind="azure_openai",
        model=model,
        base_url=base_url or fake.url,
        api_key=key,
        options=options,
    )
    return AzureOpenAIProvider(deployment, ProviderContext(http=pool))


def request(**body: Any) -> ChatRequest:
    return chat_request({"model": "gpt-4o", "messages": USER, **body})


async def collect(provider: AzureOpenAIProvider, req: ChatRequest) -> list[ChatChunk]:
    return [chunk async for chunk in provider.stream_chat(req)]


def test_registered() -> None:
    assert PROVIDERS["azure_openai"] == "headrace.providers.azure_openai:AzureOpenAIProvider"
    assert load("azure_openai") is AzureOpenAIProvider


async def test_deployment_url_api_version_and_api_key(fake: AzureFake, pool: SessionPool) -> None:
    await make(fake, pool).chat(request(temperature=0.3, reasoning_effort="low"))
    assert fake.last_path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert fake.last_query == {"api-version": "2024-10-21"}
    assert fake.last_headers["api-key"] == KEY
    assert "Authorization" not in fake.last_headers
    # The OpenAI body as the client sent it; ``model`` is sent (the deployment name), and
    # Azure routes by the URL.
    assert fake.last_body == {
        "model": DEPLOYMENT,
        "messages": USER,
        "temperature": 0.3,
        "reasoning_effort": "low",
    }


async def test_api_version_option_and_base_url_ending_in_openai(
    fake: AzureFake, pool: SessionPool
) -> None:
    provider = make(fake, pool, base_url=fake.url + "/openai/", api_version="2025-01-01-preview")
    await provider.chat(request())
    assert fake.last_path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert fake.last_query == {"api-version": "2025-01-01-preview"}


async def test_answer_passes_through(fake: AzureFake, pool: SessionPool) -> None:
    response = await make(fake, pool).chat(request())
    assert response.body == load_json("azure", "chat_completion.json")
    assert response.usage == Usage(prompt_tokens=14, completion_tokens=11)


async def test_stream_skips_filter_only_chunks_and_reports_usage(
    fake: AzureFake, pool: SessionPool
) -> None:
    chunks = await collect(make(fake, pool), request(stream=True))
    assert fake.last_body is not None
    assert fake.last_body["stream_options"] == {"include_usage": True}
    assert all(c.body["choices"] or c.usage for c in chunks)
    assert not any("prompt_filter_results" in c.body for c in chunks)
    text = "".join(
        c.body["choices"][0]["delta"].get("content") or "" for c in chunks if c.body["choices"]
    )
    assert text == "Rivers carry water from high ground to the sea."
    assert chunks[-1].body["choices"] == []
    assert chunks[-1].usage == Usage(prompt_tokens=14, completion_tokens=11)


async def test_stream_tool_calls_reassemble_to_the_unstreamed_answer(
    fake: AzureFake, pool: SessionPool
) -> None:
    fake.scenario = "tool_calls"
    provider = make(fake, pool)
    expected = (await provider.chat(request())).body["choices"][0]["message"]["tool_calls"]
    chunks = await collect(provider, request(stream=True))
    arguments = ""
    starts = []
    for chunk in chunks:
        for choice in chunk.body["choices"]:
            for call in choice["delta"].get("tool_calls") or []:
                if "id" in call:
                    starts.append((call["id"], call["function"]["name"]))
                arguments += call["function"].get("arguments", "")
    assert starts == [(c["id"], c["function"]["name"]) for c in expected]
    assert orjson.loads(arguments) == orjson.loads(expected[0]["function"]["arguments"])
    assert chunks[-1].usage == Usage(prompt_tokens=82, completion_tokens=19)


async def test_embeddings(fake: AzureFake, pool: SessionPool) -> None:
    provider = make(fake, pool, model="embed-prod")
    fake.deployment = "embed-prod"
    response = await provider.embed(
        EmbeddingRequest(model="embed", inputs=["a river", "a lake"], body={"model": "embed"})
    )
    assert fake.last_path == "/openai/deployments/embed-prod/embeddings"
    assert fake.last_query == {"api-version": "2024-10-21"}
    assert fake.last_body == {
        "model": "embed-prod",
        "input": ["a river", "a lake"],
        "encoding_format": "float",
    }
    assert response.vectors == [
        [0.0023, -0.0093, 0.0157, -0.0089],
        [0.0118, -0.0302, 0.0441, -0.0027],
    ]
    assert response.usage == Usage(prompt_tokens=6)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("scenario", "error", "code"),
    [
        ("content_filter", UpstreamRejectedError, "content_filter"),
        ("context_length", UpstreamRejectedError, "context_length_exceeded"),
        ("rate_limited", UpstreamRateLimitedError, "upstream_rate_limited"),
    ],
)
async def test_error_mapping(
    fake: AzureFake,
    pool: SessionPool,
    scenario: str,
    error: type[UpstreamError],
    code: str,
    stream: bool,
) -> None:
    fake.scenario = scenario
    provider = make(fake, pool)
    call = collect(provider, request(stream=True)) if stream else provider.chat(request())
    with pytest.raises(UpstreamError) as info:
        await call
    exc = info.value
    assert type(exc) is error
    assert exc.code == code
    assert exc.deployment == "azure/0"
    assert KEY not in exc.message
    if scenario == "content_filter":
        assert "content management policy" in exc.message
        assert classify(exc) is ErrorClass.PERMANENT
    if scenario == "context_length":
        assert classify(exc) is ErrorClass.CONTEXT_LENGTH
    if scenario == "rate_limited":
        assert exc.retry_after_s == 7
        assert exc.headers == {"Retry-After": "7"}


async def test_wrong_key_and_unknown_deployment(fake: AzureFake, pool: SessionPool) -> None:
    wrong = "azure-wrong-key-9876543210"
    with pytest.raises(UpstreamStatusError) as info:
        await make(fake, pool, key=wrong).chat(request())
    assert info.value.upstream_status == 401
    assert "API key environment variable" in info.value.message
    assert wrong not in info.value.message

    with pytest.raises(UpstreamRejectedError) as rejected:
        await make(fake, pool, model="no-such-deployment").chat(request())
    assert rejected.value.upstream_status == 404
    assert "deployment for this resource does not exist" in rejected.value.message
    assert rejected.value.code == "upstream_rejected"


async def test_check(fake: AzureFake, pool: SessionPool) -> None:
    await make(fake, pool).check()
    assert fake.last_path == "/openai/models"
    assert fake.last_query == {"api-version": "2024-10-21"}


async def test_openai_sdk_through_headrace_to_azure(
    fake: AzureFake, gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADRACE_TEST_AZURE_KEY", KEY)
    deployment = DeploymentConfig(
        provider="azure_openai",
        model=DEPLOYMENT,
        base_url=fake.url,
        api_key_env="HEADRACE_TEST_AZURE_KEY",
        options={"api_version": "2024-10-21"},
    )
    client, _ = await gateway(models=[ModelConfig(name="gpt-4o", deployments=[deployment])])
    sdk = openai.AsyncOpenAI(
        api_key=ADMIN_KEY, base_url="http://headrace.test/v1", http_client=client, max_retries=0
    )
    answer = await sdk.chat.completions.create(model="gpt-4o", messages=USER)
    assert answer.choices[0].message.content == "Rivers carry water from high ground to the sea."

    stream = await sdk.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)  # no filter-only chunks, no usage chunk
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == answer.choices[0].message.content

    fake.scenario = "content_filter"
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(model="gpt-4o", messages=USER)
    assert info.value.code == "content_filter"
