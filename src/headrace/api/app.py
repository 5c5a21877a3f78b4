"""The ASGI application: routes, error rendering, request middleware, lifespan.

The hot routes (chat completions, embeddings, job submission) are plain Starlette routes in
the outer application: FastAPI's per-route machinery (dependency solving, its own middleware
stack) cost about a quarter of a cache hit's CPU. Everything else — models, health, metrics,
admin, the dashboard, and the OpenAPI description of every route, the hot ones included — is
served by the FastAPI application mounted beneath them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from headrace import __version__
from headrace.api import (
    admin,
    admin_keys,
    batches,
    chat,
    dashboard,
    embeddings,
    errors,
    feedback,
    jobs,
    models,
    ops,
    usage,
)
from headrace.api.middleware import RequestMiddleware
from headrace.wiring import Runtime


def create_app(rt: Runtime) -> Starlette:
    """Build the app around a runtime; the app starts and stops the runtime in its lifespan."""

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await rt.start()
        try:
            yield
        finally:
            await rt.stop()

    api = FastAPI(title="Headrace", version=__version__, summary="OpenAI-compatible AI gateway.")
    api.state.runtime = rt
    for module in (
        chat,
        embeddings,
        models,
        ops,
        admin,
        admin_keys,
        usage,
        feedback,
        jobs,
        batches,
        dashboard,
    ):
        api.include_router(module.router)
    errors.install(api)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings.embeddings, methods=["POST"]),
            Route("/v1/jobs", jobs.submit_job, methods=["POST"]),
            Mount("/", app=api),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = rt
    errors.install(app)
    app.add_middleware(
        RequestMiddleware,
        metrics=rt.metrics,
        max_body_bytes=rt.http_options.max_body_bytes,
        access_log=rt.http_options.access_log,
        tracing=rt.tracing,
    )
    return app
