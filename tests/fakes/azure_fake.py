"""A fake Azure OpenAI resource: deployment-based URLs, ``api-key`` auth, filter annotations.

Routes, as Azure's data-plane API has them::

    POST /openai/deployments/{deployment}/chat/completions?api-version=…
    POST /openai/deployments/{deployment}/embeddings?api-version=…
    GET  /openai/models?api-version=…

It requires ``api-key`` (401 with Azure's message otherwise; a bearer token is not enough),
``api-version`` (404 "Resource not found" without it) and a known deployment (404
``DeploymentNotFound``), then serves the fixture of its current :attr:`AzureFake.scenario`.
Streams open with Azure's ``prompt_filter_results`` chunk (empty ``choices``) and carry the
usage chunk only when the body asks for it (``stream_options.include_usage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import load_json, send_sse, sse_events

PROVIDER = "azure"


@dataclass(frozen=True)
class Scenario:
    json: str
    sse: str | None = None
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


SCENARIOS = {
    "text": Scenario(json="chat_completion.json", sse="stream_text.sse"),
    "tool_calls": Scenario(json="chat_tool_calls.json", sse="stream_tool_calls.sse"),
    "rate_limited": Scenario(
        json="error_rate_limit.json",
        status=429,
        headers=(("Retry-After", "7"), ("x-ratelimit-remaining-requests", "0")),
    ),
    "content_filter": Scenario(json="error_content_filter.json", status=400),
    "context_length": Scenario(json="error_context_length.json", status=400),
}


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


class AzureFake:
    def __init__(
        self, *, api_key: str = "azure-test-key-0123456789", deployment: str = "gpt-4o-prod"
    ) -> None:
        self.api_key = api_key
        self.deployment = deployment
        self.url = ""
        """Where the fake listens, once served (set by the test)."""
        self.scenario = "text"
        self.last_body: dict[str, Any] | None = None
        self.last_query: dict[str, str] = {}
        self.last_headers: dict[str, str] = {}
        self.last_path = ""

    def app(self) -> web.Application:
        app = web.Application()
        prefix = "/openai/deployments/{deployment}"
        app.router.add_post(prefix + "/chat/completions", self._chat)
        app.router.add_post(prefix + "/embeddings", self._embeddings)
        app.router.add_get("/openai/models", self._models)
        return app

    def _check(self, request: web.Request) -> web.Response | None:
        self.last_query = dict(request.query)
        self.last_headers = dict(request.headers)
        self.last_path = request.path
        if request.headers.get("api-key") != self.api_key:
            return _json(load_json(PROVIDER, "error_unauthorized.json"), 401)
        if "api-version" not in request.query:
            return _json(load_json(PROVIDER, "error_resource_not_found.json"), 404)
        deployment = request.match_info.get("deployment")
        if deployment is not None and deployment != self.deployment:
            return _json(load_json(PROVIDER, "error_deployment_not_found.json"), 404)
        return None

    async def _body(self, request: web.Request, required: str) -> dict[str, Any] | web.Response:
        body = orjson.loads(await request.read())
        self.last_body = body
        if required not in body:
            error = {
                "message": f"'{required}' is a required property",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
            return _json({"error": error}, 400)
        return body

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        problem = self._check(request)
        if problem is not None:
            return problem
        body = await self._body(request, "messages")
        if isinstance(body, web.Response):
            return body
        scenario = SCENARIOS[self.scenario]
        if scenario.status == 200 and body.get("stream") and scenario.sse:
            include_usage = (body.get("stream_options") or {}).get("include_usage") is True
            events = [
                event
                for event in sse_events(PROVIDER, scenario.sse)
                if include_usage or b'"usage"' not in event
            ]
            return await send_sse(request, events)
        payload = load_json(PROVIDER, scenario.json)
        return _json(payload, scenario.status, dict(scenario.headers))

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        problem = self._check(request)
        if problem is not None:
            return problem
        body = await self._body(request, "input")
        if isinstance(body, web.Response):
            return body
        return _json(load_json(PROVIDER, "embeddings.json"))

    async def _models(self, request: web.Request) -> web.Response:
        problem = self._check(request)
        if problem is not None:
            return problem
        return _json({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})
