"""Redis backends of the cache seams: a response cache shared by processes, and a flight lock.

:class:`RedisCache` keeps, under its prefix ``p`` (default ``headrace:cache:``):

- ``{p}e:{key}``, a string with the entry's TTL: header ``>BdH`` (format version 1,
  ``created_at`` as float64 Unix seconds, tags length), tags (UTF-8, one per line), value.
  Not a hash: one ``SET … PX`` stores value and TTL together, one ``GET`` reads it all back.
- ``{p}tag:{tag}``, the keys with the tag, living as long as they do: ``purge`` ``SINTER``s.
- ``{p}meta`` (key → ``"<stored bytes>\\n<tag>\\n…"``), ``{p}idx`` (key → expiry, ms, Redis
  clock), ``{p}bytes``: bookkeeping that Lua scripts change atomically with the entries. A
  replace drops the old size and tags; writes reap up to 16 expired entries and ``stats`` the
  rest, so ``entries``/``bytes`` are exact under expiry, replaces and purges; keys Redis
  evicts itself (``maxmemory``) stay counted until their TTL passes. ``bytes`` counts stored
  strings, not Redis's overhead; ``evictions`` is INFO's server-wide ``evicted_keys``. The
  scripts derive key names from the prefix: one Redis (or Valkey) primary, not Cluster.

Failures: connecting, reading, and queueing behind 100 calls in flight each time out after
``socket_timeout_s``; a broken connection is retried once, at once (pooled ones go stale when
Redis restarts). Every Redis error surfaces as :class:`CacheUnavailableError`; after a
connection failure or timeout, calls fail fast for ``_RETRY_AFTER_S``, then reconnect. So a
dead Redis costs a request at most ``socket_timeout_s``, and nothing for the second after.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from headrace.cache.base import CacheEntry, CacheStats, CacheUnavailableError

_RETRY_AFTER_S = 1.0  # how long calls fail fast after a connection failure
_BATCH = 500  # keys per purge script / UNLINK / SCAN page
_POLL_S = 0.05  # how often a flight follower re-checks the lock key
_MAX_CONNECTIONS = 100  # concurrent calls per client (a flight wait uses 2 connections)
_HEADER = struct.Struct(">BdH")
_VERSION = 1

_LUA_COMMON = """
local p = ARGV[1]
local function drop(k)
  local m = redis.call('HGET', p .. 'meta', k)
  redis.call('ZREM', p .. 'idx', k)
  if not m then return 0 end
  redis.call('HDEL', p .. 'meta', k)
  local size, tags = string.match(m, '^(%d+)\\n?(.*)$')
  redis.call('DECRBY', p .. 'bytes', size)
  for tag in string.gmatch(tags, '[^\\n]+') do redis.call('SREM', p .. 'tag:' .. tag, k) end
  return redis.call('UNLINK', k)
end
local function reap(limit)
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  local gone = redis.call('ZRANGEBYSCORE', p .. 'idx', '-inf', now, 'LIMIT', 0, limit)
  for _, k in ipairs(gone) do drop(k) end
  return now, #gone
