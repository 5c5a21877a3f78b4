"""The shared limiter on Redis: every gateway process holds one set of limits, exactly.

:meth:`RedisLimiter.acquire` is one ``EVALSHA``: a Lua script checks every demand on Redis's
``TIME`` (whole microseconds, exact in a Lua double), then writes all of them or none; it
reads each counter once and the writes build on what it read, since every ``redis.call``
costs Redis a few µs and the acquire is on the request's path (a key and a team with RPM,
TPM, parallel and budget limits: 16 commands with no lease held, 18 with some; reading again
before writing took 32).
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
from headrace.limits.resp import RespConnection, bulk, encode

_KIND = {LimitKind.RATE: b"r", LimitKind.CONCURRENCY: b"c", LimitKind.BUDGET: b"b"}
_COUNTER = {LimitKind.RATE: "R", LimitKind.CONCURRENCY: "c", LimitKind.BUDGET: "b"}  # key letters
# A demand or a settlement in the script's ARGV: its kind, then four numbers (RECORD in the Lua).
_RECORD = struct.Struct("<cdddd")
_FAILURES = (redis_errors.RedisError, OSError)  # all become LimiterUnavailableError
_US = 1_000_000
_MAX_HELD = 64  # settlements held at most: more are sent at once, in one call

# One script for every call: it applies the settlements it carries, then takes the demands.
# KEYS: each settlement's counter, then each demand's. ARGV[1]: the acquiring lease; ARGV[2]: a
# RECORD per demand: kind ('r', 'c', 'b'), limit, amount, window (µs), seed; ARGV[3]: a RECORD
# per settlement: kind, delta, limit, window (µs), and the index in ARGV of its lease (ARGV[4]
# onwards). Returns {allowed (1/0), refused (1-based, 0: none), retry (µs, -1: never)},
# remaining and reset (µs) for each demand, then each settled counter's value. Without demands
# (a flush of settlements alone) the first three are {1, 0, 0}.
#
# Written for a Redis that has been idle, as between requests at a moderate rate: there every
# Lua operation costs about as much as a command (bench/README.md, "What the limiter's script
# costs an idle Redis"). So it branches on the kind in two plain loops, keeps each demand's
# fields in flat arrays rather than a table per demand and functions per kind, names the
# library functions it calls as locals, and formats no number itself.
_LUA = """
local call, unpack, pack = redis.call, struct.unpack, struct.pack
local max, ceil, floor = math.max, math.ceil, math.floor
local EPS = 1e-9  -- levels are doubles: a demand within EPS units of fitting fits
local LEVEL = '<dd'  -- a RATE counter: its level and when it was written (µs)
local RECORD = '<c1dddd'  -- a demand or settlement in ARGV: its kind letter, then 4 numbers
local t = call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])  -- µs, exact in a double
local lease = ARGV[1]

-- redis.call sends a Lua number as '%.17g' (Lua's own tostring would give '%.14g'), so µs times
-- and amounts go as numbers, exactly: they are whole and below 2^53.
local function ms(us) return max(1, ceil(us / 1000)) end

-- RATE: µs for `level` units to drain at limit / window units per µs.
local function drain_us(level, limit, window)
  if limit <= 0 then return 0 end
  return ceil(level * window / limit)
end

-- RATE: the level now, after draining since the last write; missing or limit <= 0: empty.
local function rate_level(key, limit, window)
  if limit <= 0 then return 0 end
  local stored = call('GET', key)
  if not stored then return 0 end
  local level, at = unpack(LEVEL, stored)
  return max(0, level - max(0, now - at) * limit / window)
end

-- RATE: write `level` as of now; it lives 1 s beyond draining, an empty one not at all.
local function rate_store(key, level, limit, window)
  if level <= 0 or limit <= 0 then
    call('DEL', key)
    return
  end
  call('SET', key, pack(LEVEL, level, now), 'PX', ms(drain_us(level, limit, window) + 1000000))
end

-- CONCURRENCY: the leases held now, expired ones dropped (swept only when any are held).
local function leases_held(key)
  local held = call('ZCARD', key)
  if held == 0 then return 0 end
  return held - call('ZREMRANGEBYSCORE', key, '-inf', now)
end

-- The settlements first, in order, so that the demands see the counters they leave.
-- RATE: drain, then add delta (a missing counter is an empty one; without a limit to drain by,
-- leave it alone). CONCURRENCY: release the lease. BUDGET: add delta (the value stays at least
-- 0) unless the period's counter is gone.
local ns = #ARGV[3] / struct.size(RECORD)
local values = {}
local at = 1
for i = 1, ns do
  local kind, delta, limit, window, lease_at
  kind, delta, limit, window, lease_at, at = unpack(RECORD, ARGV[3], at)
  local key, value = KEYS[i], 0
  if kind == 'r' then
    if limit > 0 then
      local level = max(0, rate_level(key, limit, window) + delta)
      rate_store(key, level, limit, window)
      value = max(0, ceil(level - EPS))
    end
  elseif kind == 'c' then
    call('ZREM', key, ARGV[lease_at])
    value = leases_held(key)
  elseif call('EXISTS', key) == 1 then
    value = call('INCRBY', key, delta)
    if value < 0 then
      call('SET', key, '0', 'KEEPTTL')
      value = 0
    end
  end
  values[i] = value
end

-- Check every demand; the first that does not fit refuses the call, which takes nothing. Each
-- counter is read once: what was read stays in `seen` (RATE: the level; CONCURRENCY: leases
-- held; BUDGET: the value, the seed when missing) and `extra` (CONCURRENCY: the last lease's
-- expiry, nil: none; BUDGET: µs to expiry, -1: none; nil: missing), and the takes below build
-- on it, since nothing else touches a counter in between.
local nd = #KEYS - ns
local kinds, limits, amounts, windows, seen, extra = {}, {}, {}, {}, {}, {}
local refused = 0
at = 1
for i = 1, nd do
  local key, kind, limit, amount, window, seed = KEYS[ns + i]
  kind, limit, amount, window, seed, at = unpack(RECORD, ARGV[2], at)
  kinds[i], limits[i], amounts[i], windows[i] = kind, limit, amount, window
  local value, fits
  if kind == 'r' then
    value = rate_level(key, limit, window)
    fits = value + amount - limit <= EPS
  elseif kind == 'c' then
    value = leases_held(key)
    if value > 0 then extra[i] = tonumber(call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]) end
    fits = value < limit
  else
    value = call('GET', key)
    if value then
      local ttl = call('PTTL', key)
      value, extra[i] = tonumber(value), ttl >= 0 and ttl * 1000 or -1
    else
      value = seed
    end
    fits = value + amount <= limit
  end
  seen[i] = value
  if refused == 0 and (not fits or amount > limit) then refused = i end
