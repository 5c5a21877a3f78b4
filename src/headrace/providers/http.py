"""One pooled aiohttp session per event loop, shared by every HTTP provider.

aiohttp rather than httpx: httpx 0.28's pool degrades quadratically when requests queue
(docs/adr/0003). A session belongs to the loop it was created on, so the pool keys sessions by
loop; tests that run several loops in one process get one session each.
"""

from __future__ import annotations

import asyncio

import aiohttp

from headrace.domain import Deployment
from headrace.errors import (
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)


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


def transport_error(deployment: Deployment, base_url: str, exc: BaseException) -> UpstreamError:
    """The error for an aiohttp or timeout failure talking to ``deployment`` (no credentials)."""
    name = deployment.name
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeoutError(
            f"Deployment {name!r} did not answer within its timeout "
            f"({deployment.timeouts.total_s:g} s total).",
            deployment=name,
        )
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ClientOSError):
        return UpstreamUnavailableError(
            f"Could not connect to deployment {name!r} at {base_url}: {exc.__class__.__name__}.",
            deployment=name,
        )
    return UpstreamStatusError(
        f"Deployment {name!r} broke the connection: {exc.__class__.__name__}.", deployment=name
    )
