"""Traces through the HTTP edge, exported to memory: a server span per request, a client span
per upstream attempt under it, the caller's ``traceparent`` continued, and the attempt's
context sent upstream. tests/e2e/test_tracing_otlp.py exports from a real ``headrace serve``
over OTLP/HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from headrace.config import ConfigError, DeploymentConfig, JobsConfig, ModelConfig, TracingConfig
from headrace.observability.tracing import Tracing
from headrace.wiring import build_tracing
from tests.api.conftest import Receiver
from tests.api.test_batches_api import jsonl, line, start_batch, wait_batch
from tests.api.test_jobs_api import wait_final
from tests.conftest import AUTH, GatewayFactory, echo_models
from tests.sockets import free_port

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "three small words"}]}


class Upstream:
    """An OpenAI-compatible upstream that answers one chat completion and keeps the headers
    of every request it got."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.server = TestServer(app, host="127.0.0.1")

    async def _chat(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": "upstream-model-2026",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hello"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            }
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.server.start_server()
    yield up
    await up.server.close()


Traced = Callable[..., Any]


@pytest.fixture
def traced(gateway: GatewayFactory) -> Traced:
    """Factory: ``await traced(models, tracing=True)`` → (client, the spans' exporter)."""

    async def factory(
        models: list[ModelConfig] | None = None, *, tracing: bool = True
    ) -> tuple[httpx.AsyncClient, InMemorySpanExporter]:
        exporter = InMemorySpanExporter()
        client, _ = await gateway(
            models=models or echo_models(),
            tracing=Tracing.exporting(exporter, batch=False) if tracing else None,
        )
        return client, exporter

    return factory


def by_kind(exporter: InMemorySpanExporter) -> Iterator[tuple[ReadableSpan, list[ReadableSpan]]]:
    """Each server span with the client spans under it, in the order they ended."""
    spans = exporter.get_finished_spans()
    for server in (s for s in spans if s.kind is SpanKind.SERVER):
        children = [
            s
            for s in spans
            if s.kind is SpanKind.CLIENT
            and s.parent is not None
            and s.parent.span_id == server.context.span_id
        ]
        yield server, children


def upstream_model(base_url: str, name: str = "chat") -> ModelConfig:
    return ModelConfig(
        name=name,
        deployments=[
            DeploymentConfig(provider="openai_compatible", model="up-model", base_url=base_url)
        ],
    )


async def test_a_request_is_a_server_span_with_its_attempt_under_it(traced: Traced) -> None:
    client, exporter = await traced()
    response = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    [(server, [attempt])] = list(by_kind(exporter))

    assert server.name == "POST /v1/chat/completions"
    assert server.attributes is not None
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["headrace.request_id"] == response.headers["x-request-id"]
    assert server.attributes["headrace.key_id"] == "admin-env"
    assert server.attributes["gen_ai.request.model"] == "echo"
    assert server.attributes["gen_ai.usage.input_tokens"] == 3
    assert server.status.status_code is StatusCode.UNSET
    assert server.parent is None  # no traceparent came in: a new trace
    assert server.resource.attributes["service.name"] == "headrace"

    assert attempt.name == "chat echo-1"
    assert attempt.context.trace_id == server.context.trace_id
    assert attempt.attributes is not None
    assert attempt.attributes["gen_ai.operation.name"] == "chat"
    assert attempt.attributes["gen_ai.provider.name"] == "echo"
    assert attempt.attributes["gen_ai.request.model"] == "echo-1"
    assert attempt.attributes["headrace.deployment"] == "echo/0"
    assert attempt.attributes["gen_ai.usage.input_tokens"] == 3
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 3


async def test_the_callers_traceparent_is_continued(traced: Traced) -> None:
    client, exporter = await traced()
    headers = {**AUTH, "traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "vendor=1"}
    await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    [(server, [attempt])] = list(by_kind(exporter))
    assert format(server.context.trace_id, "032x") == TRACE
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == PARENT
    assert attempt.context.trace_id == server.context.trace_id


async def test_an_unsampled_caller_is_not_traced(traced: Traced) -> None:
    client, exporter = await traced()
    headers = {**AUTH, "traceparent": f"00-{TRACE}-{PARENT}-00"}
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=headers)).is_success
    assert exporter.get_finished_spans() == ()


async def test_the_attempt_goes_upstream_as_traceparent(traced: Traced, upstream: Upstream) -> None:
    client, exporter = await traced([upstream_model(upstream.url)])
    body = {**CHAT, "model": "chat"}
    await client.post("/v1/chat/completions", json=body, headers=AUTH)
    [(server, [attempt])] = list(by_kind(exporter))
    sent = upstream.headers[0]["traceparent"]
    ctx = attempt.context
    assert sent == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    assert ctx.trace_flags.sampled
    assert attempt.attributes is not None
    assert attempt.attributes["gen_ai.provider.name"] == "openai_compatible"
    assert attempt.attributes["gen_ai.response.model"] == "upstream-model-2026"
    assert server.attributes is not None
    assert server.attributes["gen_ai.usage.output_tokens"] == 1


