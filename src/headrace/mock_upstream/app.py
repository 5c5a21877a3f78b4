"""The mock upstream's aiohttp application: OpenAI's API plus ``/_mock`` control routes.

Routes::

    POST /v1/chat/completions   JSON, or SSE with "stream": true     (faults apply)
    POST /v1/embeddings         deterministic unit vectors           (faults apply)
    GET  /v1/models[/{model}]   the configured model ids
    GET  /health                200 {"status": "ok"}
    GET  /_mock/stats           counts since start or the last reset
    POST /_mock/reset           zero the counts
    GET  /_mock/faults          the fault config, in the CLI's field names
    PUT  /_mock/faults          replace it (fields left out take their defaults)
    PATCH /_mock/faults         change only the fields given

Per request, ``X-Mock-Fault: 429|500|...|hang|cut|malformed|none`` forces a fault and
``X-Mock-Latency-Ms: N`` forces the latency. The order of events for a faulted endpoint:
read and check the body (a bad one is a 400 and draws nothing), decide, wait the latency,
then answer with the fault. Control routes and ``/health`` never need the API key.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from headrace.mock_upstream.answers import (
    MALFORMED_EVENT,
    ChatAnswer,
    error_body,
    model_body,
    models_body,
    read_chat,
    read_embeddings,
)
from headrace.mock_upstream.faults import (
    Decision,
    FaultConfig,
    FaultKind,
    decide,
    parse_fault_header,
)

__all__ = ["MOCK_UPSTREAM", "MockStats", "MockUpstream", "ServerOptions", "build_app", "serve"]

_JSON = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_HANG_POLL_S = 0.05
_MAX_BODY_BYTES = 64 * 1024 * 1024

# Known statuses get OpenAI's own wording; others a generic message built in _injected_error.
_INJECTED: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request (injected by mock-upstream).", "invalid_request_error", None),
    401: (
        "Incorrect API key provided (injected by mock-upstream).",
        "invalid_request_error",
        "invalid_api_key",
    ),
    404: ("The model does not exist (injected by mock-upstream).", "invalid_request_error", None),
    429: (
        "Rate limit reached for requests (injected by mock-upstream). Retry after Retry-After.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request (injected by mock-upstream).",
        "server_error",
        None,
    ),
    503: (
        "The engine is currently overloaded, please try again later (injected by mock-upstream).",
        "server_error",
        None,
    ),
}


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What the mock answers, apart from faults.

    ``output_tokens``: words per chat answer before ``max_tokens`` cuts it.
    ``embedding_dimensions``: vector length when the request gives no ``dimensions``.
    ``require_key``: when set, ``/v1`` routes want ``Authorization: Bearer <key>``.
    ``models``: the ids ``GET /v1/models`` lists; chat and embeddings accept any model.
    """

    output_tokens: int = 16
    embedding_dimensions: int = 16
    require_key: str | None = None
    models: tuple[str, ...] = ("mock-model", "mock-embedding")

    def __post_init__(self) -> None:
        if self.output_tokens < 0:
            raise ValueError(f"output_tokens is {self.output_tokens}; give 0 or more")
        if self.embedding_dimensions < 1:
            raise ValueError(f"embedding_dimensions is {self.embedding_dimensions}; give 1+")


@dataclass(slots=True)
class MockStats:
    """Request counts since start or the last reset; ``in_flight`` is a gauge, never reset.

    ``endpoints`` counts every ``/v1`` request by path, whatever its outcome; ``faults``
    counts injected faults by status (``"429"``) or kind (``"hang"``); ``rejected``
    counts 400s for bad bodies and 401s for a wrong key; ``client_disconnects`` counts
    streams the client abandoned before the end (how tests see a gateway cancel upstream);
    ``last_chat_body`` is the last chat request exactly as received (pass-through checks).
    """

    endpoints: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    streams: int = 0
    rejected: int = 0
    client_disconnects: int = 0
    in_flight: int = 0
    last_chat_body: bytes = b""

    def snapshot(self) -> dict[str, object]:
        """The JSON document ``GET /_mock/stats`` returns."""
        return {
            "total": sum(self.endpoints.values()),
            "endpoints": dict(self.endpoints),
            "streams": self.streams,
            "faults": dict(self.faults),
            "rejected": self.rejected,
            "client_disconnects": self.client_disconnects,
            "in_flight": self.in_flight,
            "last_chat_body": self.last_chat_body.decode("utf-8", "replace"),
        }

    def reset(self) -> None:
        self.endpoints.clear()
        self.faults.clear()
        self.streams = 0
        self.rejected = 0
        self.client_disconnects = 0


