"""``POST /v1/chat/completions``: JSON or SSE."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from headrace.api import sse
from headrace.api.context import authenticated_call, json_body, runtime
from headrace.api.wire import chat_request

router = APIRouter()


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(request: Request) -> Response:
    call = await authenticated_call(request)
    chat = chat_request(await json_body(request))
    call.model = chat.model
    gateway = runtime(request).gateway
    if not chat.stream:
        answer = await gateway.chat(call, chat)
        return Response(orjson.dumps(answer.body), media_type="application/json")
    chunks = gateway.stream_chat(call, chat)
    # Wait for the first chunk before answering, so a failure before any output still gets
    # a real error status instead of a 200 stream.
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    if first is None:
        return StreamingResponse(iter([sse.DONE]), media_type="text/event-stream")
    return StreamingResponse(
        sse.encode(first, chunks), media_type="text/event-stream", headers=sse.HEADERS
    )
