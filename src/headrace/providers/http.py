"""One pooled aiohttp session per event loop, shared by every HTTP provider.

aiohttp rather than httpx: httpx 0.28's pool degrades quadratically when requests queue
(docs/adr/0003). A session belongs to the loop it was created on, so the pool keys sessions by
loop; tests that run several loops in one process get one session each.
"""

from __future__ import annotations

import asyncio

import aiohttp


class SessionPool:
    """Hands out the current loop's :class:`aiohttp.ClientSession`, creating it on first use."""

    def __init__(self, *, limit: int = 0, limit_per_host: int = 0) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    def get(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                limit_per_host=self._limit_per_host,
                ttl_dns_cache=300,
                enable_cleanup_closed=True,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                # Per-request timeouts come from each deployment; none here.
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=True,
            )
            self._sessions[loop] = session
        return session

    async def aclose(self) -> None:
        """Close the sessions of the running loop (others are closed by their own loops)."""
        loop = asyncio.get_running_loop()
        session = self._sessions.pop(loop, None)
        if session is not None and not session.closed:
            await session.close()
