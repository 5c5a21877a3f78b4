"""The mock upstream, driven through the official ``openai`` SDK as real clients drive it."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from headrace.mock_upstream import (
    MOCK_UPSTREAM,
    FaultConfig,
    FaultKind,
    LatencyDist,
    MockUpstream,
    build_app,
    decide,
    serve,
)
from headrace.mock_upstream.app import ServerOptions
from headrace.mock_upstream.faults import parse_fault_header, parse_statuses

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there world"},
]


@dataclass
class Running:
    url: str
    mock: MockUpstream
    client: openai.AsyncOpenAI
    http: aiohttp.ClientSession

    async def stats(self) -> dict[str, object]:
        async with self.http.get(f"{self.url}/_mock/stats") as response:
            data: dict[str, object] = await response.json()
            return data


@asynccontextmanager
async def _running(
    faults: FaultConfig | None = None, options: ServerOptions | None = None
) -> AsyncIterator[Running]:
    app = build_app(faults, seed=7, options=options)
    async with serve(app) as url, aiohttp.ClientSession() as http:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="any", max_retries=0)
        try:
            yield Running(url, app[MOCK_UPSTREAM], client, http)
        finally:
            await client.close()


@pytest.fixture
async def mock() -> AsyncIterator[Running]:
    async with _running() as running:
        yield running


# --- OpenAI endpoints ----------------------------------------------------------------


async def test_chat_answers_deterministically_with_usage(mock: Running) -> None:
    answer = await mock.client.chat.completions.create(model="some-model", messages=MESSAGES)

    assert answer.object == "chat.completion"
    assert answer.model == "some-model"
    words = (answer.choices[0].message.content or "").split()
    assert words[:5] == ["mock", "answer:", "hello", "there", "world"]
    assert len(words) == 16
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 16)
    assert answer.usage.total_tokens == 21


async def test_chat_respects_max_tokens(mock: Running) -> None:
    answer = await mock.client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)

    assert answer.choices[0].message.content == "mock answer: hello"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 3


async def test_chat_stream_with_usage(mock: Running) -> None:
    stream = await mock.client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("mock answer: hello there world")
    assert len(text.split()) == 16
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert {c.id for c in chunks} == {chunks[0].id}


async def test_chat_stream_without_usage_has_no_usage_chunk(mock: Running) -> None:
    stream = await mock.client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]

    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


async def test_embeddings_are_deterministic_unit_vectors(mock: Running) -> None:
    # The SDK asks for base64 by default; float asks for plain lists.
    b64 = await mock.client.embeddings.create(model="e", input=["one two", "three"])
    floats = await mock.client.embeddings.create(
        model="e", input=["one two", "three"], encoding_format="float", dimensions=8
    )
    tokens = await mock.client.embeddings.create(model="e", input=[[1, 2, 3]])

    assert [len(d.embedding) for d in b64.data] == [16, 16]
    assert [len(d.embedding) for d in floats.data] == [8, 8]
    assert sum(x * x for x in b64.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    assert b64.data[0].embedding != b64.data[1].embedding
    again = await mock.client.embeddings.create(model="e", input="one two")
    assert again.data[0].embedding == b64.data[0].embedding
    assert b64.usage.prompt_tokens == 3
    assert tokens.usage.prompt_tokens == 3


async def test_models_list_and_retrieve(mock: Running) -> None:
    listed = [model.id async for model in mock.client.models.list()]
    retrieved = await mock.client.models.retrieve("org/any-model")

    assert "mock-model" in listed
    assert retrieved.id == "org/any-model"


async def test_health_and_bad_body(mock: Running) -> None:
    async with mock.http.get(f"{mock.url}/health") as health:
        assert health.status == 200
    async with mock.http.post(f"{mock.url}/v1/chat/completions", data=b"{nope") as bad:
        body = await bad.json()
    async with mock.http.post(f"{mock.url}/v1/chat/completions", json={"messages": []}) as empty:
        assert empty.status == 400

    assert bad.status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]


async def test_required_key() -> None:
    async with _running(options=ServerOptions(require_key="sekrit")) as running:
        with pytest.raises(openai.AuthenticationError) as caught:
            await running.client.chat.completions.create(model="m", messages=MESSAGES)
        good = running.client.with_options(api_key="sekrit")
        answer = await good.chat.completions.create(model="m", messages=MESSAGES)

        assert caught.value.code == "invalid_api_key"
        assert answer.choices[0].message.content
        assert (await running.stats())["rejected"] == 1


# --- faults forced per request -------------------------------------------------------


async def _collect(
    stream: openai.AsyncStream[ChatCompletionChunk], into: list[ChatCompletionChunk]
) -> None:
    async for chunk in stream:
        into.append(chunk)


def _forcing(fault: str) -> dict[str, str]:
    return {"X-Mock-Fault": fault}


async def test_forced_429_is_a_rate_limit_error_with_retry_after(mock: Running) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await mock.client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers=_forcing("429")
        )

    headers = caught.value.response.headers
    assert headers["retry-after"] == "1"
    assert headers["retry-after-ms"] == "1000"
    assert caught.value.code == "rate_limit_exceeded"


async def test_forced_500_is_an_internal_server_error(mock: Running) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await mock.client.embeddings.create(model="e", input="x", extra_headers=_forcing("500"))

    assert caught.value.status_code == 500
    assert caught.value.type == "server_error"


async def test_forced_hang_never_answers(mock: Running) -> None:
    started = time.perf_counter()
    with pytest.raises(openai.APITimeoutError):
        await mock.client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers=_forcing("hang"), timeout=0.3
        )

    assert time.perf_counter() - started >= 0.29
    assert (await mock.stats())["faults"] == {"hang": 1}


async def test_forced_cut_drops_the_connection(mock: Running) -> None:
    # JSON: half the promised body, then the connection closes.
    with pytest.raises(openai.APIConnectionError):
        await mock.client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers=_forcing("cut")
        )

    # Stream: the SDK yields the chunks that arrived, then raises; no finish, no [DONE].
    stream = await mock.client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_headers=_forcing("cut")
    )
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIConnectionError):
        await _collect(stream, received)

    assert len(received) >= 2
    assert all(c.choices[0].finish_reason is None for c in received)


async def test_forced_malformed_answers_200_with_invalid_json(mock: Running) -> None:
    # The SDK does not wrap JSON errors: the caller sees json.JSONDecodeError itself.
    with pytest.raises(json.JSONDecodeError):
        await mock.client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers=_forcing("malformed")
        )
    stream = await mock.client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_headers=_forcing("malformed")
    )
    with pytest.raises(json.JSONDecodeError):
        async for _ in stream:
            pass


async def test_forced_latency(mock: Running) -> None:
    started = time.perf_counter()
    await mock.client.chat.completions.create(
        model="m", messages=MESSAGES, extra_headers={"X-Mock-Latency-Ms": "120"}
    )

    assert time.perf_counter() - started >= 0.115


async def test_unknown_forced_fault_is_a_400(mock: Running) -> None:
    with pytest.raises(openai.BadRequestError, match="X-Mock-Fault"):
        await mock.client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers=_forcing("explode")
        )


async def test_stream_timing_follows_ttft_and_inter_chunk() -> None:
    faults = FaultConfig(ttft_ms=80, inter_chunk_ms=10)
    async with _running(faults, ServerOptions(output_tokens=5)) as running:
        started = time.perf_counter()
        stream = await running.client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True
        )
        arrivals = [time.perf_counter() - started async for _ in stream]

        # Lower bounds only: a loaded machine may be late, never early.
        assert arrivals[0] >= 0.075
        assert arrivals[-1] >= 0.075 + 4 * 0.009


# --- run-time control ----------------------------------------------------------------


async def test_put_faults_changes_behaviour_at_run_time(mock: Running) -> None:
    url = f"{mock.url}/_mock/faults"
    async with mock.http.put(url, json={"error-rate": 1, "error_statuses": "503"}) as put:
        assert put.status == 200
    with pytest.raises(openai.InternalServerError) as caught:
        await mock.client.chat.completions.create(model="m", messages=MESSAGES)
    async with mock.http.patch(url, json={"retry_after_s": 2.5}) as patch:
        patched = await patch.json()
    async with mock.http.put(url, json={}) as cleared:
        assert cleared.status == 200
    answer = await mock.client.chat.completions.create(model="m", messages=MESSAGES)
    async with mock.http.put(url, json={"error_rate": 2}) as invalid:
        problem = await invalid.json()

    assert caught.value.status_code == 503
    assert patched["error_rate"] == 1
    assert patched["retry_after_s"] == 2.5
    assert answer.choices[0].message.content
    assert invalid.status == 400
    assert "error_rate" in problem["error"]["message"]
    assert mock.mock.faults == FaultConfig()


async def test_stats_count_requests_and_faults_and_reset(mock: Running) -> None:
    await mock.client.chat.completions.create(model="m", messages=MESSAGES)
    stream = await mock.client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    async for _ in stream:
        pass
    await mock.client.embeddings.create(model="e", input="x")
    for fault in ("429", "429", "500"):
        with pytest.raises(openai.APIStatusError):
            await mock.client.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers=_forcing(fault)
            )

    stats = await mock.stats()
    async with mock.http.post(f"{mock.url}/_mock/reset") as reset:
        after = await reset.json()

    assert stats["total"] == 6
    assert stats["endpoints"] == {"/v1/chat/completions": 5, "/v1/embeddings": 1}
    assert stats["streams"] == 1
    assert stats["faults"] == {"429": 2, "500": 1}
    assert stats["in_flight"] == 0
    assert after["total"] == 0
    assert after["faults"] == {}


# --- the pure decision ---------------------------------------------------------------


def test_error_rate_holds_over_many_decisions() -> None:
    config = FaultConfig(error_rate=0.3, error_statuses=parse_statuses("429:2,500:1"))
    rng = random.Random(1234)

    decisions = [decide(config, rng) for _ in range(1000)]
    kinds = Counter(d.fault for d in decisions)
    statuses = Counter(d.status for d in decisions if d.fault is FaultKind.ERROR)

    assert 250 <= kinds[FaultKind.ERROR] <= 350
    assert set(kinds) == {FaultKind.ERROR, FaultKind.NONE}
    assert 1.5 <= statuses[429] / statuses[500] <= 2.7


def test_rates_are_exclusive_and_seeded() -> None:
    config = FaultConfig(error_rate=0.1, hang_rate=0.2, cut_rate=0.3, malformed_rate=0.4)

    first = [decide(config, random.Random(5)) for _ in range(3)]
    rng_a, rng_b = random.Random(9), random.Random(9)
    seq_a = [decide(config, rng_a) for _ in range(2000)]
    seq_b = [decide(config, rng_b) for _ in range(2000)]
    kinds = Counter(d.fault for d in seq_a)

    assert first[0] == first[1] == first[2]
    assert seq_a == seq_b
    assert kinds[FaultKind.NONE] == 0
    for kind, rate in [(FaultKind.HANG, 0.2), (FaultKind.CUT, 0.3), (FaultKind.MALFORMED, 0.4)]:
        assert abs(kinds[kind] / 2000 - rate) < 0.05


def test_quiet_config_draws_nothing_and_forcing_wins() -> None:
    rng = random.Random(3)
    state = rng.getstate()

    plain = decide(FaultConfig(latency_ms=25), rng)
    forced = decide(
        FaultConfig(error_rate=1.0),
        rng,
        forced=parse_fault_header("cut"),
        forced_latency_ms=5,
    )

    assert plain.fault is FaultKind.NONE
    assert plain.latency_s == pytest.approx(0.025)
    assert forced.fault is FaultKind.CUT
    assert forced.latency_s == pytest.approx(0.005)
    assert rng.getstate() == state


def test_latency_distributions_stay_in_bounds() -> None:
    rng = random.Random(11)
    uniform = FaultConfig(latency_ms=100, latency_jitter_ms=20)
    normal = FaultConfig(latency_ms=5, latency_jitter_ms=50, latency_dist=LatencyDist.NORMAL)

    uniform_s = [decide(uniform, rng).latency_s for _ in range(500)]
    normal_s = [decide(normal, rng).latency_s for _ in range(500)]

    assert all(0.08 <= s <= 0.12 for s in uniform_s)
    assert min(normal_s) == 0.0  # negative draws clamp to zero
    assert max(normal_s) > 0.05


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"error_rate": 1.5}, "between 0 and 1"),
        ({"error_rate": 0.6, "hang_rate": 0.6}, "sum to 1"),
        ({"latency_ms": -1}, ">= 0"),
        ({"latency_dist": "fixed", "latency_jitter_ms": 5}, "no effect"),
        ({"error_statuses": "200"}, "400-599"),
        ({"error_statuses": "429:x"}, "STATUS:WEIGHT"),
        ({"error_statuses": []}, "at least one"),
        ({"ttft_ms": "fast"}, "must be a number"),
        ({"surprise": 1}, "unknown fault setting"),
    ],
)
def test_bad_fault_config_says_what_to_fix(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        FaultConfig.from_json(changes)


def test_fault_config_round_trips_through_json() -> None:
    config = FaultConfig.from_json(
        {"latency-ms": 5, "error_rate": 0.2, "error_statuses": {"429": 3, "503": 1}}
    )

    assert config.error_statuses == ((429, 3.0), (503, 1.0))
    assert FaultConfig.from_json(config.to_json()) == config
    assert parse_fault_header(" 503 ") == (FaultKind.ERROR, 503)
    with pytest.raises(ValueError, match="needs a status"):
        parse_fault_header("error")
