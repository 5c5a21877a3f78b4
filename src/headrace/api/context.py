"""What a route needs from a request: the runtime, the call record, the caller, the JSON body."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from starlette.requests import Request
from starlette.responses import Response

from headrace.domain import CacheControl, Call, Priority, RequestControls
from headrace.errors import InvalidRequestError, MalformedJsonError
from headrace.wiring import Runtime

PRIORITY_HEADER = "x-headrace-priority"
FALLBACKS_HEADER = "x-headrace-fallbacks"
_PRIORITY, _FALLBACKS = PRIORITY_HEADER.encode(), FALLBACKS_HEADER.encode()
_CONTROL_HEADERS = frozenset({_PRIORITY, _FALLBACKS})


def runtime(request: Request) -> Runtime:
    return cast("Runtime", request.app.state.runtime)


def call_of(request: Request) -> Call:
    return cast("Call", request.scope["state"]["call"])


def controls(request: Request, default_priority: str | None = None) -> RequestControls:
    """Read the gateway's request-control headers.

    ``X-Headrace-Priority: high|normal|low`` (default: the key's ``priority`` metadata, else
    normal); ``X-Headrace-Fallbacks: none`` disables the fallback chain (and the degraded
    answer), a comma-separated list of models narrows it.
    """
    # One pass over the raw headers (ASGI names are lowercase bytes): Starlette's
    # ``Headers.get`` scans and decodes them all for each name asked, and this runs on every
    # request. The first of a repeated control header counts, as ``Headers.get`` has it.
    found: dict[bytes, str] = {}
    hints: dict[str, str] = {}
    for name, value in request.scope["headers"]:
        if name.startswith(b"x-headrace-"):
            text = value.decode("latin-1")
            if name in _CONTROL_HEADERS:
                found.setdefault(name, text)
            else:
                hints[name.decode("latin-1")] = text
        elif name == b"cache-control":
            found.setdefault(name, value.decode("latin-1"))
    priority = Priority.NORMAL
    if default_priority is not None and default_priority in Priority._value2member_map_:
        priority = Priority(default_priority)
    raw = found.get(_PRIORITY)
    if raw:
        try:
            priority = Priority(raw.strip().lower())
        except ValueError:
            raise InvalidRequestError(
                f"X-Headrace-Priority must be high, normal or low, not {raw!r}.",
                param="X-Headrace-Priority",
            ) from None
    fallbacks: tuple[str, ...] | None = None
    raw = found.get(_FALLBACKS)
    if raw is not None:
        names = tuple(n.strip() for n in raw.split(",") if n.strip())
        fallbacks = () if names in ((), ("none",)) else names
    return RequestControls(
        priority=priority,
        fallbacks=fallbacks,
        cache=cache_control(found.get(b"cache-control")),
        hints=hints,
    )


def cache_control(value: str | None) -> CacheControl:
    """Parse the request directives Headrace honours; others are ignored, as HTTP says."""
    if not value:
        return CacheControl()
    no_cache = no_store = False
    max_age: float | None = None
    for directive in value.lower().split(","):
        name, _, argument = directive.strip().partition("=")
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age":
            try:
                max_age = max(0.0, float(argument.strip().strip('"')))
            except ValueError:
                raise InvalidRequestError(
                    f"Cache-Control max-age must be a number of seconds, not {argument!r}.",
                    param="Cache-Control",
                ) from None
    return CacheControl(no_cache=no_cache, no_store=no_store, max_age_s=max_age)


async def authenticated_call(request: Request) -> Call:
    """The request's :class:`Call` with its principal and controls set; 401 without a key."""
    call = call_of(request)
    call.principal = await runtime(request).authenticator.authenticate(
        request.headers.get("authorization")
    )
    call.controls = controls(request, call.principal.metadata.get("priority"))
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


Endpoint = Callable[[Request], Awaitable[Response]]


def accounted(operation: str) -> Callable[[Endpoint], Endpoint]:
    """For the routes whose requests leave usage records: one record per request, whatever
    its outcome, for a request that fails before it reaches the gateway service too.

    An authenticated request whose body never arrived (499), is not JSON or has invalid
    fields (400), or whose headers are wrong is recorded under ``operation`` as the service
    records a refusal. A request that reached the service has its record already; one without
    a valid key has nobody to charge.
    """

    def decorate(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def accounted_endpoint(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Exception as exc:
                call = call_of(request)
                if call.principal is not None:
                    runtime(request).gateway.record_refusal(call, operation, exc)
                raise

        return accounted_endpoint

    return decorate
