"""GatewayService: the one pipeline every request goes through, synchronous or queued.

Today: model access → catalog → provider call (with timing) → metrics. Later issues insert
admission, limits, budgets, cache and the router between these steps; the entry points and
the :class:`Call` record stay the same.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from headrace.domain import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelRoute,
    Principal,
    Usage,
)
from headrace.errors import HeadraceError, PermissionDeniedError
from headrace.observability.metrics import Metrics
from headrace.providers.base import Provider
from headrace.routing.catalog import Catalog


@dataclass(slots=True)
class Call:
    """What one request did, filled in as it goes; the API reads it for headers and logs.

    ``upstream_ns`` is the time spent waiting on the upstream, so that the gateway's own
    overhead is wall time minus this.
    """

    request_id: str
    principal: Principal | None = None
    model: str | None = None
    deployment: str | None = None
    attempts: int = 0
    upstream_ns: int = 0
    first_chunk_ns: int | None = None
    usage: Usage | None = None
    started_ns: int = field(default_factory=time.perf_counter_ns)


class GatewayService:
    def __init__(
        self, catalog: Catalog, providers: Mapping[str, Provider], metrics: Metrics
    ) -> None:
        self._catalog = catalog
        self._providers = providers
        self._metrics = metrics

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def _select(self, call: Call, model: str, capability: str) -> Provider:
        route: ModelRoute = self._catalog.route(model, capability)
        if call.principal is not None and not call.principal.may_use(model):
            raise PermissionDeniedError(
                f"This API key may not use the model {model!r}.", param="model"
            )
        call.model = route.name
        # The router (balancing, breakers, fallbacks) replaces this choice in its own issue.
        deployment = route.deployments[0]
        call.deployment = deployment.name
        call.attempts += 1
        return self._providers[deployment.name]

    def _record(self, call: Call, operation: str, usage: Usage, error: str = "") -> None:
        model = call.model or ""
        self._metrics.operation_duration.labels(operation, model, error).observe(
            call.upstream_ns / 1e9
        )
        if usage.prompt_tokens:
            self._metrics.tokens.labels(operation, model, "input").observe(usage.prompt_tokens)
        if usage.completion_tokens:
            self._metrics.tokens.labels(operation, model, "output").observe(usage.completion_tokens)

    async def chat(self, call: Call, request: ChatRequest) -> ChatResponse:
        provider = self._select(call, request.model, "chat")
        started = time.perf_counter_ns()
        try:
            response = await provider.chat(request)
        except HeadraceError as exc:
            call.upstream_ns += time.perf_counter_ns() - started
            self._record(call, "chat", Usage(), type(exc).__name__)
            raise
        call.upstream_ns += time.perf_counter_ns() - started
        call.usage = response.usage
        self._record(call, "chat", response.usage)
        return response

    async def stream_chat(self, call: Call, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Chunks as the upstream sends them; the usage chunk only if the client asked.

        Cancelling the consumer closes the upstream stream (the ``finally`` below).
        """
        provider = self._select(call, request.model, "chat")
        chunks = provider.stream_chat(request)
        error = ""
        try:
            while True:
                started = time.perf_counter_ns()
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                finally:
                    call.upstream_ns += time.perf_counter_ns() - started
                if call.first_chunk_ns is None:
                    call.first_chunk_ns = time.perf_counter_ns()
                    self._metrics.ttft.labels(call.model or "").observe(
                        (call.first_chunk_ns - call.started_ns) / 1e9
                    )
                if chunk.usage is not None:
                    call.usage = chunk.usage
                    if not request.include_usage:
                        if not chunk.body.get("choices"):
                            continue
                        chunk = ChatChunk({k: v for k, v in chunk.body.items() if k != "usage"})
                yield chunk
        except HeadraceError as exc:
            error = type(exc).__name__
            raise
        finally:
            await chunks.aclose()
            self._record(call, "chat", call.usage or Usage(), error)

    async def embed(self, call: Call, request: EmbeddingRequest) -> EmbeddingResponse:
        provider = self._select(call, request.model, "embeddings")
        started = time.perf_counter_ns()
        try:
            response = await provider.embed(request)
        except HeadraceError as exc:
            call.upstream_ns += time.perf_counter_ns() - started
            self._record(call, "embeddings", Usage(), type(exc).__name__)
            raise
        call.upstream_ns += time.perf_counter_ns() - started
        call.usage = response.usage
        self._record(call, "embeddings", response.usage)
        return response
