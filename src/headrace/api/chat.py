"""``POST /v1/chat/completions``: JSON or SSE."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from headrace.api import sse
from headrace.api.context import accounted, authenticated_call, json_body, runtime
from headrace.api.wire import chat_request
from headrace.domain import Call, ChatRequest, JobKind
from headrace.errors import InvalidRequestError
from headrace.wiring import Runtime

router = APIRouter()


@router.post("/v1/chat/completions", tags=["openai"])
@accounted("chat")
async def chat_completions(request: Request) -> Response:
    call = await authenticated_call(request)
    chat = chat_request(await json_body(request))
    call.model = chat.model
    rt = runtime(request)
    gateway = rt.gateway
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None:
        return await _once(rt, call, chat, idempotency_key)
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


async def _once(rt: Runtime, call: Call, chat: ChatRequest, key: str) -> Response:
    """``Idempotency-Key``: the first request runs, a repeat gets its stored answer."""
    if chat.stream:
        raise InvalidRequestError(
            "Idempotency-Key is supported for non-streamed requests; drop 'stream' or the key.",
            param="Idempotency-Key",
        )
    if rt.jobs is None or call.principal is None:
        raise InvalidRequestError(
            "Idempotency-Key needs the job store, which this gateway runs without.",
            param="Idempotency-Key",
        )
    if not 0 < len(key) <= 255:
        raise InvalidRequestError(
            "Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key"
        )

    async def run() -> tuple[dict[str, Any], int]:
        answer = await rt.gateway.chat(call, chat)
        return answer.body, call.cost_micro_usd or 0

    body, replayed = await rt.jobs.once(call.principal, JobKind.CHAT, chat.body, key, run)
    headers = {}
    if replayed:
        rt.gateway.record_replay(call, "chat")
        headers["Idempotent-Replayed"] = "true"
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)
