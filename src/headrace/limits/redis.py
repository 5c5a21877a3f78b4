"""The shared limiter on Redis: every gateway process holds one set of limits, exactly.

:meth:`RedisLimiter.acquire` is one ``EVALSHA``: a Lua script checks every demand on Redis's
``TIME`` (whole microseconds, exact in a Lua double), then writes all of them or none; it
reads each counter once and the writes build on what it read, since every ``redis.call``
costs Redis a few µs and the acquire is on the request's path (a key and a team with RPM,
TPM, parallel and budget limits: 21 commands, where reading again before writing took 32).
:meth:`RedisLimiter.settle` holds its settlement until the next event-loop turn, or for a
few milliseconds at most when ``settle_linger_s`` says so, so that it rides the next acquire's
call, which applies it before its own demands, or one call that sends every settlement held
(with a linger, about one command per request instead of two at a steady rate). Under the
prefix ``p`` (default ``hr:lim:``):

- ``{p}R:{key}`` — RATE: 16 bytes, two little-endian doubles: the level (units) and when it
  was written (µs), one ``GET`` and one ``SET … PX`` (a hash at ``{p}r:`` took a third command,
  and formatting the level as text cost more than the command). The level drains at
  ``limit / window`` per µs; a missing counter is an empty one. The string expires 1 s after
  it would have drained, so a missing one means the same thing. A
  settlement needs the demand's ``limit`` to drain: without one (``<= 0``) it is skipped.
- ``{p}c:{key}`` — CONCURRENCY: a sorted set of lease ids scored by expiry (µs); expired
  members are dropped before counting; the set expires with its last lease.
- ``{p}b:{key}`` — BUDGET: an integer created at ``seed`` with ``PX window``; ``INCRBY`` keeps
  the TTL. Settling a missing counter is skipped (value 0), so an ended period stays ended.
- ``{p}f:{flag}`` — :meth:`RedisLimiter.first_time`'s flags, ``SET NX PX``.

Counters travel as ``KEYS`` (the settlements', then the demands'), and fields as a few
``ARGV``: the lease, every demand's fields packed into one binary string (a record of kind
letter, limit, amount, window in µs and seed: ``<cdddd``, which the script reads with its
``struct`` library), the settlements' the same way, and their leases. Records rather than
text: splitting a space-separated string and ``tonumber`` on each field cost the script a
quarter of its time, and an argument per field costs the client an encoding each. Replies
are integers only, times in µs (``-1``: never), since Redis truncates Lua numbers to integers.
The semantics are those of :mod:`headrace.limits.memory`, which the contract suite checks side
by side. The script touches only its ``KEYS``, but one call's keys belong to different
counters (a key's and its team's), so they need one Redis (or Valkey) primary, not Cluster.

Failures: every Redis error, including a connect or read timeout after ``timeout_s``, raises
:class:`LimiterUnavailableError` (the :class:`~headrace.limits.fallback.FallbackLimiter` then
limits locally). The connection opens lazily, so a Redis that is down does not stop the
gateway from starting.

Commands go over one pipelined connection of :mod:`headrace.limits.resp`, not through
redis-py's client: per command, its retry wrapper, observability hooks, pool checkout,
stream reader and writer and a timer for each reply cost the gateway more CPU than the
command's own I/O (docs/adr/0012-limiter-redis-connection.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors

from headrace.limits.base import (
    CounterState,
    Decision,
    Demand,
    LimiterUnavailableError,
    LimitKind,
    Settlement,
)
from headrace.limits.resp import RespConnection

_KIND = {LimitKind.RATE: b"r", LimitKind.CONCURRENCY: b"c", LimitKind.BUDGET: b"b"}
_COUNTER = {LimitKind.RATE: "R", LimitKind.CONCURRENCY: "c", LimitKind.BUDGET: "b"}  # key letters
# A demand or a settlement in the script's ARGV: its kind, then four numbers (RECORD in the Lua).
_RECORD = struct.Struct("<cdddd")
_FAILURES = (redis_errors.RedisError, OSError)  # all become LimiterUnavailableError
_US = 1_000_000
_MAX_HELD = 64  # settlements held at most: more are sent at once, in one call

_LUA_COMMON = """
local EPS = 1e-9  -- levels are doubles: a demand within EPS units of fitting fits
local LEVEL = '<dd'  -- a RATE counter: its level and when it was written (µs)
local RECORD = '<c1dddd'  -- a demand or settlement in ARGV: its kind letter, then 4 numbers
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])  -- µs, exact in a double

-- redis.call sends a Lua number as '%.14g' (1.7e+15 for a µs time): format integers ourselves.
local function int(x) return string.format('%d', x) end
local function ms(us) return int(math.max(1, math.ceil(us / 1000))) end

