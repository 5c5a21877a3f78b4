"""The official openai SDK against a real ``headrace serve`` proxying a real mock upstream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.e2e.conftest import ADMIN_KEY, Server

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "tell me about rivers"}]


def sync_client(gateway: Server, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=30)


def async_client(gateway: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30
    )


@contextlib.contextmanager
def faults(mock: Server, **settings: Any) -> Iterator[None]:
    """Set mock-upstream faults for the duration of a block."""
    httpx.put(f"{mock.url}/_mock/faults", json=settings).raise_for_status()
    try:
        yield
    finally:
        httpx.put(f"{mock.url}/_mock/faults", json={}).raise_for_status()


def test_chat_sync(gateway: Server) -> None:
    raw = sync_client(gateway).chat.completions.with_raw_response.create(
        model="mock-model", messages=USER
    )
    answer = raw.parse()
    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 4
    assert raw.headers["x-headrace-model"] == "mock-model"
    assert raw.headers["x-headrace-deployment"] == "mock-model/0"
    assert raw.headers["x-request-id"]


async def test_chat_async(gateway: Server) -> None:
    async with async_client(gateway) as client:
        answers = await asyncio.gather(
            *(client.chat.completions.create(model="mock-model", messages=USER) for _ in range(20))
        )
    assert all(a.choices[0].message.content for a in answers)


def test_chat_stream_with_usage(gateway: Server) -> None:
    stream = sync_client(gateway).chat.completions.create(
        model="mock-model",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert [c for c in chunks[:-1] if c.usage] == []


async def test_chat_stream_without_usage_async(gateway: Server) -> None:
    async with async_client(gateway) as client:
        stream = await client.chat.completions.create(
            model="mock-model", messages=USER, stream=True
        )
        chunks = [c async for c in stream]
    assert chunks
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_and_embeddings_via_upstream(gateway: Server) -> None:
    client = sync_client(gateway)
    ids = {m.id for m in client.models.list()}
    assert {"mock-model", "smollm2-135m-instruct", "all-minilm-l6-v2"} <= ids
    vectors = client.embeddings.create(model="mock-embed", input=["a", "b c"])
    assert [d.index for d in vectors.data] == [0, 1]
    assert len(vectors.data[0].embedding) == 16


# -- errors ------------------------------------------------------------------------------------


def test_wrong_key_is_refused(gateway: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        sync_client(gateway, key="hr_not-a-key").chat.completions.create(
            model="mock-model", messages=USER
        )


def test_unknown_model_lists_the_available_ones(gateway: Server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sync_client(gateway).chat.completions.create(model="gpt-17", messages=USER)
    assert "mock-model" in str(info.value)


def test_schema_violation_names_the_field(gateway: Server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sync_client(gateway).chat.completions.create(
            model="mock-model", messages=USER, temperature=7
        )
    assert info.value.param == "temperature"  # type: ignore[attr-defined]


def test_malformed_json_and_oversized_body(gateway: Server) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    bad = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{oops", headers=headers)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"x" * 70_000, headers=headers)
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("status", "exception", "gateway_status"),
    [
        (500, openai.InternalServerError, 502),
        (503, openai.InternalServerError, 503),
        (429, openai.RateLimitError, 429),
    ],
)
def test_upstream_errors(
    gateway: Server, mock_upstream: Server, status: int, exception: type, gateway_status: int
) -> None:
    with (
        faults(mock_upstream, error_rate=1.0, error_statuses=str(status)),
        pytest.raises(exception) as info,
    ):
        sync_client(gateway).chat.completions.create(model="mock-model", messages=USER)
    error = info.value
    assert error.status_code == gateway_status
    assert "mock-model/0" in str(error)
    if status == 429:
        assert error.response.headers.get("retry-after") == "1"
        time.sleep(1.1)  # the deployment cools down for Retry-After; let it pass


def test_upstream_hang_times_out_as_504(gateway: Server, mock_upstream: Server) -> None:
    with faults(mock_upstream, hang_rate=1.0), pytest.raises(openai.APIStatusError) as info:
        sync_client(gateway).chat.completions.create(model="mock-model", messages=USER, stream=True)
    assert info.value.status_code == 504


def test_upstream_malformed_json_is_502(gateway: Server, mock_upstream: Server) -> None:
    with (
        faults(mock_upstream, malformed_rate=1.0),
        pytest.raises(openai.InternalServerError) as info,
    ):
        sync_client(gateway).chat.completions.create(model="mock-model", messages=USER)
    assert info.value.status_code == 502


def test_stream_cut_midway_reaches_the_client_as_an_error(
    gateway: Server, mock_upstream: Server
) -> None:
    with faults(mock_upstream, cut_rate=1.0):
        stream = sync_client(gateway).chat.completions.create(
            model="mock-model", messages=USER, stream=True
        )
        with pytest.raises(openai.APIError, match="mock-model/0"):
            list(stream)


def test_upstream_key_never_leaks(gateway: Server, mock_upstream: Server) -> None:
    with (
        faults(mock_upstream, error_rate=1.0, error_statuses="500"),
        pytest.raises(openai.APIStatusError) as info,
    ):
        sync_client(gateway).chat.completions.create(model="mock-model", messages=USER)
    assert "sk-upstream-secret" not in info.value.response.text
    assert "sk-upstream-secret" not in gateway.output()


async def test_client_disconnect_mid_stream_cancels_the_upstream_call(
    gateway: Server, mock_upstream: Server
) -> None:
    httpx.post(f"{mock_upstream.url}/_mock/reset").raise_for_status()
    with faults(mock_upstream, inter_chunk_ms=200):
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream(
                "POST",
                f"{gateway.url}/v1/chat/completions",
                json={"model": "mock-model", "messages": USER, "stream": True},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            ) as response,
        ):
            async for _ in response.aiter_lines():
                break  # first event received: hang up
        for _ in range(50):
            stats = httpx.get(f"{mock_upstream.url}/_mock/stats").json()
            if stats.get("client_disconnects", 0) >= 1:
                break
            await asyncio.sleep(0.1)
    assert stats.get("client_disconnects", 0) >= 1, stats


def test_unknown_fields_reach_the_upstream_untouched(
    gateway: Server, mock_upstream: Server
) -> None:
    sync_client(gateway).chat.completions.create(
        model="mock-model",
        messages=USER,
        logit_bias={"42": -100},
        extra_body={"x_vendor_option": {"nested": [1, 2.5, None]}, "top_k": 7},
    )
    seen = orjson.loads(httpx.get(f"{mock_upstream.url}/_mock/stats").json()["last_chat_body"])
    assert seen["x_vendor_option"] == {"nested": [1, 2.5, None]}
    assert seen["top_k"] == 7
    assert seen["logit_bias"] == {"42": -100}
    assert seen["model"] == "mock-model"


def test_a_cached_stream_replays_through_the_sdk_parser(gateway: Server) -> None:
    client = sync_client(gateway)
    request = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "replay this stream please"}],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    results = []
    for _ in range(2):
        with client.chat.completions.with_streaming_response.create(**request) as raw:
            chunks = list(raw.parse())
            results.append((raw.headers["x-headrace-cache"], chunks))
    (first_state, live), (second_state, replay) = results
    assert (first_state, second_state) == ("miss", "hit")
    assert [c.model_dump() for c in replay] == [c.model_dump() for c in live]
    assert replay[-1].usage is not None
    assert "".join(c.choices[0].delta.content or "" for c in replay if c.choices)
