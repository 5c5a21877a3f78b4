"""Embeddings micro-batching: concurrent ``embed`` calls become one upstream call.

:class:`BatchingProvider` wraps any :class:`~headrace.providers.base.Provider`. ``deployment``,
``chat``, ``stream_chat`` and ``check`` pass straight through; compatible ``embed`` calls that
arrive within ``window_s`` seconds of the first call of a batch go upstream as one request, and
the answer is split back::

    time ─►   0 ms                      window_s (2 ms)
    A.embed   ●── opens the window ─────┐
    B.embed        ● joins              │
    C.embed              ● joins        │
                                        └─► inner.embed([a1, b1, b2, c1])
                                               └─► A gets [a1], B [b1, b2], C [c1]
    D.embed                                ● opens the next window ...

Contract:

* Compatible means the same ``model``, the same ``dimensions`` and an equal ``body`` apart
  from ``input``; there is one pending batch per such key. The merged request is the first
  caller's with ``inputs`` (and ``body["input"]``) replaced by the concatenated inputs.
* A batch leaves when its window closes or as soon as it holds ``max_inputs`` inputs; a request
  that would push it past ``max_inputs`` sends it at once and opens a new batch. A request is
  never split: one with ``max_inputs`` inputs or more goes upstream alone, at once.
* Each caller gets exactly its vectors, in order. A batch with a single caller passes the
  request and the response through untouched (usage exact).
* Usage: the upstream reports one total and the Provider Protocol exposes no per-input counts,
  so each field of ``usage`` is apportioned in proportion to each caller's input length in
  characters, by largest-remainder rounding (ties to the earlier caller): every share is within
  one token of its exact proportion and the shares sum exactly to the upstream total.
  ``model`` and ``exhausted_for_s`` are copied to every caller.
* Errors: if the upstream call raises, every waiting caller of that batch gets the *same*
  exception instance, and later batches are unaffected. asyncio re-raises a future's exception
  with the traceback captured when it was set, so each caller sees the upstream traceback
  rather than another caller's frames; the instance is shared, so handlers must not mutate it.
  An answer with the wrong number of vectors fails the batch with UpstreamStatusError.
* Cancellation: a cancelled caller's vectors (and usage share) are dropped; the others are
  unaffected. When every caller of a batch is cancelled, the upstream call is skipped (before
  dispatch) or cancelled (in flight), as the Provider Protocol asks.
* ``aclose()`` flushes: pending batches are sent at once, in-flight calls are awaited, then the
  inner provider is closed. No task outlives it; ``embed`` after ``aclose`` raises
  UpstreamUnavailableError.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import accumulate

from headrace.domain import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Deployment,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
)
from headrace.errors import UpstreamStatusError, UpstreamUnavailableError
from headrace.providers.base import Provider

_Key = tuple[str, int | None, str]


@dataclass(eq=False, slots=True)
class _Waiter:
    request: EmbeddingRequest
    future: asyncio.Future[EmbeddingResponse]


@dataclass(eq=False, slots=True)
class _Batch:
    key: _Key
    waiters: list[_Waiter] = field(default_factory=list)
    size: int = 0  # inputs of the callers not cancelled before dispatch
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None  # set once dispatched

    def abandoned(self) -> bool:
        return all(waiter.future.cancelled() for waiter in self.waiters)


def _key(request: EmbeddingRequest) -> _Key:
    rest = {k: v for k, v in request.body.items() if k != "input"}
    return request.model, request.dimensions, json.dumps(rest, sort_keys=True, default=repr)


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` (>= 0) in proportion to ``weights`` (>= 0) by largest remainder.

    The shares sum exactly to ``total``; ties go to the earlier weight; all-zero weights split
    evenly. Integer arithmetic only, so there is no float drift.
    """
    weights = list(weights) if any(weights) else [1] * len(weights)
    whole = sum(weights) or 1
    shares = [total * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: -(total * weights[i] % whole))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