async def test_without_tracing_nothing_goes_upstream(traced: Traced, upstream: Upstream) -> None:
    client, _ = await traced([upstream_model(upstream.url)], tracing=False)
    body = {**CHAT, "model": "chat"}
    headers = {**AUTH, "traceparent": f"00-{TRACE}-{PARENT}-01"}
    assert (await client.post("/v1/chat/completions", json=body, headers=headers)).is_success
    assert "traceparent" not in upstream.headers[0]


async def test_a_failed_attempt_is_marked_and_the_next_one_is_its_own_span(
    traced: Traced,
) -> None:
    refused = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    model = upstream_model(refused).model_copy(update={"fallbacks": ["echo"]})
    client, exporter = await traced([model, *echo_models()])
    body = {**CHAT, "model": "chat"}
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    [(server, [*failures, answer])] = list(by_kind(exporter))
    assert failures
    for failure in failures:
        assert failure.name == "chat up-model"
        assert failure.status.status_code is StatusCode.ERROR
        assert failure.attributes is not None
        assert failure.attributes["error.type"] == "UpstreamUnavailableError"
    assert answer.name == "chat echo-1"
    assert answer.status.status_code is StatusCode.UNSET
    assert server.attributes is not None
    assert server.attributes["gen_ai.response.model"] == "echo"


async def test_a_server_error_marks_the_request_span(traced: Traced) -> None:
    refused = f"http://127.0.0.1:{free_port()}/v1"
    client, exporter = await traced([upstream_model(refused)])
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "model": "chat"}, headers=AUTH
    )
    assert response.status_code >= 500
    [(server, attempts)] = list(by_kind(exporter))
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == response.status_code
    assert attempts
    assert all(a.status.status_code is StatusCode.ERROR for a in attempts)


async def test_a_client_error_does_not(traced: Traced) -> None:
    client, exporter = await traced()
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=AUTH
    )
    assert response.status_code == 404
    [(server, attempts)] = list(by_kind(exporter))
    assert attempts == []
    assert server.status.status_code is StatusCode.UNSET
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 404


async def test_a_streamed_attempt_ends_with_the_stream_and_its_usage(traced: Traced) -> None:
    client, exporter = await traced()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
        text = (await r.aread()).decode()
    assert "[DONE]" in text
    [(server, [attempt])] = list(by_kind(exporter))
    assert attempt.end_time is not None
    assert server.end_time is not None
    assert attempt.end_time <= server.end_time
    assert attempt.attributes is not None
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 3


def test_tracing_without_the_sdk_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(
        __import__("sys").modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None
    )
    with pytest.raises(ConfigError, match=r"pip install 'headrace\[otel\]'"):
        build_tracing(TracingConfig(enabled=True))
    assert build_tracing(TracingConfig()) is None


async def test_a_queued_job_run_is_a_consumer_span_with_its_attempt_under_it(
    gateway: GatewayFactory,
) -> None:
    exporter = InMemorySpanExporter()
    client, _ = await gateway(jobs=True, tracing=Tracing.exporting(exporter, batch=False))
    accepted = await client.post("/v1/jobs", json={"body": CHAT, "priority": "high"}, headers=AUTH)
    job = await wait_final(client, accepted.json()["id"])
    assert job["status"] == "succeeded"
    spans = exporter.get_finished_spans()
    [run] = [s for s in spans if s.kind is SpanKind.CONSUMER]
    assert run.name == "job chat"
    assert run.parent is None  # no HTTP request runs it: a trace of its own
    assert run.attributes is not None
    assert run.attributes["headrace.job_id"] == job["id"]
    assert run.attributes["headrace.job.attempt"] == 1
    assert run.attributes["headrace.job.priority"] == "high"
    [attempt] = [
        s for s in spans if s.parent is not None and s.parent.span_id == run.context.span_id
    ]
    assert attempt.name == "chat echo-1"
    assert attempt.kind is SpanKind.CLIENT


def submitted_by(run: ReadableSpan, spans: Sequence[ReadableSpan]) -> str:
    """The name of the server span ``run`` links to as its submission (exactly one link)."""
    [link] = run.links
    assert link.attributes == {"headrace.link": "submitted"}
    [submit] = [s for s in spans if s.context.span_id == link.context.span_id]
    assert submit.context.trace_id == link.context.trace_id
    assert submit.kind is SpanKind.SERVER
    assert run.context.trace_id != submit.context.trace_id  # a trace of its own, linked
    return submit.name


