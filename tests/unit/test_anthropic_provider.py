"""The Anthropic adapter against a fake that speaks Anthropic's documented wire format."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest

from headrace.api.wire import chat_request
from headrace.config import DeploymentConfig, ModelConfig
from headrace.domain import ChatChunk, ChatRequest, Deployment, EmbeddingRequest, Timeouts, Usage
from headrace.errors import (
    InvalidRequestError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamRejectedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from headrace.providers.anthropic import AnthropicProvider
from headrace.providers.anthropic_translate import messages_request
from headrace.providers.http import SessionPool
from headrace.providers.registry import PROVIDERS, ProviderContext, load
from headrace.routing.classify import ErrorClass, classify
from tests.conftest import ADMIN_KEY, GatewayFactory
from tests.fakes import load_json, serve
from tests.fakes.anthropic_fake import AnthropicFake

KEY = "sk-ant-test-0123456789"
MODEL = "claude-sonnet-4-20250514"
USER = [{"role": "user", "content": "tell me about rivers"}]


@pytest.fixture
async def fake() -> AsyncIterator[AnthropicFake]:
    fake = AnthropicFake(api_key=KEY)
    async with serve(fake.app()) as url:
        fake.url = url
        yield fake


@pytest.fixture
async def pool() -> AsyncIterator[SessionPool]:
    pool = SessionPool()
    yield pool
    await pool.aclose()


def make(
    fake: AnthropicFake,
    pool: SessionPool,
    *,
    key: str | None = KEY,
    timeouts: Timeouts | None = None,
    **options: Any,
) -> AnthropicProvider:
    deployment = Deployment(
        name="claude/0",
        kind="anthropic",
        model=MODEL,
        base_url=fake.url,
        api_key=key,
        timeouts=timeouts or Timeouts(),
        options=options,
    )
    return AnthropicProvider(deployment, ProviderContext(http=pool))


def request(**body: Any) -> ChatRequest:
    return chat_request({"model": "claude", "messages": USER, **body})


async def collect(provider: AnthropicProvider, req: ChatRequest) -> list[ChatChunk]:
    return [chunk async for chunk in provider.stream_chat(req)]


def assemble_tool_calls(chunks: list[ChatChunk]) -> list[dict[str, Any]]:
    """Rebuild tool calls from streamed deltas, as OpenAI's clients do."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.body["choices"]:
            for delta in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(
                    delta["index"], {"type": "function", "function": {"arguments": ""}}
                )
                if "id" in delta:
                    call["id"] = delta["id"]
                function = delta.get("function", {})
                if "name" in function:
                    call["function"]["name"] = function["name"]
                call["function"]["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)]


# -- registry ---------------------------------------------------------------------------------


def test_registered() -> None:
    assert PROVIDERS["anthropic"] == "headrace.providers.anthropic:AnthropicProvider"
    assert load("anthropic") is AnthropicProvider


# -- requests -----------------------------------------------------------------------------------


async def test_request_translation_matches_the_documented_shape(
    fake: AnthropicFake, pool: SessionPool
) -> None:
    fake.scenario = "tool_use"
    body = load_json("anthropic", "openai_request_tools.json")
    await make(fake, pool).chat(chat_request(body))
    assert fake.last_body == load_json("anthropic", "messages_request_tools.json")
    assert fake.last_headers["x-api-key"] == KEY
    assert fake.last_headers["anthropic-version"] == "2023-06-01"
    assert fake.last_headers["Content-Type"] == "application/json"
    assert "Authorization" not in fake.last_headers


async def test_anthropic_version_and_default_max_tokens_come_from_options(
    fake: AnthropicFake, pool: SessionPool
) -> None:
    provider = make(fake, pool, anthropic_version="2024-01-01", default_max_tokens=100)
    await provider.chat(request())
    assert fake.last_headers["anthropic-version"] == "2024-01-01"
    assert fake.last_body is not None
    assert fake.last_body["max_tokens"] == 100
    assert fake.last_body["messages"] == [{"role": "user", "content": "tell me about rivers"}]
    assert "system" not in fake.last_body
    assert "stream" not in fake.last_body


async def test_max_tokens_default_and_precedence(fake: AnthropicFake, pool: SessionPool) -> None:
    provider = make(fake, pool)
    await provider.chat(request())
    assert fake.last_body is not None
    assert fake.last_body["max_tokens"] == 4096
    await provider.chat(request(max_tokens=64))
    assert fake.last_body["max_tokens"] == 64
    await provider.chat(request(max_tokens=64, max_completion_tokens=32))
    assert fake.last_body["max_tokens"] == 32


NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (NAMED, None, {"type": "tool", "name": "get_time"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, None, None),
    ],
)  # fmt: skip
def test_tool_choice(choice: object, parallel: object, expected: object) -> None:
    body: dict[str, Any] = {
        "messages": USER,
        "tools": [{"type": "function", "function": {"name": "get_time"}}],
    }
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    out = messages_request(body, model=MODEL, default_max_tokens=10, stream=False)
    assert out.get("tool_choice") == expected
    assert out["tools"] == [
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
    ]


