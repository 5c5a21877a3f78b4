"""Operations routes: liveness, readiness (each dependency checked) and Prometheus metrics."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from headrace.api.context import runtime
from headrace.cache.base import CacheUnavailableError
from headrace.observability.metrics import CONTENT_TYPE

router = APIRouter()

CHECK_TIMEOUT_S = 5.0


@router.get("/health/live", tags=["ops"])
async def live() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/health/ready", tags=["ops"])
async def ready(request: Request) -> Response:
    """200 when every required dependency answers, else 503 naming the ones that failed.

    Optional dependencies (the cache) that fail make the status ``degraded`` but keep 200:
    the gateway still serves without them.
    """
    rt = runtime(request)
    checks = rt.readiness

    async def run(name: str) -> tuple[str, str | None]:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await checks[name]()
        except TimeoutError:
            return name, f"no answer within {CHECK_TIMEOUT_S:g} s"
        except Exception as exc:
            return name, getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return name, None

    results = await asyncio.gather(*(run(name) for name in checks))
    failed = {name: error for name, error in results if error is not None}
    fatal = {name for name in failed if name not in rt.optional_checks}
    status = "unavailable" if fatal else "degraded" if failed else "ready"
    body = {
        "status": status,
        "checks": {
            name: {"status": "failed", "error": error} if error else {"status": "ok"}
            for name, error in results
        },
    }
    return Response(
        orjson.dumps(body), status_code=503 if fatal else 200, media_type="application/json"
    )


@router.get("/metrics", tags=["ops"])
async def metrics(request: Request) -> Response:
    rt = runtime(request)
    if rt.cache is not None:
        try:
            stats = await rt.cache.stats()
        except CacheUnavailableError:
            pass
        else:
            rt.metrics.cache_bytes.set(stats.bytes)
            rt.metrics.cache_entries.set(stats.entries)
            rt.metrics.cache_evictions.set(stats.evictions)
    if rt.job_queue is not None:
        try:
            depths = await rt.job_queue.depth()
        except Exception:  # a scrape must not fail on a database blip
            depths = []
        for depth in depths:
            rt.metrics.queue_depth.labels(depth.priority.value).set(depth.queued)
            rt.metrics.queue_oldest_age.labels(depth.priority.value).set(depth.oldest_age_s)
    if rt.usage is not None:
        usage = rt.usage
        for outcome in ("written", "spooled", "replayed", "unspooled"):
            rt.metrics.usage_records.labels(outcome).set(getattr(usage, outcome))
        rt.metrics.usage_pending.set(usage.pending)
        rt.metrics.usage_spooling.set(1 if usage.spooling else 0)
    return Response(rt.metrics.render(), media_type=CONTENT_TYPE)
