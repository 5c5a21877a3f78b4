"""The ASGI application: routes, error rendering, request middleware, lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from headrace import __version__
from headrace.api import admin, chat, embeddings, errors, models, ops
from headrace.api.middleware import RequestMiddleware
from headrace.wiring import Runtime


def create_app(rt: Runtime) -> FastAPI:
    """Build the app around a runtime; the app starts and stops the runtime in its lifespan."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await rt.start()
        try:
            yield
        finally:
            await rt.stop()

    app = FastAPI(
        title="Headrace",
        version=__version__,
        summary="OpenAI-compatible AI gateway.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    for module in (chat, embeddings, models, ops, admin):
        app.include_router(module.router)
    errors.install(app)
    app.add_middleware(
        RequestMiddleware,
        metrics=rt.metrics,
        max_body_bytes=rt.http_options.max_body_bytes,
        access_log=rt.http_options.access_log,
    )
    return app
