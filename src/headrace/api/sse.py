"""Server-sent events in OpenAI's framing: ``data: <json>\\n\\n`` …, then ``data: [DONE]``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import structlog

from headrace.domain import ChatChunk
from headrace.errors import HeadraceError

log = structlog.get_logger("headrace.api")

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def encode(first: ChatChunk, rest: AsyncIterator[ChatChunk]) -> AsyncIterator[bytes]:
    """Frame chunks as they arrive. An upstream failure after the first byte can no longer
    change the status code, so it is sent as an OpenAI error event and the stream ends
    without ``[DONE]`` (the openai SDK raises ``APIError`` on it)."""
    yield event(first.body)
    try:
        async for chunk in rest:
            yield event(chunk.body)
    except HeadraceError as exc:
        log.warning("stream_failed", error=exc.message)
        yield event(exc.to_openai())
        return
    yield DONE
