"""The response cache in the pipeline: look up, coalesce identical requests, store answers.

For a cacheable request (the model's policy allows it; by default only deterministic ones,
temperature 0 or a seed) the cacher:

1. reads the cache unless the client sent ``Cache-Control: no-cache`` (``max-age=N`` limits
   the age it accepts) — a hit is answered without an upstream call and costs nothing;
2. joins an identical request already in flight in this process (single-flight; streams
   included: followers receive the leader's chunks as they arrive), or, with a cross-process
   :class:`~headrace.cache.base.FlightLock`, waits for another process's leader and reads
   its stored answer;
3. otherwise computes the answer and stores it unless the client sent ``no-store``. Streams
   are stored only when they complete; a failed or cut stream is never stored.

A cache backend that is down is skipped (``X-Headrace-Cache: bypass``) and the request is
served as if there were no cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
import structlog

from headrace.cache.base import (
    CacheEntry,
    CacheUnavailableError,
    FlightLock,
    ResponseCache,
    tags_for,
)
from headrace.cache.keys import cache_key, is_deterministic
from headrace.domain import Call, ChatChunk, ChatRequest, ChatResponse, Price, Usage
from headrace.gateway.semantic import Probe, SemanticCache
from headrace.observability.metrics import Metrics

log = structlog.get_logger("headrace.cache")

HIT, MISS, BYPASS = "hit", "miss", "bypass"


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """One model's cache policy. ``deterministic_only``: cache only temperature 0 or seeded."""

    enabled: bool = True
    ttl_s: float = 3600.0
    deterministic_only: bool = True

    def for_key(self, metadata: Mapping[str, str]) -> CachePolicy:
        """This policy as an API key narrows or widens it.

        Key metadata ``cache``: ``off``, ``deterministic`` or ``all``; ``cache_ttl_s``: a
        shorter or longer lifetime. Anything else leaves the model's policy as it is.
        """
        mode = metadata.get("cache")
        ttl = metadata.get("cache_ttl_s")
        policy = self
        if mode == "off":
            return replace(policy, enabled=False)
        if mode in ("deterministic", "all"):
            policy = replace(policy, enabled=True, deterministic_only=mode == "deterministic")
        if ttl:
            try:
                policy = replace(policy, ttl_s=max(1.0, float(ttl)))
            except ValueError:
                log.warning("bad_key_cache_ttl", value=ttl)
        return policy


class _Broadcast:
    """A leader's stream, replayable from the start by any number of followers."""

    def __init__(self) -> None:
        self.chunks: list[ChatChunk] = []
        self.done = False
        self.error: BaseException | None = None
        self.saved: dict[str, Any] = {}  # usage and deployment, for followers' saved cost
        self._changed = asyncio.Event()

    def push(self, chunk: ChatChunk) -> None:
        self.chunks.append(chunk)
        self._wake()

    def finish(
        self, error: BaseException | None = None, saved: dict[str, Any] | None = None
    ) -> None:
        self.done = True
        self.error = error
        self.saved = saved or {}
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncGenerator[ChatChunk, None]:
        index = 0
        while True:
            while index < len(self.chunks):
                yield self.chunks[index]
                index += 1
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            await self._changed.wait()


async def _replay(stored: Mapping[str, Any]) -> AsyncGenerator[ChatChunk, None]:
    for body in stored["chunks"]:
        yield ChatChunk(body, Usage.from_openai(body.get("usage")) or None)