class BatchingProvider:
    """A Provider that merges concurrent compatible ``embed`` calls (contract: module docstring).

    ``window_s``: seconds the first call of a batch waits for others to join (>= 0).
    ``max_inputs``: most inputs in one merged upstream call (>= 1).
    """

    def __init__(self, inner: Provider, *, window_s: float = 0.002, max_inputs: int = 256) -> None:
        if window_s < 0 or max_inputs < 1:
            raise ValueError(
                f"Batching needs window_s >= 0 and max_inputs >= 1; got {window_s=}, {max_inputs=}."
            )
        self._inner = inner
        self._window_s = window_s
        self._max_inputs = max_inputs
        self._pending: dict[_Key, _Batch] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def deployment(self) -> Deployment:
        return self._inner.deployment

    async def chat(self, request: ChatRequest) -> ChatResponse:
        return await self._inner.chat(request)

    def stream_chat(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        return self._inner.stream_chat(request)

    async def check(self) -> None:
        await self._inner.check()

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """One vector per input, in order; waits up to ``window_s`` for others to batch with."""
        if self._closed:
            name = self.deployment.name
            raise UpstreamUnavailableError(
                f"Deployment {name!r} is shutting down; retry the request.", deployment=name
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(request, loop.create_future())
        key, count = _key(request), len(request.inputs)
        if count >= self._max_inputs:
            batch = _Batch(key)  # full on its own: goes alone, leaving the pending batch be
        else:
            pending = self._pending.get(key)
            if pending is not None and pending.size + count > self._max_inputs:
                self._dispatch(pending)
                pending = None
            if pending is None:
                pending = self._pending[key] = _Batch(key)
                pending.timer = loop.call_later(self._window_s, self._dispatch, pending)
            batch = pending
        batch.waiters.append(waiter)
        batch.size += count
        waiter.future.add_done_callback(partial(self._on_waiter_done, batch, waiter))
        if batch.size >= self._max_inputs:
            self._dispatch(batch)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.exception()  # mark retrieved: no "never retrieved" log at exit
            raise

    async def aclose(self) -> None:
        """Send pending batches now, wait for in-flight ones, then close the inner provider."""
        self._closed = True
        try:
            for batch in list(self._pending.values()):
                self._dispatch(batch)
            await asyncio.gather(*self._inflight, return_exceptions=True)
        finally:
            await self._inner.aclose()

    def _on_waiter_done(
        self, batch: _Batch, waiter: _Waiter, future: asyncio.Future[EmbeddingResponse]
    ) -> None:
        if not future.cancelled():
            return
        if batch.task is None:
            batch.size -= len(waiter.request.inputs)  # give its room back to later callers
            if batch.abandoned():
                self._dispatch(batch)  # retires the batch: nobody is left to send it for
        elif batch.abandoned():
            batch.task.cancel()

    def _dispatch(self, batch: _Batch) -> None:
        if self._pending.get(batch.key) is batch:
            del self._pending[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
        if batch.task is not None or batch.abandoned():
            return
        batch.task = asyncio.get_running_loop().create_task(self._run(batch))
        self._inflight.add(batch.task)
        batch.task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: _Batch) -> None:
        live = [waiter for waiter in batch.waiters if not waiter.future.done()]
        try:
            if len(live) == 1:
                results = [await self._inner.embed(live[0].request)]
            else:
                results = self._split(live, await self._inner.embed(_merge(live)))
        except Exception as exc:  # the upstream's error goes to every caller of the batch
            for waiter in live:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
        else:
            for waiter, result in zip(live, results, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(result)
        finally:  # cancelled (every caller gone, or loop shutdown): release anyone left
            for waiter in live:
                if not waiter.future.done():
                    waiter.future.cancel()

    def _split(self, live: list[_Waiter], response: EmbeddingResponse) -> list[EmbeddingResponse]:
        counts = [len(waiter.request.inputs) for waiter in live]
        if len(response.vectors) != sum(counts):
            name = self.deployment.name
            raise UpstreamStatusError(
                f"Deployment {name!r} returned {len(response.vectors)} embeddings for "
                f"{sum(counts)} inputs; check that it is OpenAI-compatible or disable batching.",
                deployment=name,
            )
        weights = [sum(len(text) for text in waiter.request.inputs) for waiter in live]
        usage = response.usage
        totals = (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        shares = zip(*(apportion(total, weights) for total in totals), strict=True)
        return [
            replace(
                response, vectors=list(response.vectors[end - count : end]), usage=Usage(*share)
            )
            for count, end, share in zip(counts, accumulate(counts), shares, strict=True)
        ]


def _merge(live: list[_Waiter]) -> EmbeddingRequest:
    first = live[0].request
    inputs = [text for waiter in live for text in waiter.request.inputs]
    return replace(first, inputs=inputs, body={**first.body, "input": inputs})
