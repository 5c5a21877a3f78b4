"""GatewayService: the one pipeline every request goes through, synchronous or queued.

model selection rules → model access → quota (RPM, TPM, parallel, budget: reserved for key and
team in one round trip, 429/402 before any upstream call) → response cache (hits and coalesced
followers stop here) → admission (bounded concurrency, priority shedding) → router (deployment
choice, retries, breakers, fallbacks, degraded answer) → cost → settle the quota to the real
usage → one usage record (batched to the store off the request path) and metrics.

Every request that reaches the service is accounted exactly once, whatever its outcome:
answered, refused, failed, or cancelled by a client that went away (see :meth:`_finish`);
the API accounts those that fail before they reach it through :meth:`record_refusal`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Protocol, TypeVar

from headrace.accounting.tokens import TokenCounter
from headrace.domain import (
    Call,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    Price,
    Usage,
    UsageRecord,
)
from headrace.errors import ClientClosedError, HeadraceError, PermissionDeniedError
from headrace.gateway.admission import Admission
from headrace.gateway.caching import HIT, ResponseCacher
from headrace.gateway.quota import Estimate, QuotaGuard, Reservation
from headrace.gateway.selection import ModelSelector
from headrace.ids import unique_id
from headrace.observability.metrics import Children, Metrics
from headrace.routing.catalog import Catalog
from headrace.routing.router import Router

_Answer = TypeVar("_Answer", ChatResponse, EmbeddingResponse)

CANCELLED_STATUS = ClientClosedError.status  # the client left before the answer was complete
_UNPRICED = Price()  # a model or deployment without a price (a default made once, not per get)


class UsageRecorder(Protocol):
    def record(self, record: UsageRecord) -> None:
        """Take one record; must not block (the writer batches it to the store)."""
        ...


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
        quota: QuotaGuard | None = None,
        selector: ModelSelector | None = None,
        tokens: TokenCounter | None = None,
        usage: UsageRecorder | None = None,
        default_completion_tokens: int = 1024,
    ) -> None:
        self._prices = prices or {}
        self._catalog = catalog
        self._router = router
        self._admission = admission
        self._metrics = metrics
        # labels() per figure per request costs about 2 µs each; these make each child once.
        self._durations = Children(metrics.operation_duration)
        self._token_counts = Children(metrics.tokens)
        self._costs = Children(metrics.cost)
        self._ttft = Children(metrics.ttft)
        self._cacher = cacher
        self._quota = quota
        self._selector = selector if selector else None
        self._tokens = tokens
        self._usage = usage
        self._default_completion_tokens = default_completion_tokens
        # Per model: the dearest deployment's price (reservations must not under-estimate) and
        # the first deployment's (the baseline that selection-rule savings are measured by).
        self._dearest: dict[str, Price] = {}
        self._primary: dict[str, Price] = {}
        for route in catalog.routes:
            deployment_prices = [self._prices.get(d.name, Price()) for d in route.deployments]
            if deployment_prices:
                self._primary[route.name] = deployment_prices[0]
                self._dearest[route.name] = max(
                    deployment_prices, key=lambda p: (p.input_per_mtok, p.output_per_mtok)
                )

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def router(self) -> Router:
        return self._router

    @property
    def cacher(self) -> ResponseCacher | None:
        return self._cacher

    @property
    def quota(self) -> QuotaGuard | None:
        return self._quota

    # -- admission: selection, model access, quota ------------------------------------------

    def _admit(self, call: Call, model: str, capability: str) -> None:
        """The model must exist; the key must be allowed the model it asked for (a model a
        selection rule chose instead is the operator's choice, not checked again)."""
        self._catalog.route(model, capability)
        requested = call.requested_model or model
        if call.principal is not None and not call.principal.may_use(requested):
            raise PermissionDeniedError(
                f"This API key may not use the model {requested!r}.", param="model"
            )
        call.model = model

    def _select(self, call: Call, request: ChatRequest) -> ChatRequest:
        call.requested_model = request.model
        if self._selector is None:
            return request
        model, _rule = self._selector.select(
            request, call.principal, call.controls.hints, lambda: self._prompt_tokens(request)
        )
        if model == request.model:
            return request
        # The requested name may be virtual (e.g. "auto"): only the chosen model must exist.
        return replace(request, model=model)

    def _enter(self, call: Call, operation: str, request: ChatRequest) -> ChatRequest:
        """Selection rules and model access; a refusal here is accounted like any other."""
        try:
            request = self._select(call, request)
            self._admit(call, request.model, operation)
        except HeadraceError as exc:
            self._write_usage(call, operation, exc.status, type(exc).__name__)
            raise
        return request

    def _prompt_tokens(self, request: ChatRequest) -> int:
        return self._tokens.messages(request.messages) if self._tokens is not None else 0

    def _estimate(self, call: Call, model: str, prompt: Callable[[], int], output: int) -> Estimate:
        if not QuotaGuard.needs_estimate(call.principal):
            return Estimate(0, 0)
        usage = Usage(prompt_tokens=prompt(), completion_tokens=output)
        cost = self._dearest.get(model, _UNPRICED).cost_micro_usd(usage)
        return Estimate(usage.total_tokens, cost)

    async def _reserve(
        self, call: Call, operation: str, estimate: Callable[[], Estimate]
    ) -> Reservation | None:
        if self._quota is None or not QuotaGuard.applies(call.principal):
            return None
        try:
            return await self._quota.reserve(call, estimate())
        except HeadraceError as exc:
            self._write_usage(call, operation, exc.status, type(exc).__name__)
            raise

    # -- accounting ---------------------------------------------------------------------------

    def _charge(self, call: Call, usage: Usage) -> None:
        """Price the answer by the deployment that gave it; a degraded answer is free."""
        if call.degraded or call.deployment is None:
            call.cost_micro_usd = 0
            return
        cost = self._prices.get(call.deployment, _UNPRICED).cost_micro_usd(usage)
        call.cost_micro_usd = cost
        if cost:
            key = call.principal.key_id if call.principal else ""
            self._costs(key, call.model or "").inc(cost / 1_000_000)

    def _record(self, call: Call, operation: str, usage: Usage, error: str = "") -> None:
        self._charge(call, usage)  # a failed stream still pays for the output it delivered
        model = call.model or ""
        self._durations(operation, model, error).observe(call.upstream_ns / 1e9)
        if usage.prompt_tokens:
            self._token_counts(operation, model, "input").observe(usage.prompt_tokens)
        if usage.completion_tokens:
            self._token_counts(operation, model, "output").observe(usage.completion_tokens)

    def _finish(
        self,
        call: Call,
        operation: str,
        reservation: Reservation | None,
        error: BaseException | None,
        *,
        stream: bool = False,
    ) -> None:
        """Settle the quota and write the usage record: once per request, whatever happened.

        The answer does not wait for the limiter: the settlement is handed to it before the
        answer goes out (a local limiter has applied it, a remote one holds it for this
        process's next acquire, which carries it), so a client whose next request comes to
        this process finds its parallel slot free and its refund made. Redis gets it at the
        next event-loop turn, after the answer (a request to another process arriving sooner
        can still see the slot taken); the quota guard waits for the answers when it closes.
        """
        if error is None:
            status, name = 200, None
        elif isinstance(error, HeadraceError):
            status, name = error.status, type(error).__name__
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):
            status, name = CANCELLED_STATUS, "Cancelled"
        else:
            status, name = 500, type(error).__name__
        usage = call.usage or Usage()
        self._write_usage(call, operation, status, name, stream=stream)
        if reservation is not None and self._quota is not None:
            self._quota.settle_later(reservation, usage.total_tokens, call.cost_micro_usd or 0)

    def record_refusal(self, call: Call, operation: str, error: Exception) -> None:
        """Account a request that failed before it reached the service (the API could not read
        or parse it), unless it already has its record: one per request, whatever happened."""
        if not call.recorded:
            status = error.status if isinstance(error, HeadraceError) else 500
            self._write_usage(call, operation, status, type(error).__name__)

    def record_replay(self, call: Call, operation: str) -> None:
        """Account a request answered with the stored answer of an earlier one (a repeated
        ``Idempotency-Key``): its own record, at no cost and marked as a cache hit, since it
        made no upstream call."""
        call.cache = HIT
        self._write_usage(call, operation, 200, None)

    def _write_usage(
        self, call: Call, operation: str, status: int, error: str | None, *, stream: bool = False
    ) -> None:
        call.recorded = True
        if self._usage is None:
            return
        usage = call.usage or Usage()
        cost = call.cost_micro_usd or 0
        model = call.model or ""
        requested = call.requested_model or model
        baseline = cost
        if requested != model and not call.degraded and call.cache != HIT:
            baseline = self._primary.get(requested, _UNPRICED).cost_micro_usd(usage)
        call.baseline_cost_micro_usd = baseline
        principal = call.principal
        self._usage.record(
            UsageRecord(
                id=unique_id(),
                request_id=call.request_id,
                created_at=time.time(),
                operation=operation,
                key_id=principal.key_id if principal is not None else "",
                team_id=principal.team_id if principal is not None else None,
                model=model,
                requested_model=requested,
                deployment=call.deployment,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                cost_micro_usd=cost,
                baseline_cost_micro_usd=baseline,
                latency_ms=(time.perf_counter_ns() - call.started_ns) / 1e6,
                status=status,
                error=error,
                cache_hit=call.cache == HIT,
                degraded=call.degraded,
                stream=stream,
            )
        )

    # -- chat -------------------------------------------------------------------------------

    async def chat(self, call: Call, request: ChatRequest) -> ChatResponse:
        request = self._enter(call, "chat", request)
        reservation = await self._reserve(call, "chat", lambda: self._chat_estimate(call, request))
        try:
            if self._cacher is None:
                response = await self._upstream_chat(call, request)
            else:
                response = await self._cacher.chat(
                    call, request, lambda: self._upstream_chat(call, request)
                )
        except BaseException as exc:
            self._finish(call, "chat", reservation, exc)
            raise
        self._finish(call, "chat", reservation, None)
        return response

    def _chat_estimate(self, call: Call, request: ChatRequest) -> Estimate:
        output = request.max_tokens
        if output is None:
            output = self._default_completion_tokens
        return self._estimate(call, request.model, lambda: self._prompt_tokens(request), output)

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

        Cancelling the consumer closes the upstream stream (the ``finally`` blocks). A stream
        that ends without the upstream's usage (cut, or the client left) is charged for the
        prompt estimate and the text that was streamed, counted by the tokenizer.
        """
        request = self._enter(call, "chat", request)
        reservation = await self._reserve(call, "chat", lambda: self._chat_estimate(call, request))
        if self._cacher is None:
            chunks = self._upstream_stream(call, request)
        else:
            chunks = self._cacher.stream(
                call, request, lambda: self._upstream_stream(call, request)
            )
        error: BaseException | None = None
        try:
            async for received in chunks:
                chunk = received
                if call.first_chunk_ns is None:
                    call.first_chunk_ns = time.perf_counter_ns()
                    self._ttft(call.model or "").observe(
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
        except BaseException as exc:
            error = exc
            raise
        finally:
            await chunks.aclose()
            self._finish(call, "chat", reservation, error, stream=True)

    async def _upstream_stream(
        self, call: Call, request: ChatRequest
    ) -> AsyncGenerator[ChatChunk, None]:
        error = ""
        usage: Usage | None = None
        text: list[str] = []
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
                    else:
                        _collect_text(chunk, text)
                    yield chunk
            except HeadraceError as exc:
                error = type(exc).__name__
                raise
            finally:
                await chunks.aclose()
                if usage is None and text:
                    # No usage from upstream (a cut stream, or the client left): charge what
                    # was evidently used rather than nothing.
                    usage = Usage(
                        prompt_tokens=self._prompt_tokens(request),
                        completion_tokens=self._tokens.text("".join(text)) if self._tokens else 0,
                    )
                    call.usage = usage
                self._record(call, "chat", usage or Usage(), error)

    # -- embeddings -------------------------------------------------------------------------

    async def embed(self, call: Call, request: EmbeddingRequest) -> EmbeddingResponse:
        call.requested_model = request.model
        try:
            self._admit(call, request.model, "embeddings")
        except HeadraceError as exc:
            self._write_usage(call, "embeddings", exc.status, type(exc).__name__)
            raise

        def estimate() -> Estimate:
            return self._estimate(
                call, request.model, lambda: sum(map(self._tokens_of, request.inputs)), 0
            )

        reservation = await self._reserve(call, "embeddings", estimate)
        try:
            response = await self._upstream(
                call, "embeddings", lambda: self._router.embed(call, request)
            )
        except BaseException as exc:
            self._finish(call, "embeddings", reservation, exc)
            raise
        self._finish(call, "embeddings", reservation, None)
        return response

    def _tokens_of(self, text: str) -> int:
        return self._tokens.text(text) if self._tokens is not None else 0


def _collect_text(chunk: ChatChunk, into: list[str]) -> None:
    for choice in chunk.body.get("choices") or ():
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if isinstance(content, str):
            into.append(content)
