"""A Redis that is down or hung costs milliseconds and surfaces only as CacheUnavailableError."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

pytest.importorskip("redis")

from headrace.cache.base import CacheEntry, CacheUnavailableError
from headrace.cache.redis import RedisCache, RedisFlightLock

CLOSED = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused
BOUND_S = 0.5  # generous: a refused connection takes about a millisecond

CacheCall = Callable[[RedisCache], Awaitable[object]]
LockCall = Callable[[RedisFlightLock], Awaitable[object]]

CACHE_CALLS: dict[str, CacheCall] = {
    "get": lambda c: c.get("k"),
    "set": lambda c: c.set("k", CacheEntry(b"v", 1.0, frozenset({"model:a"})), 60),
    "set-ttl-0": lambda c: c.set("k", CacheEntry(b"v", 1.0), 0),
    "purge-tags": lambda c: c.purge(["model:a", "team:b"]),
    "purge-all": lambda c: c.purge(),
    "stats": lambda c: c.stats(),
    "check": lambda c: c.check(),
}


async def _seeded_release(lock: RedisFlightLock) -> None:
    lock._tokens["k"] = "token"  # as if acquire had won before Redis went away
    await lock.release("k")


LOCK_CALLS: dict[str, LockCall] = {
    "acquire": lambda lock: lock.acquire("k", 5),
    "release": _seeded_release,
    "wait": lambda lock: lock.wait("k", 5),
}


async def _fails_fast(call: Awaitable[object]) -> str:
    started = time.perf_counter()
    with pytest.raises(CacheUnavailableError) as raised:
        await call
    assert time.perf_counter() - started < BOUND_S
    return str(raised.value)


@pytest.mark.parametrize("name", CACHE_CALLS)
async def test_every_cache_method_raises_cache_unavailable_quickly(name: str) -> None:
    cache = RedisCache(CLOSED)
    message = await _fails_fast(CACHE_CALLS[name](cache))
    assert "127.0.0.1:1" in message
    assert "unreachable" in message
    await cache.aclose()


@pytest.mark.parametrize("name", LOCK_CALLS)
async def test_every_lock_method_raises_cache_unavailable_quickly(name: str) -> None:
    lock = RedisFlightLock(CLOSED)
    await _fails_fast(LOCK_CALLS[name](lock))
    await lock.aclose()


async def test_after_a_failure_calls_fail_without_trying_for_a_second() -> None:
    cache = RedisCache(CLOSED)
    await _fails_fast(cache.get("k"))
    started = time.perf_counter()
    message = await _fails_fast(cache.get("k"))
    assert time.perf_counter() - started < 0.01
    assert "failed under 1 s ago" in message
    await cache.aclose()


@pytest.fixture
async def hung_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers: a Redis that hangs."""
    handlers: set[asyncio.Task[None]] = set()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while await reader.read(4096):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    server.close()
    await server.wait_closed()
    for task in handlers:
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)


async def test_a_hung_redis_times_out_within_the_socket_timeout(hung_server: str) -> None:
    cache = RedisCache(hung_server, socket_timeout_s=0.1)
    message = await _fails_fast(cache.get("k"))
    assert "Timeout" in message
    await cache.aclose()