end

-- What is left of counter i at `value` (with its `x`, as in `extra`): remaining, reset (µs).
local function state(i, value, x)
  local kind, limit = kinds[i], limits[i]
  if kind == 'r' then
    return max(0, floor(limit - value + EPS)), drain_us(value, limit, windows[i])
  elseif kind == 'c' then
    return max(0, limit - value), x and x - now or 0
  end
  return max(0, limit - value), max(0, x or windows[i])
end

local out = {1, 0, 0}
if refused > 0 then  -- report every counter as it stands, and when the refused one would fit
  local i, wait = refused, -1
  if amounts[i] <= limits[i] then
    if kinds[i] == 'r' then
      wait = drain_us(seen[i] + amounts[i] - limits[i], limits[i], windows[i])
    elseif kinds[i] == 'c' then  -- until the first lease expires
      if seen[i] > 0 then
        wait = tonumber(call('ZRANGE', KEYS[ns + i], 0, 0, 'WITHSCORES')[2]) - now
      end
    else  -- until the period's counter expires
      wait = extra[i] or windows[i]
    end
  end
  out[1], out[2], out[3] = 0, i, wait
  for j = 1, nd do out[2 + 2 * j], out[3 + 2 * j] = state(j, seen[j], extra[j]) end
else  -- take every demand, and report each counter as it is left
  for i = 1, nd do
    local key, kind, value, x = KEYS[ns + i], kinds[i], seen[i] + amounts[i], extra[i]
    if kind == 'r' then
      rate_store(key, value, limits[i], windows[i])
    elseif kind == 'c' then  -- the set lives as long as its last lease
      local expiry = now + windows[i]
      value = seen[i] + call('ZADD', key, expiry, lease)
      if value == seen[i] then  -- the lease was held already: its expiry moved
        x = tonumber(call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
      elseif not x or expiry > x then
        x = expiry
      end
      call('PEXPIRE', key, ms(x - now))
    elseif x then
      value = call('INCRBY', key, amounts[i])
    else  -- a new period's counter, at its seed
      x = ms(windows[i])
      call('SET', key, value, 'PX', x)
      x = x * 1000
    end
    out[2 + 2 * i], out[3 + 2 * i] = state(i, value, x)
  end
end

local n = #out
for i = 1, ns do out[n + i] = values[i] end
return out
"""


class _Script:
    """A Lua script run by ``EVALSHA``, loaded again when Redis has lost it (a restart)."""

    def __init__(self, source: str) -> None:
        self._load = encode("SCRIPT", "LOAD", source)
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def command(self, keys: Sequence[str], *args: str | bytes) -> bytes:
        """``EVALSHA`` with ``keys`` and ``args``, encoded."""
        return encode("EVALSHA", self._sha, len(keys), *keys, *args)

    def head(self, keys: Sequence[str], more: int) -> bytes:
        """The start of an encoded ``EVALSHA`` with ``keys`` that ``more`` arguments follow,
        each a :func:`~headrace.limits.resp.bulk` the caller appends."""
        start = (b"EVALSHA", self._sha.encode(), b"%d" % len(keys), *[k.encode() for k in keys])
        return b"*%d\r\n%b" % (len(start) + more, b"".join([bulk(part) for part in start]))

    async def __call__(self, redis: RespConnection, command: bytes) -> Any:
        """Send ``command``, an ``EVALSHA`` of this script (loading it first if Redis lost
        it); the reply."""
        try:
            return await redis.send(command)
        except redis_errors.NoScriptError:
            await redis.send(self._load)
            return await redis.send(command)


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
        self._script = _Script(_LUA)
        self._linger_s = settle_linger_s
        self._held: list[_Held] = []
        self._timer: asyncio.TimerHandle | None = None
        self._carriers: set[asyncio.Task[list[Any]]] = set()  # calls carrying settlements
        # The start of an EVALSHA, by its counters: an acquire's up to its lease, and a lone
        # settlement's up to its records. A key and its team send the same counters on every
        # request, and encoding them cost more than the rest of the command.
        self._heads: dict[tuple[tuple[LimitKind, str], ...], bytes] = {}
        self._flushes: dict[tuple[tuple[LimitKind, str], ...], bytes] = {}

    async def start(self) -> None:
        """Nothing: connections open on first use (see :meth:`check`)."""

    async def acquire(self, demands: Sequence[Demand], lease: str) -> Decision:
        if not demands:
            return Decision(True, ())
        pack = _RECORD.pack
        packed = b"".join(
            [pack(_KIND[d.kind], d.limit, d.amount, _micros(d.window_s), d.seed) for d in demands]
        )
        try:
            if self._held:
                # In a task of its own: a caller cancelled mid-call (its client left) must not
                # leave the settlements it carries unanswered.
                call = self._carry(self._keys(demands), lease, packed)
                reply = await asyncio.shield(call)
            else:
                counters = tuple([(d.kind, d.key) for d in demands])
                head = self._heads.get(counters) or self._head(counters, self._heads, 3)
                # ARGV: the lease, the demands, no settlements.
                command = b"".join([head, bulk(lease.encode()), bulk(packed), b"$0\r\n\r\n"])
                reply = await self._script(self._redis, command)
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        # RESP integers (the script returns nothing else), which hiredis reads as ints.
        states = tuple(
            [
                CounterState(d.key, d.limit, reply[3 + 2 * i], reply[4 + 2 * i] / _US)
                for i, d in enumerate(demands)
            ]
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

    def _keys(self, demands: Sequence[Demand | Settlement]) -> list[str]:
        """The Redis keys of these counters."""
        prefix = self._prefix
        return [f"{prefix}{_COUNTER[d.kind]}:{d.key}" for d in demands]

    def _head(
        self,
        counters: tuple[tuple[LimitKind, str], ...],
        heads: dict[tuple[tuple[LimitKind, str], ...], bytes],
        more: int,
    ) -> bytes:
        """The start of an ``EVALSHA`` on these counters that ``more`` arguments follow, kept
        in ``heads`` for the next call with them."""
        prefix = self._prefix
        head = self._script.head([f"{prefix}{_COUNTER[k]}:{key}" for k, key in counters], more)
        if len(heads) >= 10_000:  # bounded: keys and teams come and go
            heads.clear()
        heads[counters] = head
        return head

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
        pack = _RECORD.pack
        settled = 0
        records: list[bytes] = []
        leases: list[bytes] = []
        for h in held:
            leases.append(h.lease.encode())
            where = 3 + len(leases)  # the lease's index in ARGV
            settled += len(h.settlements)
            for s in h.settlements:
                records.append(pack(_KIND[s.kind], s.delta, s.limit, _micros(s.window_s), where))
        try:
            if keys or len(held) > 1:
                command = self._script.command(
                    [*self._keys([s for h in held for s in h.settlements]), *keys],
                    lease,
                    packed,
                    b"".join(records),
                    *leases,
                )
            else:  # one request's settlement on its own, as at a moderate rate: a kept start
                counters = tuple([(s.kind, s.key) for s in held[0].settlements])
                head = self._flushes.get(counters) or self._head(counters, self._flushes, 4)
                # ARGV: no acquiring lease, no demands, the records, the settlement's lease.
                tail = [b"$0\r\n\r\n$0\r\n\r\n", bulk(b"".join(records)), bulk(leases[0])]
                command = b"".join([head, *tail])
            reply: list[Any] = await self._script(self._redis, command)
        except BaseException as exc:
            error = self._unavailable(exc)
            for h in held:
                if not h.done.done():
                    h.done.set_exception(error)
            raise
        values = reply[len(reply) - settled :]  # RESP integers, read by hiredis as ints
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