class MockUpstream:
    """The serving object behind the routes; one per application, state lives here.

    ``faults`` may be replaced at any time (it is what ``PUT /_mock/faults`` does);
    requests already past their decision keep the config they were decided under,
    except that streams read ``ttft_ms``/``inter_chunk_ms`` when they start sending.
    """

    def __init__(self, faults: FaultConfig, options: ServerOptions, rng: random.Random) -> None:
        self.faults = faults
        self.options = options
        self.stats = MockStats()
        self._rng = rng
        self._ids = itertools.count(1)
        self._authorization = f"Bearer {options.require_key}" if options.require_key else None

    # --- OpenAI routes ---------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.stats.endpoints["/v1/chat/completions"] += 1
        if (denied := self._deny(request)) is not None:
            return denied
        self.stats.in_flight += 1
        try:
            try:
                raw = await request.read()
                self.stats.last_chat_body = raw
                answer = read_chat(orjson.loads(raw), self.options.output_tokens)
                decision = self._decide(request)
            except ValueError as exc:
                return self._invalid(exc)
            if answer.stream:
                self.stats.streams += 1
            if (early := await self._before_headers(request, decision)) is not None:
                return early
            completion_id = f"chatcmpl-mock{next(self._ids)}"
            if answer.stream:
                return await self._stream(request, answer, decision, completion_id)
            body = answer.completion_body(completion_id, int(time.time()))
            return await self._json(request, body, decision)
        finally:
            self.stats.in_flight -= 1

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        self.stats.endpoints["/v1/embeddings"] += 1
        if (denied := self._deny(request)) is not None:
            return denied
        self.stats.in_flight += 1
        try:
            try:
                answer = read_embeddings(
                    orjson.loads(await request.read()), self.options.embedding_dimensions
                )
                decision = self._decide(request)
            except ValueError as exc:
                return self._invalid(exc)
            if (early := await self._before_headers(request, decision)) is not None:
                return early
            return await self._json(request, answer.body(), decision)
        finally:
            self.stats.in_flight -= 1

    async def models(self, request: web.Request) -> web.StreamResponse:
        self.stats.endpoints["/v1/models"] += 1
        if (denied := self._deny(request)) is not None:
            return denied
        return web.Response(body=models_body(self.options.models), headers=_JSON)

    async def model(self, request: web.Request) -> web.StreamResponse:
        self.stats.endpoints["/v1/models/{model}"] += 1
        if (denied := self._deny(request)) is not None:
            return denied
        return web.Response(body=model_body(request.match_info["model"]), headers=_JSON)

    # --- control routes --------------------------------------------------------------

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=b'{"status":"ok"}', headers=_JSON)

    async def get_stats(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.stats.snapshot()), headers=_JSON)

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self.stats.reset()
        return web.Response(body=orjson.dumps(self.stats.snapshot()), headers=_JSON)

    async def get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.faults.to_json()), headers=_JSON)

    async def put_faults(self, request: web.Request) -> web.StreamResponse:
        base = self.faults if request.method == "PATCH" else None
        try:
            data = orjson.loads(await request.read())
            if not isinstance(data, dict):
                raise ValueError("send a JSON object of fault settings, e.g. {'error_rate': 0.1}")
            self.faults = FaultConfig.from_json(data, base=base)
        except ValueError as exc:
            return _error(400, str(exc), "invalid_request_error", "invalid_value")
        return web.Response(body=orjson.dumps(self.faults.to_json()), headers=_JSON)

    # --- the steps of a faulted answer -----------------------------------------------

    def _deny(self, request: web.Request) -> web.Response | None:
        expected = self._authorization
        if expected is None or request.headers.get("Authorization") == expected:
            return None
        self.stats.rejected += 1
        return _error(
            401,
            "Incorrect API key provided. Send 'Authorization: Bearer KEY' with the key "
            "mock-upstream was started with (--require-key).",
            "invalid_request_error",
            "invalid_api_key",
        )

    def _invalid(self, exc: ValueError) -> web.Response:
        self.stats.rejected += 1
        if isinstance(exc, orjson.JSONDecodeError):
            message = f"The request body is not valid JSON ({exc}); send a JSON object."
        else:
            message = str(exc)
        return _error(400, message, "invalid_request_error", "invalid_value")

    def _decide(self, request: web.Request) -> Decision:
        """Decide under the current config and the override headers; count the fault.

        Raises ``ValueError`` for an unreadable ``X-Mock-Fault``/``X-Mock-Latency-Ms``.
        """
        headers = request.headers
        fault_header = headers.get("X-Mock-Fault")
        latency_header = headers.get("X-Mock-Latency-Ms")
        forced = parse_fault_header(fault_header) if fault_header else None
        forced_latency = _parse_latency(latency_header) if latency_header else None
        decision = decide(self.faults, self._rng, forced=forced, forced_latency_ms=forced_latency)
        if decision.fault is FaultKind.ERROR:
            self.stats.faults[str(decision.status)] += 1
        elif decision.fault is not FaultKind.NONE:
            self.stats.faults[decision.fault.value] += 1
        return decision

    async def _before_headers(
        self, request: web.Request, decision: Decision
    ) -> web.StreamResponse | None:
        """Wait the latency; answer an error or hang now, or return ``None`` to go on."""
        if decision.latency_s > 0:
            await asyncio.sleep(decision.latency_s)
        if decision.fault is FaultKind.ERROR:
            return self._injected_error(decision.status)
        if decision.fault is FaultKind.HANG:
            return await _hang(request)
        return None

    def _injected_error(self, status: int) -> web.Response:
        default_type = "invalid_request_error" if status < 500 else "server_error"
        message, type_, code = _INJECTED.get(
            status,
            (
                f"mock-upstream injected HTTP {status}; drop the X-Mock-Fault header or "
                "lower error_rate with PUT /_mock/faults to stop it.",
                default_type,
                None,
            ),
        )
        headers: dict[str, str] = {}
        if status == 429:
            retry_after_s = self.faults.retry_after_s
            headers["Retry-After"] = f"{retry_after_s:g}"
            headers["retry-after-ms"] = str(round(retry_after_s * 1000))
        return _error(status, message, type_, code, headers)

    async def _json(
        self, request: web.Request, body: bytes, decision: Decision
    ) -> web.StreamResponse:
        if decision.fault is FaultKind.MALFORMED:
            return web.Response(body=body[: len(body) // 2], headers=_JSON)
        if decision.fault is FaultKind.CUT:
            # Promise the whole body, send half, and drop the connection.
            response = web.StreamResponse(headers=_JSON)
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            _abort(request)
            return response
        return web.Response(body=body, headers=_JSON)

    async def _stream(
        self, request: web.Request, answer: ChatAnswer, decision: Decision, completion_id: str
    ) -> web.StreamResponse:
        writes, tail = answer.stream_parts(completion_id, int(time.time()))
        cut = decision.fault is FaultKind.CUT
        if cut:
            writes = writes[: max(1, len(writes) // 2)]
        else:
            writes[-1] += tail
        if decision.fault is FaultKind.MALFORMED:
            writes[0] += MALFORMED_EVENT
        ttft_s = self.faults.ttft_ms / 1000.0
        inter_s = self.faults.inter_chunk_ms / 1000.0
        response = web.StreamResponse(headers=_SSE)
        await response.prepare(request)
        try:
            if ttft_s == 0 and inter_s == 0:
                await response.write(b"".join(writes))
            else:
                for index, chunk in enumerate(writes):
                    delay = ttft_s if index == 0 else inter_s
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await response.write(chunk)
            if cut:
                _abort(request)
            else:
                await response.write_eof()
        except ConnectionResetError:
            # The client went away mid-stream; nothing is left to tell it.
            self.stats.client_disconnects += 1
        return response


MOCK_UPSTREAM = web.AppKey("mock_upstream", MockUpstream)
"""Where :func:`build_app` keeps the :class:`MockUpstream`, for tests that poke its state."""


def build_app(
    faults: FaultConfig | None = None,
    *,
    seed: int | None = None,
    options: ServerOptions | None = None,
) -> web.Application:
    """The mock upstream as an aiohttp application.

    ``seed`` seeds the generator behind every fault decision (``None``: unpredictable).
    The :class:`MockUpstream` is at ``app[MOCK_UPSTREAM]``.
    """
    rng = random.Random(seed)  # noqa: S311 - it picks faults, not secrets
    mock = MockUpstream(faults or FaultConfig(), options or ServerOptions(), rng)
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app[MOCK_UPSTREAM] = mock
    router = app.router
    router.add_post("/v1/chat/completions", mock.chat_completions)
    router.add_post("/v1/embeddings", mock.embeddings)
    router.add_get("/v1/models", mock.models)
    router.add_get("/v1/models/{model:.+}", mock.model)
    router.add_get("/health", mock.health)
    router.add_get("/_mock/stats", mock.get_stats)
    router.add_post("/_mock/reset", mock.reset)
    router.add_get("/_mock/faults", mock.get_faults)
    router.add_put("/_mock/faults", mock.put_faults)
    router.add_patch("/_mock/faults", mock.put_faults)
    return app


@asynccontextmanager
async def serve(
    app: web.Application, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop for the ``async with`` block; yield its base URL.

    ``port=0`` takes a free port. The URL has no path: the OpenAI base URL is ``url +
    "/v1"``. On exit, requests still running get one second before their connections close.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        yield f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()


async def _hang(request: web.Request) -> web.StreamResponse:
    """Answer nothing until the client closes the connection (or the server stops)."""
    # ASYNC110: polling, because aiohttp gives handlers no event for a lost connection.
    while _connected(request):  # noqa: ASYNC110
        await asyncio.sleep(_HANG_POLL_S)
    return web.Response(status=499)  # nobody is left to read it


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _parse_latency(value: str) -> float:
    try:
        latency_ms = float(value)
    except ValueError:
        latency_ms = -1.0
    if not (latency_ms >= 0 and math.isfinite(latency_ms)):
        raise ValueError(f"X-Mock-Latency-Ms {value!r} is not a number of milliseconds >= 0")
    return latency_ms


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(message, type_, code),
        headers={**_JSON, **headers} if headers else _JSON,
    )
