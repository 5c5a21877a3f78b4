"""The embedded cache backends: an in-process byte-bounded LRU, and a single-process flight lock.

Both are the embedded defaults of their seams (:mod:`headrace.cache.base`) and the fakes the
tests use. They keep state in plain dicts: one event loop, no threads, so no locking.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from headrace.cache.base import CacheEntry, CacheStats

ENTRY_OVERHEAD_BYTES = 512
"""What one entry costs beyond its value and key, in bytes: the LRU node, the write-order
slot, the slot and entry objects, the tag frozenset and tag-index references. Measured
roughly with ``sys.getsizeof`` on CPython 3.11; it only has to keep tiny entries honest."""


@dataclass(slots=True)
class _Slot:
    entry: CacheEntry
    expires_at: float  # in the clock's unit (Unix seconds by default)
    size: int  # bytes charged against max_bytes


class MemoryCache:
    """An LRU bounded in bytes, with a TTL per entry and a tag index for purges.

    The size of an entry is ``len(value) + len(key) + ENTRY_OVERHEAD_BYTES``. When the total
    exceeds ``max_bytes``, entries are dropped oldest-written first while they are expired
    (free, and exact when TTLs are uniform), then least recently used first; only the latter
    count as evictions. An entry larger than ``max_bytes`` is not stored (and the key's old
    entry is dropped, since ``set`` replaces it). Expired entries are misses and are dropped
    when seen. ``get`` and ``set`` are O(1) (plus O(tags)); ``purge`` by tags walks only the
    keys of its rarest tag; ``purge()`` clears everything.

    ``clock`` returns Unix seconds; tests pass a fake one to expire entries without sleeping.
    """

    def __init__(self, max_bytes: int = 256 * 2**20, *, clock: Callable[[], float] = time.time):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._max_bytes = max_bytes
        self._clock = clock
        self._lru: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._written: dict[str, None] = {}  # oldest write first: the cheap expiry sweep
        self._tags: dict[str, set[str]] = {}  # tag → keys carrying it
        self._bytes = 0
        self._evictions = 0

    async def get(self, key: str) -> CacheEntry | None:
        """The live entry for ``key``; an expired one is dropped and is a miss."""
        slot = self._lru.get(key)
        if slot is None:
            return None
        if slot.expires_at <= self._clock():
            self._remove(key)
            return None
        self._lru.move_to_end(key)
        return slot.entry

    async def set(self, key: str, entry: CacheEntry, ttl_s: float) -> None:
        """Store ``entry`` for ``ttl_s`` seconds (``<= 0``: just drop the key's entry)."""
        if key in self._lru:
            self._remove(key)
        size = len(entry.value) + len(key) + ENTRY_OVERHEAD_BYTES
        if ttl_s <= 0 or size > self._max_bytes:
            return
        self._lru[key] = _Slot(entry, self._clock() + ttl_s, size)
        self._written[key] = None
        for tag in entry.tags:
            self._tags.setdefault(tag, set()).add(key)
        self._bytes += size
        if self._bytes > self._max_bytes:
            self._make_room()

    async def purge(self, tags: Iterable[str] = ()) -> int:
        """Delete entries carrying every tag in ``tags`` (none: all); return how many were live."""
        wanted = frozenset(tags)
        now = self._clock()
        if not wanted:
            live = sum(1 for slot in self._lru.values() if slot.expires_at > now)
            self._lru.clear()
            self._written.clear()
            self._tags.clear()
            self._bytes = 0
            return live
        rarest = min((self._tags.get(tag, set()) for tag in wanted), key=len)
        doomed = [key for key in rarest if wanted <= self._lru[key].entry.tags]
        live = 0
        for key in doomed:
            live += self._lru[key].expires_at > now
            self._remove(key)
        return live

    async def stats(self) -> CacheStats:
        """Entries and bytes held (after sweeping the expired oldest writes), and evictions."""
        self._sweep_expired(self._clock())
        return CacheStats(entries=len(self._lru), bytes=self._bytes, evictions=self._evictions)

    async def check(self) -> None:
        """Always reachable."""

    async def aclose(self) -> None:
        """Nothing to release."""

    def _make_room(self) -> None:
        self._sweep_expired(self._clock())
        while self._bytes > self._max_bytes:
            key = next(iter(self._lru))
            self._remove(key)
            self._evictions += 1

    def _sweep_expired(self, now: float) -> None:
        while self._written:
            key = next(iter(self._written))
            if self._lru[key].expires_at > now:
                return
            self._remove(key)

    def _remove(self, key: str) -> None:
        slot = self._lru.pop(key)
        del self._written[key]
        self._bytes -= slot.size
        for tag in slot.entry.tags:
            keys = self._tags[tag]
            keys.discard(key)
            if not keys:
                del self._tags[tag]


class LocalFlightLock:
    """Single-flight leases within one process: the embedded :class:`FlightLock` and its fake.

    ``release(key)`` ends the current lease on ``key`` whoever took it: one instance is one
    participant, and the gateway's own single-flight keeps one leader per key per process.
    Leases are measured on the monotonic clock.
    """

    def __init__(self) -> None:
        self._leases: dict[str, tuple[asyncio.Event, float]] = {}  # key → (released, expiry)

    async def acquire(self, key: str, ttl_s: float) -> bool:
        """Lead ``key`` for ``ttl_s`` seconds unless a lease on it is still running."""
        now = time.monotonic()
        lease = self._leases.get(key)
        if lease is not None and lease[1] > now:
            return False
        if lease is not None:
            lease[0].set()  # the expired lease's followers stop waiting
        self._leases[key] = (asyncio.Event(), now + ttl_s)
        return True

    async def release(self, key: str) -> None:
        """End the lease on ``key`` and wake its followers; no lease: nothing to do."""
        lease = self._leases.pop(key, None)
        if lease is not None:
            lease[0].set()

    async def wait(self, key: str, timeout_s: float) -> None:
        """Return once ``key`` has no running lease (released, expired) or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            lease = self._leases.get(key)
            now = time.monotonic()
            if lease is None or lease[1] <= now or now >= deadline:
                return
            try:
                async with asyncio.timeout(min(lease[1], deadline) - now):
                    await lease[0].wait()
            except TimeoutError:
                continue  # the lease or our patience ran out: the loop decides which
            return

    async def aclose(self) -> None:
        """Nothing to release: leases live in this object."""
