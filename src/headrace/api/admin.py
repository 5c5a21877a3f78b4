"""``/admin/*``: operator routes, admin keys only. Today: the response cache."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from headrace.api.context import authenticated_call, runtime
from headrace.cache.base import CacheUnavailableError, tags_for
from headrace.domain import Call, Role
from headrace.errors import NotFoundError, OverloadedError, PermissionDeniedError
from headrace.wiring import Runtime

router = APIRouter()


async def admin_only(request: Request) -> tuple[Call, Runtime]:
    call = await authenticated_call(request)
    assert call.principal is not None
    if call.principal.role is not Role.ADMIN:
        raise PermissionDeniedError("This route needs an admin API key.")
    return call, runtime(request)


def json_response(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/admin/cache", tags=["admin"])
async def cache_stats(request: Request) -> Response:
    """Entries, bytes and evictions of the response cache, and hit/miss/bypass counts."""
    _, rt = await admin_only(request)
    if rt.cache is None:
        raise NotFoundError("The response cache is off (cache.backend: none).")
    try:
        stats = await rt.cache.stats()
    except CacheUnavailableError as exc:
        raise OverloadedError(f"The cache backend is unavailable: {exc}") from None
    counts = {
        sample.labels["result"]: int(sample.value)
        for metric in rt.metrics.cache_requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    return json_response(
        {
            "entries": stats.entries,
            "bytes": stats.bytes,
            "evictions": stats.evictions,
            "requests": counts,
        }
    )


@router.delete("/admin/cache", tags=["admin"])
async def cache_purge(request: Request) -> Response:
    """Purge entries by ``model``, ``team`` and/or ``key`` (query parameters); none: all."""
    _, rt = await admin_only(request)
    if rt.cache is None:
        raise NotFoundError("The response cache is off (cache.backend: none).")
    query = request.query_params
    tags = tags_for(model=query.get("model"), team=query.get("team"), key_id=query.get("key"))
    try:
        purged = await rt.cache.purge(tags)
    except CacheUnavailableError as exc:
        raise OverloadedError(f"The cache backend is unavailable: {exc}") from None
    return json_response({"purged": purged, "tags": sorted(tags)})
