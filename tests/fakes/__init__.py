"""In-process fakes of upstream providers, following each provider's documented wire format.

Each fake is a small :mod:`aiohttp.web` app that validates what the real service requires,
serves the canonical bodies and SSE transcripts in ``tests/fixtures/<provider>/``, and records
the last request for assertions. :func:`serve` runs one on ``127.0.0.1`` at a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def load_json(provider: str, name: str) -> Any:
    return orjson.loads((FIXTURES / provider / name).read_bytes())


def sse_events(provider: str, name: str) -> list[bytes]:
    """The events of an ``.sse`` transcript, each with its terminating blank line."""
    text = (FIXTURES / provider / name).read_bytes()
    return [event + b"\n\n" for event in text.split(b"\n\n") if event.strip()]


async def send_sse(
    request: web.Request,
    events: list[bytes],
    headers: dict[str, str] | None = None,
    *,
    delay_s: float = 0.0,
) -> web.StreamResponse:
    """Write events one at a time, each flushed, as a server streams them; ``delay_s`` is
    the wait between sending the headers and the first event."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            **(headers or {}),
        }
    )
    await response.prepare(request)
    if delay_s:
        await asyncio.sleep(delay_s)
    for event in events:
        await response.write(event)
    await response.write_eof()
    return response


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on 127.0.0.1 at a free port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