-- RATE: µs for `level` units to drain at limit / window units per µs.
local function drain_us(level, limit, window)
  if limit <= 0 then return 0 end
  return math.ceil(level * window / limit)
end

-- RATE: the level now, after draining since the last write; missing or limit <= 0: empty.
local function rate_level(key, limit, window)
  if limit <= 0 then return 0 end
  local stored = redis.call('GET', key)
  if not stored then return 0 end
  local level, at = struct.unpack(LEVEL, stored)
  return math.max(0, level - math.max(0, now - at) * limit / window)
end

-- RATE: write `level` as of now; it lives 1 s beyond draining, an empty one not at all.
local function rate_store(key, level, limit, window)
  if level <= 0 or limit <= 0 then
    redis.call('DEL', key)
    return
  end
  local ttl = ms(drain_us(level, limit, window) + 1000000)
  redis.call('SET', key, struct.pack(LEVEL, level, now), 'PX', ttl)
end

-- CONCURRENCY: the leases held now, expired ones dropped (swept only when any are held).
local function leases_held(key)
  local held = redis.call('ZCARD', key)
  if held == 0 then return 0 end
  return held - redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
end

-- RATE: what is left (whole units) and µs until it is whole again.
local function rate_state(level, d)
  return math.max(0, math.floor(d.limit - level + EPS)), drain_us(level, d.limit, d.window)
end

"""

# One script for every call: it applies the settlements it carries, then takes the demands.
# KEYS: each settlement's counter, then each demand's. ARGV[1]: the acquiring lease; ARGV[2]: a
# RECORD per demand: kind ('r', 'c', 'b'), limit, amount, window (µs), seed; ARGV[3]: a RECORD
# per settlement: kind, delta, limit, window (µs), and the index in ARGV of its lease (ARGV[4]
# onwards). Returns {allowed (1/0), refused (1-based, 0: none), retry (µs, -1:
# never)}, remaining and reset (µs) for each demand, then each settled counter's value. Without
# demands (a flush of settlements alone) the first three are {1, 0, 0}.
_LUA_CALL = """
local lease = ARGV[1]

-- settle[kind](key, s) -> the counter's value after the settlement.
local settle = {
  r = function(key, s)  -- drain, then add delta; a missing counter is an empty one
    if s.limit <= 0 then return 0 end  -- nothing to drain by: leave the counter alone
    local level = math.max(0, rate_level(key, s.limit, s.window) + s.delta)
    rate_store(key, level, s.limit, s.window)
    return math.max(0, math.ceil(level - EPS))
  end,
  c = function(key, s)  -- release the settlement's lease
    redis.call('ZREM', key, s.lease)
    return leases_held(key)
  end,
  b = function(key, s)  -- add delta (at least 0) unless the period's counter is gone
    if redis.call('EXISTS', key) == 0 then return 0 end
    local value = redis.call('INCRBY', key, int(s.delta))
    if value < 0 then
      redis.call('SET', key, '0', 'KEEPTTL')
      value = 0
    end
    return value
  end,
}

-- look(key, d) -> fits, wait (µs until it would fit, -1: never), remaining, reset (µs).
-- take(key, d) -> remaining, reset: the counter after taking the demand.
-- look reads the counter once and keeps what it read in d, which take then builds on: a
-- counter appears once per call, and nothing else touches it in between.
local kinds = {
  r = {
    look = function(key, d)
      local level = rate_level(key, d.limit, d.window)
      d.level = level
      local over = level + d.amount - d.limit
      return over <= EPS, drain_us(over, d.limit, d.window), rate_state(level, d)
    end,
    take = function(key, d)
      local level = d.level + d.amount
      rate_store(key, level, d.limit, d.window)
      return rate_state(level, d)
    end,
  },
  c = {  -- held, and the first and last lease's expiry (µs; nil: none held)
    look = function(key, d)
      local held, first, last = leases_held(key), nil, nil
      if held > 0 then
        last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
      end
      if held >= d.limit and held > 0 then  -- the wait: until the first lease expires
        first = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
      end
      d.held, d.last = held, last
      return held < d.limit, first and first - now or -1, math.max(0, d.limit - held),
        last and last - now or 0
    end,
    take = function(key, d)
      local expiry = now + d.window
      local held, last = d.held + redis.call('ZADD', key, int(expiry), lease), d.last
      if held == d.held then  -- the lease was held already: its expiry moved
        last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
      elseif not last or expiry > last then
        last = expiry
      end
      redis.call('PEXPIRE', key, ms(last - now))  -- the set lives as long as its last lease
      return math.max(0, d.limit - held), last - now
    end,
  },
  b = {  -- the value, and µs to expiry (-1: none); a missing counter is its seed, fresh
    look = function(key, d)
      local value, ttl = redis.call('GET', key), d.window
      if value then
        value = tonumber(value)
        ttl = redis.call('PTTL', key)
        ttl = ttl >= 0 and ttl * 1000 or -1
      end
      d.value, d.ttl = value, ttl
      value = value or d.seed
      return value + d.amount <= d.limit, ttl, math.max(0, d.limit - value), math.max(0, ttl)
    end,
    take = function(key, d)
      local value, ttl = d.value, d.ttl
      if value then
        value = redis.call('INCRBY', key, int(d.amount))
      else
        value = d.seed + d.amount
        local window = ms(d.window)
        redis.call('SET', key, int(value), 'PX', window)
        ttl = tonumber(window) * 1000
      end
      return math.max(0, d.limit - value), math.max(0, ttl)
    end,
  },
}

-- The settlements first, in order, so that the demands see the counters they leave.
local ns = #ARGV[3] / struct.size(RECORD)
local values = {}
local at = 1
for i = 1, ns do
  local kind, delta, limit, window, lease_at
  kind, delta, limit, window, lease_at, at = struct.unpack(RECORD, ARGV[3], at)
  local s = {delta = delta, limit = limit, window = window, lease = ARGV[lease_at]}
  values[i] = settle[kind](KEYS[i], s)
end

local demands = {}
at = 1
for i = 1, #KEYS - ns do
  local d = {key = KEYS[ns + i]}
  d.kind, d.limit, d.amount, d.window, d.seed, at = struct.unpack(RECORD, ARGV[2], at)
  demands[i] = d
end

local out = {1, 0, 0}
local function reply()
  local n = #out
  for i, value in ipairs(values) do out[n + i] = value end
  return out
end

-- Check every demand; report the first that does not fit and take nothing.
for i, d in ipairs(demands) do
  local fits, wait, remaining, reset = kinds[d.kind].look(d.key, d)
  if d.amount > d.limit then fits, wait = false, -1 end
  if not fits and out[1] == 1 then out[1], out[2], out[3] = 0, i, wait end
  out[2 + 2 * i], out[3 + 2 * i] = remaining, reset
end
if out[1] == 0 then return reply() end

-- Every demand fits: take them all.
for i, d in ipairs(demands) do
  out[2 + 2 * i], out[3 + 2 * i] = kinds[d.kind].take(d.key, d)
