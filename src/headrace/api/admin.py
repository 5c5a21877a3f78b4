"""``/admin/*``: operator routes, admin keys only: the response cache and the deployments.

Keys and teams are :mod:`headrace.api.admin_keys`, usage :mod:`headrace.api.usage`, dead
letters :mod:`headrace.api.jobs`.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

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


@router.get("/admin/deployments", tags=["admin"])
async def deployments(request: Request) -> Response:
    """Every model's deployments as this process sees them: where they point, their load,
    latency and circuit breaker, and their price. Never a credential."""
    _, rt = await admin_only(request)
    router = rt.gateway.router
    data = []
    for route in rt.gateway.catalog.routes:
        for slot in router.slots(route.name):
            d = slot.deployment
            latency = slot.latency.value
            data.append(
                {
                    "model": route.name,
                    "capabilities": sorted(route.capabilities),
                    "name": d.name,
                    "provider": d.kind,
                    "upstream_model": d.model,
                    "base_url": _without_credentials(d.base_url),
                    "weight": d.weight,
                    "max_concurrency": d.max_concurrency,
                    "in_flight": slot.in_flight,
                    "latency_ewma_ms": None if latency is None else round(latency * 1000, 3),
                    "breaker": slot.breaker.state.value,
                    "price_per_mtok_usd": {
                        "input": d.price.input_per_mtok / 1_000_000,
                        "output": d.price.output_per_mtok / 1_000_000,
                    },
                }
            )
    return json_response({"object": "list", "data": data})


def _without_credentials(url: str | None) -> str | None:
    """``url`` without a ``user:password@`` part, should a deployment's URL carry one."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))
