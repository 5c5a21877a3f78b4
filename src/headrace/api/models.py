"""``GET /v1/models`` and ``GET /v1/models/{model}``."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from headrace.api.context import authenticated_call, runtime
from headrace.domain import ModelRoute

router = APIRouter()


def _model(route: ModelRoute, created: int) -> dict[str, object]:
    return {"id": route.name, "object": "model", "created": created, "owned_by": route.owned_by}


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request) -> Response:
    call = await authenticated_call(request)
    rt = runtime(request)
    assert call.principal is not None
    data = [
        _model(route, rt.started_at)
        for route in rt.gateway.catalog.routes
        if call.principal.may_use(route.name)
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.get("/v1/models/{model:path}", tags=["openai"])
async def get_model(request: Request, model: str) -> Response:
    call = await authenticated_call(request)
    rt = runtime(request)
    route = rt.gateway.catalog.route_any(model)
    call.model = route.name
    return Response(orjson.dumps(_model(route, rt.started_at)), media_type="application/json")
