"""The Router: which deployment serves a request, and what happens when it fails.

For one request the router walks a *plan*: the requested model's deployments in the order its
strategy gives (skipping open breakers, deployments cooling down after a 429 or out of upstream
rate limit, and deployments at their ``max_concurrency``), retrying transient failures with
backoff on the next deployment while the retry policy and the process-wide retry budget allow;
then, by class of error, the model's fallbacks or context-window fallbacks, each with its own
deployments and policy; then the model's degraded answer, if it has one. Error classes and
their handling: :mod:`headrace.routing.classify`.

Streams are retried freely before their first chunk, which is also before any byte reached
the client (the API waits for the first chunk before it answers). A stream cut after that is
resumed on a retry only when the retry reproduces the text already sent
(:mod:`headrace.routing.resume`); otherwise the client gets the error.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from opentelemetry.trace import Span

from headrace.domain import (
    Call,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Deployment,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelRoute,
    RequestControls,
    Usage,
)
from headrace.errors import (
    HeadraceError,
    OverloadedError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from headrace.observability.metrics import Metrics
from headrace.observability.tracing import Tracing, answered, failed
from headrace.providers.base import Provider
from headrace.routing.breaker import BreakerConfig, BreakerState, CircuitBreaker
from headrace.routing.catalog import Catalog
from headrace.routing.classify import ErrorClass, classify, counts_against_breaker
from headrace.routing.resume import SpliceMismatchError, Splicer, Transcript
from headrace.routing.retry import RetryBudget, RetryPolicy
from headrace.routing.strategies import Candidate, Ewma, Strategy, make_strategy

log = structlog.get_logger("headrace.router")

T = TypeVar("T")
_Answer = TypeVar("_Answer", ChatResponse, EmbeddingResponse)
Sleep = Callable[[float], Awaitable[None]]

_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """How one model is routed; built by wiring from its config."""

    strategy: str = "weighted_random"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    fallbacks: tuple[str, ...] = ()
    context_fallbacks: tuple[str, ...] = ()
    fallback_on: frozenset[ErrorClass] = frozenset(
        {ErrorClass.TRANSIENT, ErrorClass.CONTEXT_LENGTH}
    )
    degraded_answer: str | None = None


class Slot:
    """One deployment's live state in this process: provider, breaker, load, latency."""

    def __init__(
        self,
        deployment: Deployment,
        provider: Provider,
        breaker: CircuitBreaker,
        order: int,
    ) -> None:
        self.deployment = deployment
        self.provider = provider
        self.breaker = breaker
        self.order = order
        self.in_flight = 0
        self.latency = Ewma()

    @property
    def name(self) -> str:
        return self.deployment.name

    def available(self) -> bool:
        limit = self.deployment.max_concurrency
        if limit is not None and self.in_flight >= limit:
            return False
        return self.breaker.available()

    def candidate(self) -> Candidate:
        price = self.deployment.price
        return Candidate(
            name=self.name,
            weight=self.deployment.weight,
            in_flight=self.in_flight,
            max_concurrency=self.deployment.max_concurrency,
            ewma_latency_s=self.latency.value,
            cost_per_mtok_micro_usd=price.input_per_mtok + price.output_per_mtok,
            order=self.order,
        )


