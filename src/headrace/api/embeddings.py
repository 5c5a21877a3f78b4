"""``POST /v1/embeddings``: float lists or base64 (little-endian float32), as OpenAI does."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from headrace.api.context import authenticated_call, json_body, runtime
from headrace.api.wire import embedding_request

router = APIRouter()


def _encode(vector: Sequence[float], encoding: str) -> object:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


@router.post("/v1/embeddings", tags=["openai"])
async def embeddings(request: Request) -> Response:
    call = await authenticated_call(request)
    embed, encoding = embedding_request(await json_body(request))
    call.model = embed.model
    answer = await runtime(request).gateway.embed(call, embed)
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
            for i, vector in enumerate(answer.vectors)
        ],
        "model": answer.model,
        "usage": {
            "prompt_tokens": answer.usage.prompt_tokens,
            "total_tokens": answer.usage.prompt_tokens,
        },
    }
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )
