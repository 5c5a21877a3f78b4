"""The ResponseCache and FlightLock contracts against every backend: memory and Redis.

Redis needs ``HEADRACE_TEST_REDIS_URL`` (CI sets it); each test has its own prefix and cleans up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from headrace.cache.base import CacheEntry, FlightLock, ResponseCache, tags_for
from headrace.cache.memory import ENTRY_OVERHEAD_BYTES, LocalFlightLock, MemoryCache

NO_REDIS = "set HEADRACE_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/0) to run against Redis"


@dataclass
class FakeClock:
    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class CacheUnderTest:
    cache: ResponseCache
    elapse: Callable[[float], Awaitable[None]]  # let this many seconds pass for the TTLs


@pytest.fixture(params=["memory", "redis"])
async def backend(
    request: pytest.FixtureRequest, redis_url: str | None
) -> AsyncIterator[CacheUnderTest]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        yield CacheUnderTest(MemoryCache(clock=clock), advance)
        return
    if not redis_url:
        pytest.skip(NO_REDIS)
    from headrace.cache.redis import RedisCache

    # A generous timeout: these tests check behaviour, and a loaded CI machine is slow to connect.
    cache = RedisCache(redis_url, prefix=f"headrace-test:{uuid.uuid4().hex}:", socket_timeout_s=2.0)
    try:
        yield CacheUnderTest(cache, asyncio.sleep)
    finally:
        await cache.purge()
        await cache.aclose()


def entry(value: bytes = b"answer", *tags: str, created_at: float = 1_712_345_678.25) -> CacheEntry:
    return CacheEntry(value=value, created_at=created_at, tags=frozenset(tags))


async def test_set_then_get_round_trips_bytes_time_and_tags(backend: CacheUnderTest) -> None:
    cache = backend.cache
    stored = CacheEntry(
        value=bytes(range(256)) + b"\n\x00{}",
        created_at=1_712_345_678.123456,
        tags=tags_for(model="gpt-x", team="team-1", key_id="key-1"),
    )
    await cache.set("k", stored, ttl_s=60)
    await cache.set("empty", entry(b""), ttl_s=60)
    assert await cache.get("k") == stored
    assert await cache.get("empty") == entry(b"")  # no value, no tags
    assert await cache.get("other") is None
    await cache.check()  # reachable


async def test_entries_expire_after_their_ttl(backend: CacheUnderTest) -> None:
    cache = backend.cache
    await cache.set("short", entry(b"s", "model:a"), ttl_s=0.2)
    await cache.set("long", entry(b"l", "model:a"), ttl_s=60)
    assert await cache.get("short") is not None
    await backend.elapse(0.3)
    assert await cache.get("long") is not None
    # Written first, so even the memory backend's cheap sweep finds it without a get.
    assert (await cache.stats()).entries == 1
    assert await cache.get("short") is None
    assert await cache.purge(["model:a"]) == 1  # only the live entry counts


async def test_non_positive_ttl_drops_the_entry(backend: CacheUnderTest) -> None:
    await backend.cache.set("k", entry(), ttl_s=60)
    await backend.cache.set("k", entry(b"new"), ttl_s=0)
    assert await backend.cache.get("k") is None
    assert (await backend.cache.stats()).entries == 0


async def test_set_replaces_value_and_tags(backend: CacheUnderTest) -> None:
    cache = backend.cache
    await cache.set("k", entry(b"first", "team:a"), ttl_s=60)
    await cache.set("k", entry(b"second", "team:b", created_at=5.0), ttl_s=60)
    assert await cache.get("k") == entry(b"second", "team:b", created_at=5.0)
    assert await cache.purge(["team:a"]) == 0  # the old tags went with the old entry
    assert await cache.get("k") is not None
    assert (await cache.stats()).entries == 1
    assert await cache.purge(["team:b"]) == 1


async def _three(cache: ResponseCache) -> None:
    await cache.set("k1", entry(b"1", "model:a", "team:x"), ttl_s=60)
    await cache.set("k2", entry(b"2", "model:a", "team:y"), ttl_s=60)
    await cache.set("k3", entry(b"3", "model:b", "team:x"), ttl_s=60)


async def test_purge_by_one_tag(backend: CacheUnderTest) -> None:
    cache = backend.cache
    await _three(cache)
    assert await cache.purge(["model:a"]) == 2
    assert [await cache.get(k) is not None for k in ("k1", "k2", "k3")] == [False, False, True]
    assert await cache.purge(["model:a"]) == 0
    assert await cache.purge(["model:unknown"]) == 0


async def test_purge_by_two_tags_deletes_the_intersection(backend: CacheUnderTest) -> None:
    cache = backend.cache
    await _three(cache)
    assert await cache.purge(iter(["team:x", "model:a"])) == 1
    assert [await cache.get(k) is not None for k in ("k1", "k2", "k3")] == [False, True, True]
    assert await cache.purge(["team:y", "model:b"]) == 0


async def test_purge_without_tags_deletes_everything(backend: CacheUnderTest) -> None:
    cache = backend.cache
    await _three(cache)
    assert await cache.purge() == 3
    assert [await cache.get(k) for k in ("k1", "k2", "k3")] == [None, None, None]
    stats = await cache.stats()
    assert (stats.entries, stats.bytes) == (0, 0)
    await cache.set("k1", entry(b"again", "model:a"), ttl_s=60)  # still usable afterwards
    assert await cache.purge(["model:a"]) == 1


async def test_stats_follow_sets_replaces_and_purges(backend: CacheUnderTest) -> None:
    cache = backend.cache
    empty = await cache.stats()
    assert (empty.entries, empty.bytes) == (0, 0)
    assert empty.evictions >= 0  # Redis reports the server's, which other clients share
    await _three(cache)
    three = await cache.stats()
    assert three.entries == 3
    assert three.bytes >= 3  # at least the values; backends add keys, headers, overhead
    await cache.set("k1", entry(b"1" * 1000, "model:a", "team:x"), ttl_s=60)
    grown = await cache.stats()
    assert (grown.entries, grown.bytes) == (3, three.bytes + 999)
    await cache.purge(["model:b"])
    after = await cache.stats()
    assert after.entries == 2
    assert after.bytes < grown.bytes


async def test_a_burst_of_concurrent_calls_is_served(backend: CacheUnderTest) -> None:
    # More callers than Redis connections in the pool: they queue briefly, none is refused.
    cache = backend.cache
    await asyncio.gather(*(cache.set(f"k{i}", entry(b"v", "model:a"), 60) for i in range(1000)))
    assert None not in await asyncio.gather(*(cache.get(f"k{i}") for i in range(1000)))
    assert (await cache.stats()).entries == 1000
    assert await cache.purge(["model:a"]) == 1000  # more keys than one purge batch


# -- memory only: the byte budget ------------------------------------------------------------
def size_of(key: str, value: bytes) -> int:
    return len(value) + len(key) + ENTRY_OVERHEAD_BYTES


async def test_memory_evicts_least_recently_used_by_bytes() -> None:
    cache = MemoryCache(max_bytes=3 * size_of("a", b"x" * 100))
    for key in "abc":
        await cache.set(key, entry(b"x" * 100), ttl_s=60)
    assert await cache.get("a") is not None  # now b is the least recently used
    await cache.set("d", entry(b"x" * 100), ttl_s=60)
    assert [await cache.get(k) is not None for k in "abcd"] == [True, False, True, True]
    stats = await cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (3, 3 * size_of("a", b"x" * 100), 1)
    # A bigger entry pushes out as many of the least recently used as it needs.
    await cache.set("e", entry(b"x" * 150), ttl_s=60)
    assert [await cache.get(k) is not None for k in "acde"] == [False, False, True, True]
    assert (await cache.stats()).evictions == 3


async def test_memory_drops_expired_entries_before_evicting_live_ones() -> None:
    clock = FakeClock()
    cache = MemoryCache(max_bytes=2 * size_of("a", b"x"), clock=clock)
    await cache.set("a", entry(b"x"), ttl_s=1)
    await cache.set("b", entry(b"x"), ttl_s=60)
    await cache.get("b")
    await cache.get("a")  # a is now the most recently used, but expires first
    clock.now += 2
    await cache.set("c", entry(b"x"), ttl_s=60)
    assert await cache.get("b") is not None
    assert (await cache.stats()).evictions == 0


async def test_memory_does_not_store_an_entry_larger_than_the_budget() -> None:
    cache = MemoryCache(max_bytes=1000)
    await cache.set("k", entry(b"small"), ttl_s=60)
    await cache.set("k", entry(b"x" * 1000), ttl_s=60)
    assert await cache.get("k") is None  # replaced by nothing rather than left stale
    stats = await cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (0, 0, 0)


# -- FlightLock --------------------------------------------------------------------------------
@dataclass
class LocksUnderTest:
    leader: FlightLock
    follower: FlightLock  # another process's view (the same instance for the local lock)
    cross_process: bool


@pytest.fixture(params=["local", "redis"])
async def locks(
    request: pytest.FixtureRequest, redis_url: str | None
) -> AsyncIterator[LocksUnderTest]:
    if request.param == "local":
        lock = LocalFlightLock()
        yield LocksUnderTest(lock, lock, cross_process=False)
        return
    if not redis_url:
        pytest.skip(NO_REDIS)
    from redis.asyncio import Redis

    from headrace.cache.redis import RedisFlightLock

    prefix = f"headrace-test:{uuid.uuid4().hex}:flight:"
    client = Redis.from_url(redis_url)
    leader = RedisFlightLock(redis_url, prefix=prefix)  # owns its pool
    follower = RedisFlightLock(client, prefix=prefix)  # shares a client
    try:
        yield LocksUnderTest(leader, follower, cross_process=True)
    finally:
        await leader.aclose()
        await follower.aclose()  # leaves the shared client open: its owner closes it
        names = [name async for name in client.scan_iter(match=f"{prefix}*")]
        if names:
            await client.unlink(*names)
        await client.aclose()


async def test_second_acquire_fails_while_the_lease_is_held(locks: LocksUnderTest) -> None:
    assert await locks.leader.acquire("k", ttl_s=5) is True
    assert await locks.follower.acquire("k", ttl_s=5) is False
    assert await locks.follower.acquire("other", ttl_s=5) is True
    await locks.leader.release("k")
    assert await locks.follower.acquire("k", ttl_s=5) is True


async def test_release_wakes_a_waiter_promptly(locks: LocksUnderTest) -> None:
    assert await locks.leader.acquire("k", ttl_s=10)
    waiter = asyncio.create_task(locks.follower.wait("k", timeout_s=5))
    await asyncio.sleep(0.15)
    assert not waiter.done()
    released_at = time.perf_counter()
    await locks.leader.release("k")
    await asyncio.wait_for(waiter, timeout=2)
    assert time.perf_counter() - released_at < 0.5


async def test_an_expired_lease_lets_a_new_leader_in(locks: LocksUnderTest) -> None:
    assert await locks.leader.acquire("k", ttl_s=0.2)
    assert not await locks.follower.acquire("k", ttl_s=5)
    started = time.perf_counter()
    await locks.follower.wait("k", timeout_s=5)  # the leader "crashed": nobody releases
    assert time.perf_counter() - started < 0.6
    assert await locks.follower.acquire("k", ttl_s=5)


async def test_wait_times_out_when_nobody_releases(locks: LocksUnderTest) -> None:
    assert await locks.leader.acquire("k", ttl_s=10)
    started = time.perf_counter()
    await locks.follower.wait("k", timeout_s=0.3)
    assert 0.25 <= time.perf_counter() - started < 1.0


async def test_wait_returns_at_once_when_nobody_leads(locks: LocksUnderTest) -> None:
    started = time.perf_counter()
    await locks.follower.wait("nobody", timeout_s=5)
    assert time.perf_counter() - started < 0.2
    await locks.follower.release("nobody")  # releasing what we do not lead is a no-op


async def test_an_expired_leader_cannot_release_its_successor(locks: LocksUnderTest) -> None:
    if not locks.cross_process:
        pytest.skip("one local lock is one participant: release ends whichever lease it holds")
    assert await locks.leader.acquire("k", ttl_s=0.1)
    await asyncio.sleep(0.2)
    assert await locks.follower.acquire("k", ttl_s=5)
    await locks.leader.release("k")
    assert not await locks.leader.acquire("k", ttl_s=5)