class Router:
    def __init__(
        self,
        catalog: Catalog,
        providers: Mapping[str, Provider],
        policies: Mapping[str, RoutePolicy],
        *,
        budget: RetryBudget,
        metrics: Metrics,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        tracing: Tracing | None = None,
    ) -> None:
        self._catalog = catalog
        self._tracing = tracing
        self._policies = policies
        self._budget = budget
        self._metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - load balancing, not cryptography
        self._clock = clock
        self._sleep = sleep
        self._strategies: dict[str, Strategy] = {}
        self._slots: dict[str, list[Slot]] = {}
        for route in catalog.routes:
            policy = policies.get(route.name, RoutePolicy())
            self._strategies[route.name] = make_strategy(policy.strategy)
            self._slots[route.name] = [
                Slot(
                    d,
                    providers[d.name],
                    CircuitBreaker(d.name, policy.breaker, clock=clock, on_change=self._changed),
                    i,
                )
                for i, d in enumerate(route.deployments)
            ]
            for slot in self._slots[route.name]:
                metrics.breaker_state.labels(slot.name).set(0)

    def _changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        log.warning("breaker_state", deployment=name, old=old.value, new=new.value)
        self._metrics.breaker_state.labels(name).set(_BREAKER_GAUGE[new])

    def slots(self, model: str) -> Sequence[Slot]:
        return self._slots[model]

    def policy(self, model: str) -> RoutePolicy:
        return self._policies.get(model, RoutePolicy())

    # -- the three operations ---------------------------------------------------------------

    async def chat(self, call: Call, request: ChatRequest) -> ChatResponse:
        plan = _Plan(self, call, request.model, "chat")
        while (slot := plan.next()) is not None:
            try:
                response = await self._attempt(
                    slot, "chat", request.max_tokens, slot.provider.chat(request)
                )
            except HeadraceError as exc:
                await plan.failed(slot, exc)
                continue
            plan.succeeded(slot, response.exhausted_for_s)
            return response
        answer = plan.degraded_answer()
        return _degraded_response(request.model, answer)

    async def embed(self, call: Call, request: EmbeddingRequest) -> EmbeddingResponse:
        plan = _Plan(self, call, request.model, "embeddings")
        while (slot := plan.next()) is not None:
            try:
                response = await self._attempt(
                    slot, "embeddings", None, slot.provider.embed(request)
                )
            except HeadraceError as exc:
                await plan.failed(slot, exc)
                continue
            plan.succeeded(slot, response.exhausted_for_s)
            return response
        plan.raise_last()
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream_chat(  # noqa: PLR0912, PLR0915 - one loop; each branch a documented outcome
        self, call: Call, request: ChatRequest
    ) -> AsyncGenerator[ChatChunk, None]:
        plan = _Plan(self, call, request.model, "chat")
        sent = Transcript()  # what reached the client, for resuming a cut stream
        while (slot := plan.next()) is not None:
            chunks = slot.provider.stream_chat(request)
            slot.in_flight += 1
            started = self._clock()
            span = self._start_attempt(slot, "chat", request.max_tokens)
            try:
                first = await self._first_chunk(slot, chunks, span)
            except HeadraceError as exc:
                slot.in_flight -= 1
                await chunks.aclose()
                _end_attempt(span, exc)
                await plan.failed(slot, exc)
                continue
            if first.exhausted_for_s:
                slot.breaker.cool_down(first.exhausted_for_s)
            splicer = Splicer(sent) if sent.started else None
            usage: Usage | None = None
            error: BaseException | None = None
            try:
                chunk: ChatChunk | None = first
                while chunk is not None:
                    usage = chunk.usage or usage
                    out = chunk if splicer is None else splicer.feed(chunk)
                    if out is not None:
                        sent.record(out)
                        yield out
                    chunk = await anext(chunks, None)
            except HeadraceError as exc:
                error = exc
                # Output already reached the client: only a resumable stream may go on.
                if not sent.resumable:
                    slot.breaker.record_failure()
                    raise
                await plan.failed(slot, exc)
                self._metrics.stream_resumes.labels(slot.name).inc()
                continue
            except SpliceMismatchError as exc:
                error = exc
                slot.breaker.release()
                plan.raise_last()
            except BaseException as exc:
                error = exc
                slot.breaker.release()
                raise
            else:
                slot.latency.update(self._clock() - started)
                plan.succeeded(slot)
            finally:
                slot.in_flight -= 1
                await chunks.aclose()
                _end_attempt(span, error, usage)
            return
        if sent.started:
            plan.raise_last()  # never append a degraded answer to a partial one
        answer = plan.degraded_answer()
        for chunk in _degraded_chunks(request, answer):
            yield chunk

    # -- helpers -----------------------------------------------------------------------------

    async def _attempt(
        self, slot: Slot, operation: str, max_tokens: int | None, work: Awaitable[_Answer]
    ) -> _Answer:
        """One non-streamed attempt at ``slot``: timed, and traced when tracing is on."""
        span = self._start_attempt(slot, operation, max_tokens)
        if span is None:
            return await self._timed(slot, work)
        with Tracing.running(span):
            response = await self._timed(slot, work)
            usage = response.usage
            answered(
                span,
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens,
                response_model=response_model(response),
            )
        return response

    def _start_attempt(self, slot: Slot, operation: str, max_tokens: int | None) -> Span | None:
        if self._tracing is None:
            return None
        d = slot.deployment
        return self._tracing.start_attempt(operation, d.kind, d.model, d.name, max_tokens)

    async def _timed(self, slot: Slot, work: Awaitable[T]) -> T:
        slot.in_flight += 1
        started = self._clock()
        try:
            result = await work
        except BaseException:
            slot.in_flight -= 1
            raise
        slot.in_flight -= 1
        slot.latency.update(self._clock() - started)
        return result

    @staticmethod
    async def _first_chunk(
        slot: Slot, chunks: AsyncGenerator[ChatChunk, None], span: Span | None
    ) -> ChatChunk:
        """The stream-start guard: the first chunk within ``first_token_s``, or a timeout.

        The request goes out on this first read, so the attempt's span (tracing on) is current
        here: an HTTP provider sends it upstream as ``traceparent``.
        """
        limit = slot.deployment.timeouts.first_token_s
        try:
            async with asyncio.timeout(limit):
                if span is None:
                    return await anext(chunks)
                with Tracing.current(span):
                    return await anext(chunks)
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"Deployment {slot.name!r} sent no first token within {limit:g} s.",
                deployment=slot.name,
            ) from None
        except StopAsyncIteration:
            raise UpstreamStatusError(
                f"Deployment {slot.name!r} ended the stream without any output.",
                deployment=slot.name,
            ) from None


