"""The cache seams: a byte store for cached responses, and single-flight coordination.

Values are opaque bytes (the gateway serialises responses and stream transcripts); each entry
carries tags (``model:<name>``, ``team:<id>``, ``key:<id>``) so administrators can purge by
model, team or key. Backends that cannot be reached raise :class:`CacheUnavailableError`, and
the gateway then serves the request without the cache (``X-Headrace-Cache: bypass``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class CacheUnavailableError(Exception):
    """The cache backend cannot be reached; callers carry on without it."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    value: bytes
    created_at: float  # Unix seconds, when the answer was produced
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int
    bytes: int
    evictions: int


def tags_for(*, model: str | None, team: str | None, key_id: str | None) -> frozenset[str]:
    """The purge tags of an entry (or the one tag to purge by)."""
    tags = set()
    if model is not None:
        tags.add(f"model:{model}")
    if team is not None:
        tags.add(f"team:{team}")
    if key_id is not None:
        tags.add(f"key:{key_id}")
    return frozenset(tags)


class ResponseCache(Protocol):
    async def get(self, key: str) -> CacheEntry | None:
        """The live entry for ``key`` (expired entries are misses)."""
        ...

    async def set(self, key: str, entry: CacheEntry, ttl_s: float) -> None:
        """Store ``entry`` for ``ttl_s`` seconds, replacing any entry for ``key``."""
        ...

    async def purge(self, tags: Iterable[str] = ()) -> int:
        """Delete entries carrying every tag in ``tags`` (no tags: everything); return count."""
        ...

    async def stats(self) -> CacheStats: ...

    async def check(self) -> None:
        """Raise :class:`CacheUnavailableError` if the backend cannot be reached."""
        ...

    async def aclose(self) -> None: ...


class FlightLock(Protocol):
    """Cross-process single-flight: one leader computes, followers wait for its answer.

    In one process the gateway coordinates with futures; this seam adds other processes.
    """

    async def acquire(self, key: str, ttl_s: float) -> bool:
        """Become the leader for ``key`` (True) unless another process leads it (False).

        The lease expires after ``ttl_s`` so a crashed leader cannot block followers.
        """
        ...

    async def release(self, key: str) -> None:
        """Give up the lead (after storing the answer, or on failure)."""
        ...

    async def wait(self, key: str, timeout_s: float) -> None:
        """Return when the leader of ``key`` released it, or after ``timeout_s``."""
        ...

    async def aclose(self) -> None: ...
