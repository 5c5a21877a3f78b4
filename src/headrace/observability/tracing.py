"""OpenTelemetry traces: a server span per HTTP request, a client span per upstream attempt.

Off unless ``tracing.enabled``; then :class:`Tracing` holds an SDK ``TracerProvider`` that
exports over OTLP/HTTP (``tracing.endpoint``, a collector's ``/v1/traces``) in batches off the
event loop, sampled by ``tracing.sample_ratio`` unless the caller's ``traceparent`` already
decided. With tracing off, nothing here runs on the request path (the middleware and the router
hold ``None``).

- The request's span (kind SERVER) continues the caller's W3C ``traceparent``/``tracestate``,
  is named ``{method} {route}`` and carries the HTTP attributes of OpenTelemetry's semantic
  conventions plus what the gateway did (``headrace.request_id``, key, cache, cost, tokens).
  Its trace id goes into the access log (``trace_id``).
- Each attempt at a deployment (a retry or a fallback is another one) is a child span (kind
  CLIENT) named ``{gen_ai.operation.name} {gen_ai.request.model}`` with the GenAI conventions'
  attributes: the provider, the upstream model, ``max_tokens``, the tokens used, the finish
  reasons, and ``error.type`` when it failed. HTTP providers send its context upstream as
  ``traceparent`` (:func:`trace_headers`), so an upstream that traces joins the trace.
- A job run by a worker has no HTTP request: each run is a CONSUMER span ``job {operation}`` (job
  id, attempt, priority), the root of its own trace, with its upstream attempts under it. It
  links to the span of the request that submitted the job (``POST /v1/jobs``, or the batch's
  ``POST /v1/batches``), whose ``traceparent`` the job keeps (:func:`current_traceparent`): a
  link rather than a parent, as OpenTelemetry's messaging conventions have it, since a job
  may run hours later, and more than once. Each run is sampled on its own (by
  ``sample_ratio``), so with a ratio below 1 a run may be kept whose submission was not, or
  the other way round.
- Each delivery attempt of a job's webhook event is a CLIENT span ``webhook {event type}``,
  also a root linked to the job's submission; it goes with the POST as ``traceparent``, so a
  receiver that traces continues it.

The API package (``opentelemetry-api``) is a dependency of Headrace; the SDK and the exporter
are the ``otel`` extra, asked for only when tracing is enabled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from headrace import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["Tracing", "current_traceparent", "delivered", "trace_headers"]

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")


class Tracing:
    """The process's tracer (see the module doc); build with :meth:`otlp` or :meth:`exporting`."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("headrace", __version__)

    @classmethod
    def otlp(
        cls,
        endpoint: str,
        *,
        service_name: str = "headrace",
        sample_ratio: float = 1.0,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> Tracing:
        """Export to an OTLP/HTTP collector at ``endpoint`` (its ``/v1/traces`` URL)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=endpoint, headers=dict(headers or {}), timeout=timeout_s
        )
        return cls.exporting(exporter, service_name=service_name, sample_ratio=sample_ratio)

    @classmethod
    def exporting(
        cls,
        exporter: SpanExporter,
        *,
        service_name: str = "headrace",
        sample_ratio: float = 1.0,
        batch: bool = True,
    ) -> Tracing:
        """Spans to ``exporter``: in batches from a thread, or one by one (``batch=False``,
        for tests that read an in-memory exporter)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio))
        )
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
        return cls(provider)

    # -- the request --------------------------------------------------------------------------

    def request_span(self, method: str, headers: Iterable[tuple[bytes, bytes]]) -> Span:
        """A started SERVER span that continues the caller's ``traceparent``, if any."""
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in _TRACE_HEADERS
        }
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        return self._tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method},
        )

    @staticmethod
    def end_request(
        span: Span, method: str, route: str, status: int, attributes: Mapping[str, Any]
    ) -> None:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(status))
        span.end()

    # -- an attempt at a deployment -----------------------------------------------------------

    def start_attempt(
        self, operation: str, provider: str, model: str, deployment: str, max_tokens: int | None
    ) -> Span:
        """A started CLIENT span for one upstream attempt; the caller ends it (see
        :func:`answered`, :func:`failed`) and makes it current while the request goes out
        (:meth:`current`)."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "headrace.deployment": deployment,
        }
        if max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = max_tokens
        return self._tracer.start_span(
            f"{operation} {model}", kind=SpanKind.CLIENT, attributes=attributes
        )

    def start_job(
        self,
        job_id: str,
        operation: str,
        attempt: int,
        priority: str,
        submitted_in: str | None = None,
    ) -> Span:
        """A started CONSUMER span for one run of a queued job; its attempts nest under it.
        ``submitted_in``: the ``traceparent`` the job was submitted in, which the span links
        to (ignored when it does not parse)."""
        return self._tracer.start_span(
            f"job {operation}",
            context=otel_context.Context(),  # a root, whatever is current in the runner
            kind=SpanKind.CONSUMER,
            links=_submitted(submitted_in),
            attributes={
                "headrace.job_id": job_id,
                "headrace.job.attempt": attempt,
                "headrace.job.priority": priority,
                "gen_ai.operation.name": operation,
            },
        )

    def start_delivery(
        self,
        event_type: str,
        *,
        event_id: str,
        job_id: str,
        attempt: int,
        url: str,
        submitted_in: str | None = None,
    ) -> Span:
        """A started CLIENT span for one delivery attempt of a webhook event, the root of its
        own trace, linked to the request that submitted the job (``submitted_in``, its
        ``traceparent``). Current while the POST goes out (:meth:`running`), it goes with the
        POST as ``traceparent``; :func:`delivered` says how the attempt ended. The URL's
        host and port are recorded, never its path or query, which may hold a token."""
        target = urlsplit(url)
        attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "server.address": target.hostname or "",
            "headrace.webhook.event_id": event_id,
            "headrace.webhook.event_type": event_type,
            "headrace.webhook.attempt": attempt,
            "headrace.job_id": job_id,
        }
        with suppress(ValueError):  # a malformed port: the attempt itself will say so
            attributes["server.port"] = target.port or (443 if target.scheme == "https" else 80)
        return self._tracer.start_span(
            f"webhook {event_type}",
            context=otel_context.Context(),  # a root, whatever is current in the dispatcher
            kind=SpanKind.CLIENT,
            links=_submitted(submitted_in),
            attributes=attributes,
        )

    @staticmethod
    @contextmanager
    def running(span: Span) -> Iterator[None]:
        """``span`` current inside the block, marked failed by an exception that leaves it,
        and ended after it."""
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield
        except BaseException as exc:
            failed(span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()

    @staticmethod
    @contextmanager
    def current(span: Span) -> Iterator[None]:
        """``span`` is the current span inside the block (in this task only)."""
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield
        finally:
            otel_context.detach(token)

    async def aclose(self) -> None:
        """Export what is still buffered, then stop (the exporter's I/O runs in a thread)."""
        await asyncio.to_thread(self._provider.shutdown)


def answered(
    span: Span,
    *,
    input_tokens: int | None,
    output_tokens: int | None,
    response_model: str | None = None,
    finish_reasons: Iterable[str] = (),
) -> None:
    """What an attempt that answered used."""
    if input_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    if output_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    if response_model:
        span.set_attribute("gen_ai.response.model", response_model)
    reasons = [r for r in finish_reasons if r]
    if reasons:
        span.set_attribute("gen_ai.response.finish_reasons", reasons)


def delivered(span: Span, status_code: int | None, outcome: str, error: str | None) -> None:
    """How a webhook delivery attempt ended (``outcome``: delivered, retry, failed or gone);
    one that did not deliver marks the span failed."""
    if status_code is not None:
        span.set_attribute("http.response.status_code", status_code)
    span.set_attribute("headrace.webhook.outcome", outcome)
    if outcome != "delivered":
        span.set_status(Status(StatusCode.ERROR, (error or outcome)[:500]))
        span.set_attribute("error.type", str(status_code) if status_code else outcome)


def _submitted(traceparent: str | None) -> list[Link] | None:
    """A link to the span a job was submitted in (its ``traceparent``), if that parses."""
    if not traceparent:
        return None
    parent = _PROPAGATOR.extract({"traceparent": traceparent})
    submitted = trace.get_current_span(parent).get_span_context()
    if not submitted.is_valid:
        return None
    return [Link(submitted, {"headrace.link": "submitted"})]


def failed(span: Span, exc: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, str(exc)[:500]))
    span.set_attribute("error.type", type(exc).__name__)


def current_traceparent() -> str | None:
    """The current span's W3C ``traceparent`` (None when no span is current: tracing off, or
    outside a request), for a job to remember where it was submitted."""
    return trace_headers({}).get("traceparent")


def trace_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus ``traceparent`` (and ``tracestate``) when a span is current (sampled
    or not: the upstream learns the decision); the same dict, untouched, otherwise (tracing
    off costs a context lookup)."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return headers
    carrier = dict(headers)
    _PROPAGATOR.inject(carrier)
    return carrier
