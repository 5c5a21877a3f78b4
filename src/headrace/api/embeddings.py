"""``POST /v1/embeddings``: float lists or base64 (little-endian float32), as OpenAI does."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from headrace.api.context import accounted, authenticated_call, json_body, runtime
from headrace.api.wire import embedding_body, embedding_request

router = APIRouter()


@router.post("/v1/embeddings", tags=["openai"])
@accounted("embeddings")
async def embeddings(request: Request) -> Response:
    call = await authenticated_call(request)
    embed, encoding = embedding_request(await json_body(request))
    call.model = embed.model
    answer = await runtime(request).gateway.embed(call, embed)
    body = embedding_body(answer, encoding)
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )
