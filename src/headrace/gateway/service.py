"""GatewayService: the one pipeline every request goes through, synchronous or queued.

model access → response cache (hits and coalesced followers stop here) → admission (bounded
concurrency, priority shedding) → router (deployment choice, retries, breakers, fallbacks,
degraded answer) → metrics. Later issues insert limits and budgets before the cache; the entry
points and :class:`~headrace.domain.Call` stay the same.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import TypeVar

from headrace.domain import (
    Call,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    Price,
    Usage,
)
from headrace.errors import HeadraceError, PermissionDeniedError
from headrace.gateway.admission import Admission
from headrace.gateway.caching import HIT, ResponseCacher
from headrace.observability.metrics import Metrics
from headrace.routing.catalog import Catalog
from headrace.routing.router import Router

_Answer = TypeVar("_Answer", ChatResponse, EmbeddingResponse)


class GatewayService:
    def __init__(
        self,
        catalog: Catalog,
        router: Router,
        admission: Admission,
        metrics: Metrics,
        cacher: ResponseCacher | None = None,
        *,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        self._prices = prices or {}
        self._catalog = catalog
        self._router = router
        self._admission = admission
        self._metrics = metrics
        self._cacher = cacher

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def router(self) -> Router:
        return self._router

    @property
    def cacher(self) -> ResponseCacher | None:
        return self._cacher

    def _admit(self, call: Call, model: str, capability: str) -> None:
        self._catalog.route(model, capability)
        if call.principal is not None and not call.principal.may_use(model):
            raise PermissionDeniedError(
                f"This API key may not use the model {model!r}.", param="model"
            )
        call.model = model

    def _charge(self, call: Call, usage: Usage) -> None:
        """Price the answer by the deployment that gave it; a degraded answer is free."""
        if call.degraded or call.deployment is None:
            call.cost_micro_usd = 0
            return
        cost = self._prices.get(call.deployment, Price()).cost_micro_usd(usage)
        call.cost_micro_usd = cost
        if cost:
            key = call.principal.key_id if call.principal else ""
            self._metrics.cost.labels(key, call.model or "").inc(cost / 1_000_000)

    def _record(self, call: Call, operation: str, usage: Usage, error: str = "") -> None:
        if not error:
            self._charge(call, usage)
        model = call.model or ""
        self._metrics.operation_duration.labels(operation, model, error).observe(
            call.upstream_ns / 1e9
        )
        if usage.prompt_tokens:
            self._metrics.tokens.labels(operation, model, "input").observe(usage.prompt_tokens)
        if usage.completion_tokens:
            self._metrics.tokens.labels(operation, model, "output").observe(usage.completion_tokens)

    # -- chat -------------------------------------------------------------------------------

    async def chat(self, call: Call, request: ChatRequest) -> ChatResponse:
        self._admit(call, request.model, "chat")
        if self._cacher is None:
            return await self._upstream_chat(call, request)
        return await self._cacher.chat(call, request, lambda: self._upstream_chat(call, request))

    async def _upstream_chat(self, call: Call, request: ChatRequest) -> ChatResponse:
        return await self._upstream(call, "chat", lambda: self._router.chat(call, request))

    async def _upstream(
        self, call: Call, operation: str, work: Callable[[], Awaitable[_Answer]]
    ) -> _Answer:
        """Admit, time and account one non-streamed upstream answer (``work`` starts it)."""
        async with self._admission.slot(call.controls.priority):
            started = time.perf_counter_ns()
            try:
                response = await work()
            except HeadraceError as exc:
                call.upstream_ns += time.perf_counter_ns() - started
                self._record(call, operation, Usage(), type(exc).__name__)
                raise
            call.upstream_ns += time.perf_counter_ns() - started
        call.usage = response.usage
        self._record(call, operation, response.usage)
        return response

    async def stream_chat(
        self, call: Call, request: ChatRequest
    ) -> AsyncGenerator[ChatChunk, None]:
        """Chunks as the upstream sends them; the usage chunk only if the client asked.

        Cancelling the consumer closes the upstream stream (the ``finally`` blocks).
        """
        self._admit(call, request.model, "chat")
        if self._cacher is None:
            chunks = self._upstream_stream(call, request)
        else:
            chunks = self._cacher.stream(
                call, request, lambda: self._upstream_stream(call, request)
            )
        try:
            async for received in chunks:
                chunk = received
                if call.first_chunk_ns is None:
                    call.first_chunk_ns = time.perf_counter_ns()
                    self._metrics.ttft.labels(call.model or "").observe(
                        (call.first_chunk_ns - call.started_ns) / 1e9
                    )
                if chunk.usage is not None:
                    if call.cache != HIT:
                        call.usage = chunk.usage
                    if not request.include_usage:
                        if not chunk.body.get("choices"):
                            continue
                        chunk = ChatChunk({k: v for k, v in chunk.body.items() if k != "usage"})
                yield chunk
        finally:
            await chunks.aclose()

    async def _upstream_stream(
        self, call: Call, request: ChatRequest
    ) -> AsyncGenerator[ChatChunk, None]:
        error = ""
        usage = Usage()
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
                    if chunk.usage is not None:
                        usage = chunk.usage
                    yield chunk
            except HeadraceError as exc:
                error = type(exc).__name__
                raise
            finally:
                await chunks.aclose()
                self._record(call, "chat", usage, error)

    # -- embeddings -------------------------------------------------------------------------

    async def embed(self, call: Call, request: EmbeddingRequest) -> EmbeddingResponse:
        self._admit(call, request.model, "embeddings")
        return await self._upstream(call, "embeddings", lambda: self._router.embed(call, request))