class ResponseCacher:
    def __init__(
        self,
        cache: ResponseCache,
        policies: Mapping[str, CachePolicy],
        *,
        metrics: Metrics,
        prices: Mapping[str, Price],
        flight_lock: FlightLock | None = None,
        shared_namespace: bool = False,
        flight_timeout_s: float = 30.0,
        semantic: SemanticCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._semantic = semantic
        self._counters = {r: metrics.cache_requests.labels(r) for r in (HIT, MISS, BYPASS)}
        self._cache = cache
        self._policies = policies
        self._metrics = metrics
        self._prices = prices
        self._lock = flight_lock
        self._shared = shared_namespace
        self._flight_timeout_s = flight_timeout_s
        self._clock = clock
        self._json_flights: dict[str, asyncio.Future[tuple[ChatResponse, str | None]]] = {}
        self._stream_flights: dict[str, _Broadcast] = {}

    @property
    def cache(self) -> ResponseCache:
        return self._cache

    async def start(self) -> None:
        if self._semantic is not None:
            await self._semantic.index.start()

    async def aclose(self) -> None:
        await self._cache.aclose()
        if self._semantic is not None:
            await self._semantic.index.aclose()
        if self._lock is not None:
            await self._lock.aclose()

    # -- keys and policy --------------------------------------------------------------------

    def _namespace(self, call: Call) -> str:
        if self._shared:
            return "shared"
        principal = call.principal
        if principal is None:
            return "anonymous"
        return f"team:{principal.team_id}" if principal.team_id else f"key:{principal.key_id}"

    def _policy(self, call: Call, request: ChatRequest) -> CachePolicy:
        policy = self._policies.get(request.model, CachePolicy())
        principal = call.principal
        return policy.for_key(principal.metadata) if principal and principal.metadata else policy

    def _key(self, call: Call, request: ChatRequest, kind: str) -> str | None:
        policy = self._policy(call, request)
        if not policy.enabled:
            return None
        if policy.deterministic_only and not is_deterministic(request.body):
            return None
        return cache_key(self._namespace(call), kind, request.model, request.body)

    def _outcome(self, call: Call, result: str) -> None:
        call.cache = result
        self._counters[result].inc()

    # -- backend access that never fails the request ------------------------------------------

    async def _read(self, call: Call, key: str) -> dict[str, Any] | None:
        """The stored answer, or None; raises :class:`CacheUnavailableError` if it is down."""
        controls = call.controls.cache
        if controls.no_cache:
            return None
        entry = await self._cache.get(key)  # CacheUnavailableError: the caller bypasses
        if entry is None:
            return None
        if controls.max_age_s is not None and self._clock() - entry.created_at > controls.max_age_s:
            return None
        stored: dict[str, Any] = orjson.loads(entry.value)
        return stored

    async def _read_quietly(self, call: Call, key: str) -> dict[str, Any] | None:
        try:
            return await self._read(call, key)
        except CacheUnavailableError as exc:
            log.warning("cache_unavailable", error=str(exc))
            return None

    async def _write(self, call: Call, request: ChatRequest, key: str, value: object) -> None:
        if call.controls.cache.no_store:
            return
        policy = self._policy(call, request)
        principal = call.principal
        entry = CacheEntry(
            value=orjson.dumps(value),
            created_at=self._clock(),
            tags=tags_for(
                model=request.model,
                team=principal.team_id if principal else None,
                key_id=principal.key_id if principal else None,
            ),
        )
        try:
            await self._cache.set(key, entry, policy.ttl_s)
        except CacheUnavailableError as exc:
            log.warning("cache_unavailable", error=str(exc))

    def _hit(self, call: Call, stored: Mapping[str, Any] | None) -> None:
        """Count a hit; ``stored`` (usage and deployment) prices the upstream call it saved.

        A follower of a stream still in flight passes None and counts the saving when the
        leader's stream completes (:meth:`_count_saving`).
        """
        self._outcome(call, HIT)
        if stored is not None:
            self._count_saving(stored)
        call.usage = Usage()  # nothing is billed for a hit
        call.cost_micro_usd = 0

    def _count_saving(self, stored: Mapping[str, Any]) -> None:
        usage = Usage.from_openai(stored.get("usage")) or Usage()
        price = self._prices.get(str(stored.get("deployment")), Price())
        saved = price.cost_micro_usd(usage)
        if saved:
            self._metrics.cache_saved_usd.inc(saved / 1_000_000)

    async def _semantic_probe(self, call: Call, request: ChatRequest, kind: str) -> Probe | None:
        if self._semantic is None or call.controls.cache.no_cache:
            return None
        probe = await self._semantic.probe(self._namespace(call), kind, request)
        if probe is not None and probe.value is not None:
            self._hit(call, probe.value)
            call.similarity = probe.similarity
        return probe

    async def _semantic_store(self, call: Call, probe: Probe | None, value: object) -> None:
        if probe is not None and self._semantic is not None and not call.controls.cache.no_store:
            await self._semantic.store(probe, value)

    async def _lead_elsewhere(self, key: str) -> bool:
        """With a cross-process lock: True if another process leads ``key`` (we waited)."""
        if self._lock is None:
            return False
        try:
            if await self._lock.acquire(key, self._flight_timeout_s):
                return False
            await self._lock.wait(key, self._flight_timeout_s)
        except CacheUnavailableError as exc:
            log.warning("cache_unavailable", error=str(exc))
            return False
        return True

    async def _release(self, key: str) -> None:
        if self._lock is None:
            return
        try:
            await self._lock.release(key)
        except CacheUnavailableError as exc:
            log.warning("cache_unavailable", error=str(exc))

    # -- JSON answers ------------------------------------------------------------------------

    async def chat(
        self, call: Call, request: ChatRequest, compute: Callable[[], Awaitable[ChatResponse]]
    ) -> ChatResponse:
        key = self._key(call, request, "json")
        if key is None or call.controls.cache.no_cache:
            self._outcome(call, BYPASS)
            response = await compute()
            if key is not None:
                await self._write(call, request, key, self._json_value(response, call.deployment))
            return response
        try:
            stored = await self._read(call, key)
        except CacheUnavailableError as exc:
            log.warning("cache_unavailable", error=str(exc))
            self._outcome(call, BYPASS)
            return await compute()
        existing = await self._existing_json(call, key, stored)
        if existing is not None:
            return existing
        probe = await self._semantic_probe(call, request, "json")
        if probe is not None and probe.value is not None:
            return ChatResponse(body=probe.value["body"], usage=Usage())
        return await self._compute_json(call, request, key, compute, probe)

    async def _existing_json(
        self, call: Call, key: str, stored: dict[str, Any] | None
    ) -> ChatResponse | None:
        """A stored answer, or a leader's (here or in another process); None: neither."""
        if stored is None:
            leader = self._json_flights.get(key)
            if leader is not None:
                try:
                    response, deployment = await asyncio.wait_for(
                        asyncio.shield(leader), self._flight_timeout_s
                    )
                except Exception as exc:  # the leader failed: serve this one ourselves
                    log.info("single_flight_leader_failed", error=type(exc).__name__)
                else:
                    self._hit(call, self._json_value(response, deployment))
                    return ChatResponse(body=response.body, usage=Usage())
            if await self._lead_elsewhere(key):
                stored = await self._read_quietly(call, key)
        if stored is None:
            return None
        self._hit(call, stored)
        return ChatResponse(body=stored["body"], usage=Usage())

    async def _compute_json(
        self,
        call: Call,
        request: ChatRequest,
        key: str,
        compute: Callable[[], Awaitable[ChatResponse]],
        probe: Probe | None = None,
    ) -> ChatResponse:
        self._outcome(call, MISS)
        flight: asyncio.Future[tuple[ChatResponse, str | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._json_flights[key] = flight
        try:
            response = await compute()
        except BaseException as exc:
            flight.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            flight.exception()  # mark retrieved: followers may all be gone
            raise
        else:
            flight.set_result((response, call.deployment))
            if not call.degraded:
                value = self._json_value(response, call.deployment)
                await self._write(call, request, key, value)
                await self._semantic_store(call, probe, value)
            return response
        finally:
            if self._json_flights.get(key) is flight:
                del self._json_flights[key]
            await self._release(key)

    @staticmethod
    def _json_value(response: ChatResponse, deployment: str | None) -> dict[str, Any]:
        return {
            "body": response.body,
            "usage": response.usage.to_openai(),
            "deployment": deployment,
        }

    # -- streams -----------------------------------------------------------------------------

    async def stream(
        self,
        call: Call,
        request: ChatRequest,
        compute: Callable[[], AsyncGenerator[ChatChunk, None]],
    ) -> AsyncGenerator[ChatChunk, None]:
        key = self._key(call, request, "stream")
        stored = None
        if key is not None and not call.controls.cache.no_cache:
            try:
                stored = await self._read(call, key)
            except CacheUnavailableError as exc:
                log.warning("cache_unavailable", error=str(exc))
                key = None  # neither read nor write a cache that is down
        if key is None or call.controls.cache.no_cache:
            self._outcome(call, BYPASS)
            # Nothing to store without a key: pass the stream through with no extra layer.
            chunks = (
                compute() if key is None else self._stream_and_store(call, request, key, compute())
            )
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()
            return
        existing = await self._existing_stream(call, key, stored)
        probe = None
        if existing is None:
            probe = await self._semantic_probe(call, request, "stream")
            if probe is not None and probe.value is not None:
                existing = _replay(probe.value)
        if existing is not None:
            async for chunk in existing:
                yield chunk
            return
        self._outcome(call, MISS)
        broadcast = _Broadcast()
        self._stream_flights[key] = broadcast
        try:
            chunks = self._stream_and_store(
                call, request, key, compute(), broadcast=broadcast, probe=probe
            )
            async for chunk in chunks:
                yield chunk
        finally:
            if self._stream_flights.get(key) is broadcast:
                del self._stream_flights[key]
            await self._release(key)

    async def _existing_stream(
        self, call: Call, key: str, stored: dict[str, Any] | None
    ) -> AsyncGenerator[ChatChunk, None] | None:
        """A stored transcript to replay, or a leader's live stream to follow; None: neither."""
        if stored is None:
            broadcast = self._stream_flights.get(key)
            if broadcast is not None and not broadcast.done:
                self._hit(call, None)
                return self._follow(broadcast)
            if await self._lead_elsewhere(key):
                stored = await self._read_quietly(call, key)
        if stored is None:
            return None
        self._hit(call, stored)
        return _replay(stored)

    async def _follow(self, broadcast: _Broadcast) -> AsyncGenerator[ChatChunk, None]:
        async for chunk in broadcast.follow():
            yield chunk
        self._count_saving(broadcast.saved)

    async def _stream_and_store(
        self,
        call: Call,
        request: ChatRequest,
        key: str | None,
        chunks: AsyncGenerator[ChatChunk, None],
        *,
        broadcast: _Broadcast | None = None,
        probe: Probe | None = None,
    ) -> AsyncGenerator[ChatChunk, None]:
        bodies: list[dict[str, Any]] = []
        usage = Usage()
        try:
            async for chunk in chunks:
                bodies.append(chunk.body)
                if chunk.usage is not None:
                    usage = chunk.usage
                if broadcast is not None:
                    broadcast.push(chunk)
                yield chunk
        except BaseException as exc:
            if broadcast is not None:
                broadcast.finish(exc)
            raise
        finally:
            await chunks.aclose()
        if broadcast is not None:
            broadcast.finish(saved={"usage": usage.to_openai(), "deployment": call.deployment})
        if key is not None and not call.degraded:
            value = {"chunks": bodies, "usage": usage.to_openai(), "deployment": call.deployment}
            await self._write(call, request, key, value)
            await self._semantic_store(call, probe, value)
