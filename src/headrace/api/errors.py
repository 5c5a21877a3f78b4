"""One place renders every error in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import orjson
import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy import exc as sa_exc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import Response

from headrace.errors import (
    STORE_RETRY_AFTER_S,
    HeadraceError,
    InvalidRequestError,
    NotFoundError,
    StoreUnavailableError,
)

log = structlog.get_logger("headrace.api")


def error_response(error: HeadraceError, status: int | None = None) -> Response:
    return Response(
        orjson.dumps(error.to_openai()),
        status_code=status or error.status,
        headers=error.headers,
        media_type="application/json",
    )


async def _headrace_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HeadraceError)
    return error_response(exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(
            NotFoundError(
                f"Unknown path {request.method} {request.url.path}. See /docs for the routes."
            )
        )
    error = InvalidRequestError(str(exc.detail), code=f"http_{exc.status_code}")
    return error_response(error, status=exc.status_code)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    return error_response(
        InvalidRequestError(f"Invalid value for '{param}': {first['msg']}.", param=param)
    )


def _request_id(request: Request) -> str:
    call = request.scope.get("state", {}).get("call")
    return str(getattr(call, "request_id", "unknown"))


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    """A database error on a request's path (PostgreSQL down or restarting, SQLite locked):
    503 with ``Retry-After``, logged as a warning, not an internal error."""
    request_id = _request_id(request)
    cause = getattr(exc, "orig", None) or exc
    log.warning("store_unavailable", request_id=request_id, error=repr(cause))
    return error_response(
        StoreUnavailableError(
            f"The database is unavailable ({type(cause).__name__}); nothing was done. Retry "
            f"shortly (request id {request_id}).",
            headers={"Retry-After": STORE_RETRY_AFTER_S},
        )
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    request_id = _request_id(request)
    log.error("unhandled_error", request_id=request_id, exc_info=exc)
    return error_response(
        HeadraceError(
            f"Headrace hit an internal error (request id {request_id}); the logs have the details."
        )
    )


def install(app: Starlette) -> None:
    app.add_exception_handler(HeadraceError, _headrace_error)
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Connection loss, refused connections, server shutdown, lock and statement timeouts.
    for store_error in (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError):
        app.add_exception_handler(store_error, _store_unavailable)
    app.add_exception_handler(Exception, _unexpected)
