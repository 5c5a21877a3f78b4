"""What a route needs from a request: the runtime, the call record, the caller, the JSON body."""

from __future__ import annotations

from typing import Any, cast

import orjson
from starlette.requests import Request

from headrace.errors import MalformedJsonError
from headrace.gateway.service import Call
from headrace.wiring import Runtime


def runtime(request: Request) -> Runtime:
    return cast("Runtime", request.app.state.runtime)


def call_of(request: Request) -> Call:
    return cast("Call", request.scope["state"]["call"])


async def authenticated_call(request: Request) -> Call:
    """The request's :class:`Call` with its principal set; raises 401 without a valid key."""
    call = call_of(request)
    call.principal = await runtime(request).authenticator.authenticate(
        request.headers.get("authorization")
    )
    return call


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJsonError(
            f"The request body is not valid JSON ({exc.msg} at byte {exc.pos}). "
            "Send a JSON object with Content-Type: application/json."
        ) from None