def test_stop_string_or_list() -> None:
    out = messages_request(
        {"messages": USER, "stop": ["a", "b"]}, model=MODEL, default_max_tokens=1, stream=True
    )
    assert out["stop_sequences"] == ["a", "b"]
    assert out["stream"] is True


def test_a_new_tool_result_message_after_a_user_message() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "x"},
        ]
    }
    out = messages_request(body, model=MODEL, default_max_tokens=1, stream=False)
    assert out["messages"][1] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}],
    }


def user_part(part: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [part]}]}


PART0 = "messages[0].content[0]"


BAD_CALL = {
    "role": "assistant",
    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
        ({"tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
        (user_part({"type": "input_audio", "input_audio": {}}), PART0),
        (user_part({"type": "image_url", "image_url": {"url": "ftp://x"}}), PART0),
        ({"messages": [BAD_CALL]}, "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0]"),
    ],
)  # fmt: skip
def test_what_anthropic_cannot_do_is_rejected(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        messages_request(
            {"messages": USER, **extra}, model=MODEL, default_max_tokens=1, stream=False
        )
    assert info.value.param == param
    assert info.value.status == 400


def test_translation_does_not_modify_the_clients_body() -> None:
    body = load_json("anthropic", "openai_request_tools.json")
    before = copy.deepcopy(body)
    messages_request(body, model=MODEL, default_max_tokens=1, stream=False)
    assert body == before


# -- responses ----------------------------------------------------------------------------------


async def test_text_answer(fake: AnthropicFake, pool: SessionPool) -> None:
    response = await make(fake, pool).chat(request())
    body = response.body
    assert body["object"] == "chat.completion"
    assert body["id"] == "msg_013Zva2CMHLNnXjNJJKqJ2EF"
    assert body["model"] == MODEL
    assert body["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Rivers carry water from high ground to the sea.",
                "refusal": None,
            },
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    # input 12 + cache read 2000 + cache creation 100
    assert response.usage == Usage(prompt_tokens=2112, completion_tokens=11, cached_tokens=2000)
    assert body["usage"] == {
        "prompt_tokens": 2112,
        "completion_tokens": 11,
        "total_tokens": 2123,
        "prompt_tokens_details": {"cached_tokens": 2000},
    }
    assert response.exhausted_for_s is None


async def test_tool_use_answer(fake: AnthropicFake, pool: SessionPool) -> None:
    fake.scenario = "tool_use"
    response = await make(fake, pool).chat(request())
    choice = response.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check the weather and the time in San Francisco."
    calls = choice["message"]["tool_calls"]
    assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
        ("toolu_01A09q90qw90lq917835lq9", "function", "get_weather"),
        ("toolu_01B2xCq9mN3Pq8rT4vW5yZ6a", "function", "get_time"),
    ]
    assert orjson.loads(calls[0]["function"]["arguments"]) == {
        "location": "San Francisco, CA",
        "unit": "celsius",
    }
    assert response.usage == Usage(prompt_tokens=472, completion_tokens=89)


async def test_used_up_quota_is_reported(fake: AnthropicFake, pool: SessionPool) -> None:
    fake.quota_exhausted = True
    response = await make(fake, pool).chat(request())
    assert response.exhausted_for_s is not None
    assert 25 < response.exhausted_for_s <= 30


# -- streams ----------------------------------------------------------------------------------


async def test_stream_text(fake: AnthropicFake, pool: SessionPool) -> None:
    provider = make(fake, pool)
    answer = await provider.chat(request())
    chunks = await collect(provider, request(stream=True))
    assert fake.last_body is not None
    assert fake.last_body["stream"] is True
    assert "stream_options" not in fake.last_body
    bodies = [c.body for c in chunks]
    assert all(b["object"] == "chat.completion.chunk" for b in bodies)
    assert {b["id"] for b in bodies} == {"msg_013Zva2CMHLNnXjNJJKqJ2EF"}
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(b["choices"][0]["delta"].get("content") or "" for b in bodies if b["choices"])
    assert text == answer.body["choices"][0]["message"]["content"]
    assert bodies[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert bodies[-1]["choices"] == []
    assert bodies[-1]["usage"] == answer.body["usage"]
    assert chunks[-1].usage == answer.usage
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)


async def test_stream_tool_calls_reassemble_to_the_unstreamed_answer(
    fake: AnthropicFake, pool: SessionPool
) -> None:
    fake.scenario = "tool_use"
    provider = make(fake, pool)
    answer = (await provider.chat(request())).body["choices"][0]
    chunks = await collect(provider, request(stream=True))
    streamed = assemble_tool_calls(chunks)
    expected = answer["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"]) for c in streamed] == [
        (c["id"], c["function"]["name"]) for c in expected
    ]
    assert [orjson.loads(c["function"]["arguments"]) for c in streamed] == [
        orjson.loads(c["function"]["arguments"]) for c in expected
    ]
    starts = [
        d
        for c in chunks
        for choice in c.body["choices"]
        for d in choice["delta"].get("tool_calls", [])
        if "id" in d
    ]
    assert starts[0] == {
        "index": 0,
        "id": "toolu_01A09q90qw90lq917835lq9",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    finishes = [c.body["choices"][0]["finish_reason"] for c in chunks if c.body["choices"]]
    assert finishes[-1] == "tool_calls"
    assert chunks[-1].usage == Usage(prompt_tokens=472, completion_tokens=89)


async def test_error_event_mid_stream(fake: AnthropicFake, pool: SessionPool) -> None:
    fake.scenario = "stream_error"
    received: list[ChatChunk] = []

    async def consume() -> None:
        async for chunk in make(fake, pool).stream_chat(request(stream=True)):
            received.append(chunk)

    with pytest.raises(UpstreamStatusError) as info:
        await consume()
    assert "overloaded_error" in info.value.message
    assert "claude/0" in info.value.message
    assert [c.body["choices"][0]["delta"] for c in received] == [
        {"role": "assistant", "content": ""},
        {"content": "Rivers"},
    ]


async def test_stream_without_message_stop(fake: AnthropicFake, pool: SessionPool) -> None:
    fake.scenario = "stream_truncated"
    with pytest.raises(UpstreamStatusError, match="before message_stop"):
        await collect(make(fake, pool), request(stream=True))


async def test_first_token_timeout(fake: AnthropicFake, pool: SessionPool) -> None:
    fake.stream_delay_s = 2.0
    provider = make(fake, pool, timeouts=Timeouts(first_token_s=0.2))
    with pytest.raises(UpstreamTimeoutError, match=r"no first token within 0\.2 s"):
        await collect(provider, request(stream=True))


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("scenario", "error", "status"),
    [
        ("rate_limited", UpstreamRateLimitedError, 429),
        ("overloaded", UpstreamUnavailableError, 529),
        ("prompt_too_long", UpstreamRejectedError, 400),
        ("server_error", UpstreamStatusError, 500),
    ],
)
async def test_error_mapping(
    fake: AnthropicFake,
    pool: SessionPool,
    scenario: str,
    error: type[UpstreamError],
    status: int,
    stream: bool,
) -> None:
    fake.scenario = scenario
    provider = make(fake, pool)
    call = collect(provider, request(stream=True)) if stream else provider.chat(request())
    with pytest.raises(UpstreamError) as info:
        await call
    exc = info.value
    assert type(exc) is error
    assert exc.upstream_status == status
    assert exc.deployment == "claude/0"
    assert "claude/0" in exc.message
    assert KEY not in exc.message
    assert KEY not in orjson.dumps(exc.to_openai()).decode()
    if scenario == "rate_limited":
        assert exc.retry_after_s == 7
        assert exc.headers == {"Retry-After": "7"}
        assert "rate_limit_error" in exc.message
    if scenario == "prompt_too_long":
        assert exc.code == "context_length_exceeded"
        assert classify(exc) is ErrorClass.CONTEXT_LENGTH
    if scenario == "overloaded":
        assert classify(exc) is ErrorClass.TRANSIENT