async def test_a_jobs_run_links_to_the_request_that_submitted_it(
    gateway: GatewayFactory,
) -> None:
    exporter = InMemorySpanExporter()
    client, _ = await gateway(jobs=True, tracing=Tracing.exporting(exporter, batch=False))
    caller = f"00-{TRACE}-{PARENT}-01"
    accepted = await client.post(
        "/v1/jobs", json={"body": CHAT}, headers={**AUTH, "traceparent": caller}
    )
    job = await wait_final(client, accepted.json()["id"])
    assert job["status"] == "succeeded"
    spans = exporter.get_finished_spans()
    [run] = [s for s in spans if s.kind is SpanKind.CONSUMER]
    assert submitted_by(run, spans) == "POST /v1/jobs"
    assert format(run.links[0].context.trace_id, "032x") == TRACE  # the caller's trace


async def test_a_batchs_jobs_link_to_the_request_that_created_the_batch(
    gateway: GatewayFactory,
) -> None:
    exporter = InMemorySpanExporter()
    client, _ = await gateway(jobs=True, tracing=Tracing.exporting(exporter, batch=False))
    content = jsonl(line("one"), line("two"))
    batch = await start_batch(client, content)
    assert (await wait_batch(client, batch["id"]))["status"] == "completed"
    spans = exporter.get_finished_spans()
    runs = [s for s in spans if s.kind is SpanKind.CONSUMER]
    assert len(runs) == 2
    assert {submitted_by(run, spans) for run in runs} == {"POST /v1/batches"}


async def test_a_job_submitted_without_a_trace_runs_without_a_link(
    gateway: GatewayFactory,
) -> None:
    # Submitted while tracing was off (or by a process without it), run by one with it on.
    client, rt = await gateway(jobs=True)
    accepted = await client.post("/v1/jobs", json={"body": CHAT}, headers=AUTH)
    job = await wait_final(client, accepted.json()["id"])
    assert rt.job_queue is not None
    stored = await rt.job_queue.get(job["id"])
    assert stored is not None
    assert stored.traceparent is None
    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting(exporter, batch=False)
    span = tracing.start_job("job_x", "chat", 1, "normal", stored.traceparent)
    span.end()
    [run] = exporter.get_finished_spans()
    assert run.links == ()
    garbled = tracing.start_job("job_y", "chat", 1, "normal", "00-not-a-traceparent")
    garbled.end()
    assert exporter.get_finished_spans()[-1].links == ()


async def test_each_webhook_delivery_is_a_client_span_that_goes_with_the_post(
    gateway: GatewayFactory, receiver: Receiver
) -> None:
    url, seen = receiver  # the first POST gets a 500, the second a 204
    exporter = InMemorySpanExporter()
    client, _ = await gateway(
        jobs=JobsConfig(webhooks={"allow_private_targets": True}),
        tracing=Tracing.exporting(exporter, batch=False),
    )
    caller = f"00-{TRACE}-{PARENT}-01"
    accepted = await client.post(
        "/v1/jobs",
        json={"body": CHAT, "webhook_url": f"{url}?token=s3cret"},
        headers={**AUTH, "traceparent": caller},
    )
    assert (await wait_final(client, accepted.json()["id"]))["status"] == "succeeded"
    deadline = time.monotonic() + 10
    while len(deliveries := webhook_spans(exporter)) < 2:
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)
    spans = exporter.get_finished_spans()
    first, second = deliveries
    for number, span in enumerate(deliveries, start=1):
        assert span.name == "webhook job.succeeded"
        assert span.kind is SpanKind.CLIENT
        assert span.parent is None  # a trace of its own, linked to the submission
        assert submitted_by(span, spans) == "POST /v1/jobs"
        assert format(span.links[0].context.trace_id, "032x") == TRACE
        assert span.attributes is not None
        assert span.attributes["headrace.webhook.attempt"] == number
        assert span.attributes["headrace.job_id"] == accepted.json()["id"]
        assert span.attributes["server.address"] == "127.0.0.1"
        assert "s3cret" not in str(dict(span.attributes))  # the URL's query is not recorded
    assert first.attributes is not None
    assert second.attributes is not None
    assert first.attributes["http.response.status_code"] == 500
    assert first.attributes["headrace.webhook.outcome"] == "retry"
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes["http.response.status_code"] == 204
    assert second.attributes["headrace.webhook.outcome"] == "delivered"
    assert second.status.status_code is StatusCode.UNSET
    # Each POST carried its own span as traceparent: the receiver's trace continues it.
    sent = [headers["traceparent"] for headers, _ in seen]
    assert sent == [
        f"00-{s.context.trace_id:032x}-{s.context.span_id:016x}-{s.context.trace_flags:02x}"
        for s in deliveries
    ]


def webhook_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """The webhook delivery spans that have ended, by attempt."""
    spans = [s for s in exporter.get_finished_spans() if s.name.startswith("webhook ")]
    return sorted(spans, key=lambda s: (s.attributes or {}).get("headrace.webhook.attempt", 0))