class _Plan:
    """The walk through deployments and fallback models for one request."""

    def __init__(self, router: Router, call: Call, model: str, capability: str) -> None:
        self._router = router
        self._call = call
        self._capability = capability
        self._requested = model
        controls: RequestControls = call.controls
        self._narrow = controls.fallbacks
        self._queue: list[str] = [model]
        self._queued: set[str] = {model}
        self._model: str | None = None
        self._route: ModelRoute | None = None
        self._tried: set[str] = set()
        self._model_attempts = 0
        self._model_started = router._clock()
        self._last_error: HeadraceError | None = None
        router._budget.record_request()
        self._started_model()

    # Which model, which deployment --------------------------------------------------------

    def _started_model(self) -> None:
        self._model = self._queue.pop(0)
        self._route = self._router._catalog.route(self._model, self._capability)
        if self._model != self._requested:
            self._router._metrics.fallbacks.labels(self._requested, self._model).inc()
            log.info("fallback", request_id=self._call.request_id, model=self._model)
        self._call.model = self._model
        self._tried = set()
        self._model_attempts = 0
        self._model_started = self._router._clock()

    def _enqueue(self, models: Sequence[str]) -> None:
        for name in models:
            if self._narrow is not None and name not in self._narrow:
                continue
            if name not in self._queued:
                self._queued.add(name)
                self._queue.append(name)

    def _pick(self) -> Slot | None:
        assert self._model is not None
        slots = [s for s in self._router.slots(self._model) if s.available()]
        if not slots:
            return None
        untried = [s for s in slots if s.name not in self._tried] or slots
        by_name = {s.name: s for s in untried}
        ordered = self._router._strategies[self._model].order(
            [s.candidate() for s in untried], self._router._rng
        )
        return by_name[ordered[0].name]

    def next(self) -> Slot | None:
        """The next deployment to try, or None when the plan is exhausted."""
        while True:
            slot = None
            if self._model_attempts < self._router.policy(self._model or "").retry.max_attempts:
                slot = self._pick()
            if slot is not None and slot.breaker.try_acquire():
                self._tried.add(slot.name)
                self._model_attempts += 1
                self._call.attempts += 1
                self._call.deployment = slot.name
                return slot
            if slot is None and self._last_error is None:
                self._last_error = OverloadedError(
                    f"Every deployment of {self._model!r} is unavailable (circuit open, cooling "
                    "down after rate limiting, or at its concurrency limit). Retry shortly.",
                    headers={"Retry-After": "1"},
                )
                self._after_failure(ErrorClass.TRANSIENT)
            if not self._queue:
                return None
            self._started_model()

    # What a failure means -----------------------------------------------------------------

    async def failed(self, slot: Slot, error: HeadraceError) -> None:
        """Record ``error`` from ``slot``; sleep a backoff if the plan retries this model.

        Raises ``error`` at once when it is permanent.
        """
        router = self._router
        kind = classify(error)
        if isinstance(error, UpstreamRateLimitedError) and error.retry_after_s:
            slot.breaker.cool_down(error.retry_after_s)
        if counts_against_breaker(error):
            slot.breaker.record_failure()
        else:
            slot.breaker.release()
        router._metrics.upstream_errors.labels(slot.name, kind.value).inc()
        self._last_error = error
        log.info(
            "upstream_failed",
            request_id=self._call.request_id,
            deployment=slot.name,
            error_class=kind.value,
            error=error.message,
        )
        if kind is ErrorClass.PERMANENT and ErrorClass.PERMANENT not in self._fallback_on():
            raise error
        if kind is ErrorClass.TRANSIENT:
            policy = router.policy(self._model or "").retry
            # Retry-After concerns the deployment that said it (now cooling down); a retry on
            # another deployment needs only the ordinary backoff.
            elsewhere = any(s.available() for s in router.slots(self._model or "") if s is not slot)
            retry_after = None
            if not elsewhere and isinstance(error, UpstreamError):
                retry_after = error.retry_after_s
            delay = policy.delay_s(self._model_attempts - 1, router._rng, retry_after)
            elapsed = router._clock() - self._model_started
            # Somewhere to go: another deployment now, or this one once its Retry-After passed.
            can_wait = retry_after is not None and slot.breaker.state is not BreakerState.OPEN
            if (
                self._model_attempts < policy.max_attempts
                and policy.may_retry(self._model_attempts, elapsed, delay)
                and (elsewhere or slot.available() or can_wait)
                and router._budget.try_spend()
            ):
                router._metrics.retries.labels(slot.name).inc()
                if delay > 0:
                    await router._sleep(delay)
                return
            # No more retries on this model: stop trying it.
            self._model_attempts = router.policy(self._model or "").retry.max_attempts
        else:
            self._model_attempts = router.policy(self._model or "").retry.max_attempts
        self._after_failure(kind)

    def _fallback_on(self) -> frozenset[ErrorClass]:
        return self._router.policy(self._requested).fallback_on

    def _after_failure(self, kind: ErrorClass) -> None:
        if kind not in self._fallback_on():
            return
        policy = self._router.policy(self._model or "")
        if kind is ErrorClass.CONTEXT_LENGTH:
            self._enqueue(policy.context_fallbacks)
        else:
            self._enqueue(self._router.policy(self._requested).fallbacks)

    def succeeded(self, slot: Slot, exhausted_for_s: float | None = None) -> None:
        slot.breaker.record_success()
        if exhausted_for_s:
            # The upstream's own quota is used up: skip it until it resets.
            slot.breaker.cool_down(exhausted_for_s)

    # The end of the road ------------------------------------------------------------------

    def raise_last(self) -> None:
        if self._last_error is not None:
            raise self._last_error
        raise OverloadedError(
            f"No deployment of {self._requested!r} could take the request; retry shortly.",
            headers={"Retry-After": "1"},
        )

    def degraded_answer(self) -> str:
        """The requested model's degraded answer, or raise the last error."""
        answer = self._router.policy(self._requested).degraded_answer
        if answer is None or self._narrow == ():
            self.raise_last()
        assert answer is not None
        self._call.degraded = True
        self._call.model = self._requested
        log.warning(
            "degraded_answer",
            request_id=self._call.request_id,
            model=self._requested,
            error=self._last_error.message if self._last_error else None,
        )
        return answer


def _degraded_response(model: str, text: str) -> ChatResponse:
    body = {
        "id": f"chatcmpl-degraded-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": Usage().to_openai(),
    }
    return ChatResponse(body=body, usage=Usage())


def _degraded_chunks(request: ChatRequest, text: str) -> list[ChatChunk]:
    base = {
        "id": f"chatcmpl-degraded-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model,
    }
    chunks = [
        ChatChunk(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": text},
                        "finish_reason": None,
                    }
                ],
            }
        ),
        ChatChunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    ]
    usage = Usage()
    chunks.append(ChatChunk({**base, "choices": [], "usage": usage.to_openai()}, usage=usage))
    return chunks


def response_model(response: ChatResponse | EmbeddingResponse) -> str | None:
    """The model the upstream says answered."""
    if isinstance(response, EmbeddingResponse):
        return response.model
    model = response.body.get("model")
    return model if isinstance(model, str) else None


def _end_attempt(
    span: Span | None, error: BaseException | None, usage: Usage | None = None
) -> None:
    """End a streamed attempt's span (tracing on): failed with ``error``, or with its usage."""
    if span is None:
        return
    if error is not None:
        failed(span, error)
    elif usage is not None:
        answered(span, input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
    span.end()