end
"""
# ARGV: prefix, entry key, stored string, ttl ms, meta, tags...
_LUA_SET = """
local now = reap(16)
local k, ttl = ARGV[2], tonumber(ARGV[4])
drop(k)
redis.call('SET', k, ARGV[3], 'PX', ttl)
redis.call('HSET', p .. 'meta', k, ARGV[5])
redis.call('ZADD', p .. 'idx', now + ttl, k)
redis.call('INCRBY', p .. 'bytes', #ARGV[3])
for i = 6, #ARGV do
  local s = p .. 'tag:' .. ARGV[i]; redis.call('SADD', s, k)
  if redis.call('PTTL', s) < ttl then redis.call('PEXPIRE', s, ttl) end
end
"""
# ARGV: prefix, n, n tags, entry keys...: drop the keys that (still) carry every tag.
_LUA_PURGE = """
local n, count = tonumber(ARGV[2]), 0
for i = 3 + n, #ARGV do
  local j, k = 3, ARGV[i]
  while j <= 2 + n and redis.call('SISMEMBER', p .. 'tag:' .. ARGV[j], k) == 1 do j = j + 1 end
  if j > 2 + n then count = count + drop(k) end
end
return count
"""
# ARGV: prefix, reap limit → {entries, bytes, reaped}
_LUA_STATS = """
local _, reaped = reap(tonumber(ARGV[2]))
return {redis.call('ZCARD', p .. 'idx'), redis.call('GET', p .. 'bytes') or 0, reaped}
"""
_LUA_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return redis.call('PUBLISH', ARGV[2], '1')
"""


class _Link:
    """A client, a cap on the connections it uses at once, and a circuit."""

    def __init__(self, redis: str | Redis, timeout_s: float) -> None:
        self.owned = isinstance(redis, str)
        if isinstance(redis, str):
            retry = Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,))
            options: dict[str, Any] = {"retry": retry, "max_connections": 2 * _MAX_CONNECTIONS}
            options.update(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            redis = Redis.from_url(redis, **options)
        self.client = redis
        kwargs = self.client.connection_pool.connection_kwargs
        self.where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(_MAX_CONNECTIONS)  # a burst queues briefly, not fails
        self._open_until, self._reason = 0.0, ""

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[Redis]:
        """Yield the client; turn every Redis failure into :class:`CacheUnavailableError`."""
        if time.monotonic() < self._open_until:
            msg = f"Redis at {self.where} failed under {_RETRY_AFTER_S:g} s ago ({self._reason})"
            raise CacheUnavailableError(msg)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._slots.acquire()
        except TimeoutError:  # Redis is slow or the burst is large: bypass, keep the circuit
            msg = f"Redis at {self.where}: all {_MAX_CONNECTIONS} connections busy for too long"
            raise CacheUnavailableError(msg) from None
        try:
            yield self.client
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            self._open_until = time.monotonic() + _RETRY_AFTER_S
            self._reason = f"{type(exc).__name__}: {exc}"
            msg = f"Redis at {self.where} is unreachable ({self._reason}); is it up, the URL right?"
            raise CacheUnavailableError(msg) from exc
        except redis_errors.RedisError as exc:
            msg = f"Redis at {self.where} rejected a command ({type(exc).__name__}: {exc})"
            raise CacheUnavailableError(msg) from exc
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        if self.owned:
            await self.client.aclose()


class RedisCache:
    """The :class:`~headrace.cache.base.ResponseCache` on Redis (layout in the module doc).

    ``get`` is one ``GET``; ``set`` and a purge batch one script; ``stats`` a script per 1,000
    expired entries, plus ``INFO``. ``purge()`` ``SCAN``s and ``UNLINK``s the prefix's keys.
    """

    def __init__(
        self, url: str, *, prefix: str = "headrace:cache:", socket_timeout_s: float = 0.25
    ) -> None:
        self._link = _Link(url, socket_timeout_s)
        self._prefix = prefix
        self.client = client = self._link.client  # closed by aclose; a RedisFlightLock may share it
        self._set = client.register_script(_LUA_COMMON + _LUA_SET)
        self._purge = client.register_script(_LUA_COMMON + _LUA_PURGE)
        self._stats = client.register_script(_LUA_COMMON + _LUA_STATS)

    async def get(self, key: str) -> CacheEntry | None:
        """The live entry for ``key``; a stored string of an unknown format is a miss."""
        async with self._link.guard() as client:
            blob = await client.get(f"{self._prefix}e:{key}")
        if not isinstance(blob, bytes) or len(blob) < _HEADER.size or blob[0] != _VERSION:
            return None
        _, created_at, end = _HEADER.unpack_from(blob)
        end += _HEADER.size
        tags = frozenset(blob[_HEADER.size : end].decode().split("\n")) - {""}
        return CacheEntry(blob[end:], created_at, tags)

    async def set(self, key: str, entry: CacheEntry, ttl_s: float) -> None:
        """Store ``entry`` for ``ttl_s`` s (``<= 0``: drop it); a tag must be one non-empty line."""
        if any(not tag or "\n" in tag for tag in entry.tags):
            raise ValueError(f"cache tags must be non-empty and one line: {sorted(entry.tags)}")
        name = f"{self._prefix}e:{key}"
        if ttl_s <= 0:
            async with self._link.guard():
                await self._purge(args=[self._prefix, 0, name])
            return
        tags = sorted(entry.tags)
        joined = "\n".join(tags).encode()
        blob = _HEADER.pack(_VERSION, entry.created_at, len(joined)) + joined + entry.value
        meta, ttl_ms = "\n".join([str(len(blob)), *tags]), max(1, round(ttl_s * 1000))
        async with self._link.guard():
            await self._set(args=[self._prefix, name, blob, ttl_ms, meta, *tags])

    async def purge(self, tags: Iterable[str] = ()) -> int:
        """Delete entries carrying every tag in ``tags`` (none: all); return how many were live."""
        wanted = sorted(set(tags))
        if not wanted:
            return await self._purge_all()
        deleted = 0
        async with self._link.guard() as client:
            keys = list(await client.sinter([f"{self._prefix}tag:{tag}" for tag in wanted]))
            for i in range(0, len(keys), _BATCH):
                batch = keys[i : i + _BATCH]
                deleted += int(await self._purge(args=[self._prefix, len(wanted), *wanted, *batch]))
        return deleted

    async def _purge_all(self) -> int:
        pattern = re.sub(r"([\\*?\[\]])", r"\\\1", self._prefix) + "*"
        head, deleted, cursor = f"{self._prefix}e:".encode(), 0, 0
        async with self._link.guard() as client:
            while True:  # SCAN skips expired keys, and UNLINK counts only live ones
                cursor, names = await client.scan(cursor, match=pattern, count=_BATCH)
                if entries := [n for n in names if isinstance(n, bytes) and n.startswith(head)]:
                    deleted += await client.unlink(*entries)
                if names:
                    await client.unlink(*names)  # bookkeeping and tag sets
                if cursor == 0:
                    return deleted

    async def stats(self) -> CacheStats:
        """Live entries and their stored bytes (see the module doc), and server evictions."""
        async with self._link.guard() as client:
            reaped = 1000  # a batch: reaping is bounded per script call so Redis never stalls
            while int(reaped) == 1000:
                entries, size, reaped = await self._stats(args=[self._prefix, 1000])
            info = await client.info("stats")
        evictions = int(info.get("evicted_keys", 0))
        return CacheStats(entries=int(entries), bytes=max(0, int(size)), evictions=evictions)

    async def check(self) -> None:
        """``PING``; raise :class:`CacheUnavailableError` if Redis does not answer."""
        async with self._link.guard() as client:
            await client.ping()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._link.aclose()


class RedisFlightLock:
    """The :class:`~headrace.cache.base.FlightLock` across processes, on Redis.

    A lease is ``SET {prefix}{key} <token> NX PX ttl``; ``release`` deletes it if the token is
    still ours (so an expired leader cannot end its successor's lease) and publishes on
    ``{prefix}done:{key}``. Followers subscribe, and poll the lease every 50 ms so a crashed
    leader's expiry frees them too; each holds a pooled connection while it waits. ``redis``
    is a URL (the lock owns the pool: :meth:`aclose` it) or a shared :attr:`RedisCache.client`.
    """

    def __init__(
        self,
        redis: str | Redis,
        *,
        prefix: str = "headrace:flight:",
        socket_timeout_s: float = 0.25,
    ) -> None:
        self._link = _Link(redis, socket_timeout_s)
        self._prefix = prefix
        self._tokens: dict[str, str] = {}
        self._release = self._link.client.register_script(_LUA_RELEASE)

    async def acquire(self, key: str, ttl_s: float) -> bool:
        """Lead ``key`` for ``ttl_s`` seconds unless some process holds a lease on it."""
        token, ttl_ms = uuid.uuid4().hex, max(1, round(ttl_s * 1000))
        async with self._link.guard() as client:
            won = await client.set(f"{self._prefix}{key}", token, nx=True, px=ttl_ms)
        if won:
            self._tokens[key] = token
        return bool(won)

    async def release(self, key: str) -> None:
        """End our lease on ``key`` (if it is still ours) and wake the followers."""
        token = self._tokens.pop(key, None)
        if token is None:
            return
        async with self._link.guard():
            channel = f"{self._prefix}done:{key}"
            await self._release(keys=[f"{self._prefix}{key}"], args=[token, channel])

    async def wait(self, key: str, timeout_s: float) -> None:
        """Return once ``key`` has no lease (released or expired), or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        async with self._link.guard() as client:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(f"{self._prefix}done:{key}")
                # Subscribed first, then checked: a release in between is not missed.
                while await client.exists(f"{self._prefix}{key}"):
                    left = deadline - time.monotonic()
                    if left <= 0 or await pubsub.get_message(timeout=min(_POLL_S, left)):
                        return
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    async def aclose(self) -> None:
        """Close the connection pool if this lock owns it."""
        await self._link.aclose()
