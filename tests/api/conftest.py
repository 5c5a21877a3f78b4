"""Fixtures and helpers of the API tests: a webhook receiver, a job's event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from tests.conftest import AUTH

Receiver = tuple[str, list[tuple[dict[str, str], bytes]]]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on a real socket: its URL, and the headers and body of each POST
    it got. The first POST gets a 500, to exercise the retry; the rest a 204."""
    seen: list[tuple[dict[str, str], bytes]] = []
    failures = [500]  # the first delivery fails, to exercise the retry

    async def hook(request: web.Request) -> web.Response:
        seen.append((dict(request.headers), await request.read()))
        if failures:
            return web.Response(status=failures.pop())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hook", seen
    await runner.cleanup()


async def follow(client: httpx.AsyncClient, job_id: str) -> list[str]:
    """The stream of a job's events, to its end: its event lines and comments."""
    lines = []
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=AUTH) as events:
        async for line in events.aiter_lines():
            if line.startswith(("event: ", ": ")):
                lines.append(line)
    return lines