async def test_wrong_key(fake: AnthropicFake, pool: SessionPool) -> None:
    wrong = "sk-ant-wrong-key-9876543210"
    with pytest.raises(UpstreamStatusError) as info:
        await make(fake, pool, key=wrong).chat(request())
    assert info.value.upstream_status == 401
    assert "API key environment variable" in info.value.message
    assert wrong not in info.value.message
    assert classify(info.value) is ErrorClass.PERMANENT


async def test_the_fake_enforces_the_wire_format(fake: AnthropicFake) -> None:
    """What the adapter must get right, the fake refuses as Anthropic does."""
    url = fake.url + "/v1/messages"
    body = {"model": MODEL, "messages": USER}
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={**body, "max_tokens": 5}, headers=headers) as r:
            assert r.status == 400
            assert await r.json() == {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "anthropic-version: header is required",
                },
            }
        headers["anthropic-version"] = "2023-06-01"
        async with session.post(url, json=body, headers=headers) as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "max_tokens: Field required"
        async with session.post(url, json={**body, "max_tokens": 5, "n": 1}, headers=headers) as r:
            assert (await r.json())["error"]["message"] == "n: Extra inputs are not permitted"


async def test_embeddings_are_refused(fake: AnthropicFake, pool: SessionPool) -> None:
    with pytest.raises(InvalidRequestError, match="no embeddings API"):
        await make(fake, pool).embed(EmbeddingRequest(model="claude", inputs=["x"], body={}))


