"""GatewayService: the one pipeline every request goes through, synchronous or queued.

admission (bounded concurrency, priority shedding) → model access → router (deployment
choice, retries, breakers, fallbacks, degraded answer) → metrics. Later issues insert limits,
budgets and the cache between these steps; the entry points and :class:`Call` stay the same.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from headrace.domain import (
    Call,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
)
from headrace.errors import HeadraceError, PermissionDeniedError
from headrace.gateway.admission import Admission
from headrace.observability.metrics import Metrics
from headrace.routing.catalog import Catalog
from headrace.routing.router import Router


class GatewayService:
    def __init__(
        self, catalog: Catalog, router: Router, admission: Admission, metrics: Metrics
    ) -> None:
        self._catalog = catalog
        self._router = router
        self._admission = admission
        self._metrics = metrics

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def router(self) -> Router:
        return self._router

    def _admit(self, call: Call, model: str, capability: str) -> None:
        self._catalog.route(model, capability)
        if call.principal is not None and not call.principal.may_use(model):
            raise PermissionDeniedError(
                f"This API key may not use the model {model!r}.", param="model"
            )
        call.model = model

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
        self._admit(call, request.model, "chat")
        async with self._admission.slot(call.controls.priority):
            started = time.perf_counter_ns()
            try:
                response = await self._router.chat(call, request)
            except HeadraceError as exc:
                call.upstream_ns += time.perf_counter_ns() - started
                self._record(call, "chat", Usage(), type(exc).__name__)
                raise
            call.upstream_ns += time.perf_counter_ns() - started
        call.usage = response.usage
        self._record(call, "chat", response.usage)
        return response

    async def stream_chat(
        self, call: Call, request: ChatRequest
    ) -> AsyncGenerator[ChatChunk, None]:
        """Chunks as the upstream sends them; the usage chunk only if the client asked.

        Cancelling the consumer closes the upstream stream (the ``finally`` below).
        """
        self._admit(call, request.model, "chat")
        error = ""
        async with self._admission.slot(call.controls.priority):
            chunks = self._router.stream_chat(call, request)
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
        self._admit(call, request.model, "embeddings")
        async with self._admission.slot(call.controls.priority):
            started = time.perf_counter_ns()
            try:
                response = await self._router.embed(call, request)
            except HeadraceError as exc:
                call.upstream_ns += time.perf_counter_ns() - started
                self._record(call, "embeddings", Usage(), type(exc).__name__)
                raise
            call.upstream_ns += time.perf_counter_ns() - started
        call.usage = response.usage
        self._record(call, "embeddings", response.usage)
        return response