end
return reply()
"""


class _Script:
    """A Lua script run by ``EVALSHA``, loaded again when Redis has lost it (a restart)."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, redis: RespConnection, keys: list[str], *args: str | bytes) -> Any:
        """``EVALSHA`` with ``keys`` and ``args``; the reply."""
        try:
            return await redis.call("EVALSHA", self._sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            await redis.call("SCRIPT", "LOAD", self._source)
            return await redis.call("EVALSHA", self._sha, len(keys), *keys, *args)


@dataclass(slots=True)
class _Held:
    """A settlement waiting to be sent, and the future its caller awaits."""

    settlements: Sequence[Settlement]
    lease: str
    done: asyncio.Future[tuple[int, ...]]


class RedisLimiter:
    """The :class:`~headrace.limits.base.Limiter` shared through Redis (see the module doc).

    ``timeout_s`` bounds connecting and each reply. A command on a connection that went away
    is sent once more on a new one, at once (it goes stale when Redis restarts); timeouts are
    not retried, so a slow script is never run twice.

    Settlements are held for up to ``settle_linger_s`` and go to Redis in the next call that
    leaves meanwhile: the next :meth:`acquire` carries them (its script applies them first, so
    it sees the slots and tokens they free), or, if none comes in time, one call sends every
    settlement held. With a linger, at a steady rate that is one command per request instead
    of two (each write to an idle Redis's socket costs the gateway about 35 µs of kernel time
    here); the default, 0, keeps other processes' view of freed slots as prompt as before.
    :meth:`settle` holds the settlement before it returns; its future gives the counters'
    values once the settlement is applied, or raises if the call carrying it failed;
    :meth:`aclose` sends every settlement still held first.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "hr:lim:",
        timeout_s: float = 0.5,
        settle_linger_s: float = 0.0,
    ) -> None:
        self._redis = RespConnection(url, timeout_s=timeout_s)
        self._where = self._redis.where
        self._prefix = prefix
        self._script = _Script(_LUA_COMMON + _LUA_CALL)
        self._linger_s = settle_linger_s
        self._held: list[_Held] = []
        self._timer: asyncio.TimerHandle | None = None
        self._carriers: set[asyncio.Task[list[Any]]] = set()  # calls carrying settlements

    async def start(self) -> None:
        """Nothing: connections open on first use (see :meth:`check`)."""

    async def acquire(self, demands: Sequence[Demand], lease: str) -> Decision:
        if not demands:
            return Decision(True, ())
        prefix = self._prefix
        keys = [f"{prefix}{_COUNTER[d.kind]}:{d.key}" for d in demands]
        pack = _RECORD.pack
        packed = b"".join(
            [pack(_KIND[d.kind], d.limit, d.amount, _micros(d.window_s), d.seed) for d in demands]
        )
        try:
            if self._held:
                # In a task of its own: a caller cancelled mid-call (its client left) must not
                # leave the settlements it carries unanswered.
                call = self._carry(keys, lease, packed)
                reply = await asyncio.shield(call)
            else:
                reply = await self._script(self._redis, keys, lease, packed, b"")
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        reply = [int(x) for x in reply[: 3 + 2 * len(demands)]]
        states = tuple(
            CounterState(d.key, d.limit, reply[3 + 2 * i], reply[4 + 2 * i] / _US)
            for i, d in enumerate(demands)
        )
        allowed, refused, retry_us = reply[:3]
        if allowed:
            return Decision(True, states)
        retry_after = math.inf if retry_us < 0 else retry_us / _US
        return Decision(False, states, refused - 1, retry_after)

    def settle(
        self, settlements: Sequence[Settlement], lease: str
    ) -> asyncio.Future[tuple[int, ...]]:
        """Hold the settlement for the next call (see the class doc); the future gives its
        counters' values once it is applied."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, ...]] = loop.create_future()
        if not settlements:
            done.set_result(())
            return done
        self._held.append(_Held(settlements, lease, done))
        if len(self._held) >= _MAX_HELD:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._linger_s, self._flush)
        return done

    async def first_time(self, flag: str, ttl_s: float) -> bool:
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        try:
            won = await self._redis.call("SET", f"{self._prefix}f:{flag}", "1", "NX", "PX", ttl_ms)
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        return bool(won)

    async def check(self) -> None:
        """``PING``; raise :class:`LimiterUnavailableError` if Redis does not answer."""
        try:
            await self._redis.call("PING")
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc

    async def aclose(self) -> None:
        """Send every settlement still held, wait for the calls carrying them, then close."""
        self._flush()
        while self._carriers:
            await asyncio.gather(*self._carriers, return_exceptions=True)
        await self._redis.aclose()

    # -- settlements held ----------------------------------------------------------------------

    def _flush(self) -> None:
        """Send the settlements held, on their own (no acquire came within the linger)."""
        if self._held:
            self._carry([], "", b"")

    def _carry(self, keys: list[str], lease: str, packed: bytes) -> asyncio.Task[list[Any]]:
        """Start the call for these demands (none: a flush) with every settlement held."""
        held, self._held = self._held, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = asyncio.get_running_loop().create_task(self._call(held, keys, lease, packed))
        self._carriers.add(task)
        task.add_done_callback(self._carried)
        return task

    async def _call(
        self, held: list[_Held], keys: list[str], lease: str, packed: bytes
    ) -> list[Any]:
        """Run the script with ``held``'s settlements first; answer each of them; the reply."""
        prefix = self._prefix
        pack = _RECORD.pack
        settled: list[str] = []
        records: list[bytes] = []
        leases: list[str] = []
        for h in held:
            leases.append(h.lease)
            where = 3 + len(leases)  # the lease's index in ARGV
            for s in h.settlements:
                settled.append(f"{prefix}{_COUNTER[s.kind]}:{s.key}")
                records.append(pack(_KIND[s.kind], s.delta, s.limit, _micros(s.window_s), where))
        try:
            reply: list[Any] = await self._script(
                self._redis, [*settled, *keys], lease, packed, b"".join(records), *leases
            )
        except BaseException as exc:
            error = self._unavailable(exc)
            for h in held:
                if not h.done.done():
                    h.done.set_exception(error)
            raise
        values = [int(x) for x in reply[len(reply) - len(settled) :]]
        start = 0
        for h in held:
            end = start + len(h.settlements)
            if not h.done.done():
                h.done.set_result(tuple(values[start:end]))
            start = end
        return reply

    def _carried(self, task: asyncio.Task[list[Any]]) -> None:
        self._carriers.discard(task)
        if not task.cancelled():
            task.exception()  # its settlements' callers were told; its acquire's caller too

    def _unavailable(self, exc: BaseException) -> LimiterUnavailableError:
        """What every Redis failure becomes (raise it ``from`` the failure)."""
        return LimiterUnavailableError(
            f"the limiter's Redis at {self._where} failed ({type(exc).__name__}: {exc}); "
            "is it up, and limits.redis_url right?"
        )


def _micros(seconds: float) -> int:
    """A window in whole microseconds, at least 1 (the scripts divide by it)."""
    return max(1, round(seconds * _US))