async def test_check(fake: AnthropicFake, pool: SessionPool) -> None:
    await make(fake, pool).check()
    async with serve(AnthropicFake().app()) as url:
        pass  # a port that was just freed: nothing listens there now
    deployment = Deployment(name="gone/0", kind="anthropic", model=MODEL, base_url=url)
    with pytest.raises(UpstreamUnavailableError):
        await AnthropicProvider(deployment, ProviderContext(http=pool)).check()


def test_base_url_default() -> None:
    deployment = Deployment(name="c", kind="anthropic", model=MODEL)
    provider = AnthropicProvider(deployment, ProviderContext(http=SessionPool()))
    assert provider._base == "https://api.anthropic.com"


# -- through the gateway, with the official openai SDK -----------------------------------------


async def test_openai_sdk_through_headrace_to_anthropic(
    fake: AnthropicFake, gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADRACE_TEST_ANTHROPIC_KEY", KEY)
    deployment = DeploymentConfig(
        provider="anthropic",
        model=MODEL,
        base_url=fake.url,
        api_key_env="HEADRACE_TEST_ANTHROPIC_KEY",
    )
    client, _ = await gateway(models=[ModelConfig(name="claude", deployments=[deployment])])
    sdk = openai.AsyncOpenAI(
        api_key=ADMIN_KEY, base_url="http://headrace.test/v1", http_client=client, max_retries=0
    )

    raw = await sdk.chat.completions.with_raw_response.create(model="claude", messages=USER)
    answer = raw.parse()
    assert raw.headers["x-headrace-deployment"] == "claude/0"
    assert answer.choices[0].message.content == "Rivers carry water from high ground to the sea."
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 2112
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 2000

    fake.scenario = "tool_use"
    tools: Any = load_json("anthropic", "openai_request_tools.json")["tools"]
    unstreamed = await sdk.chat.completions.create(model="claude", messages=USER, tools=tools)
    stream = await sdk.chat.completions.create(
        model="claude",
        messages=USER,
        tools=tools,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    arguments: dict[int, str] = {}
    names: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                arguments[call.index] = arguments.get(call.index, "") + (
                    (call.function.arguments or "") if call.function else ""
                )
    expected = unstreamed.choices[0].message.tool_calls or []
    assert [names[i] for i in sorted(names)] == [c.function.name for c in expected]
    assert [orjson.loads(arguments[i]) for i in sorted(arguments)] == [
        orjson.loads(c.function.arguments) for c in expected
    ]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 89
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    fake.scenario = "prompt_too_long"
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(model="claude", messages=USER)
    assert info.value.code == "context_length_exceeded"
    assert KEY not in str(info.value.body)


async def test_plain_httpx_stream_through_headrace(
    fake: AnthropicFake, gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without include_usage, the gateway drops the usage-only chunk."""
    monkeypatch.setenv("HEADRACE_TEST_ANTHROPIC_KEY", KEY)
    deployment = DeploymentConfig(
        provider="anthropic",
        model=MODEL,
        base_url=fake.url,
        api_key_env="HEADRACE_TEST_ANTHROPIC_KEY",
    )
    client, _ = await gateway(models=[ModelConfig(name="claude", deployments=[deployment])])
    body = {"model": "claude", "messages": USER, "stream": True}
    response: httpx.Response = await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200
    data = [e[6:] for e in response.text.split("\n\n") if e.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert all(c["choices"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Rivers carry water from high ground to the sea."
