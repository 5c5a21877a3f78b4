"""A fake Anthropic Messages API (``POST /v1/messages``, ``GET /v1/models``).

It checks what the real API requires and answers in its shapes:

- ``x-api-key`` must equal the fake's key (401 ``authentication_error`` otherwise) and
  ``anthropic-version`` must be present (400 ``invalid_request_error``);
- the body must carry ``model``, ``max_tokens`` and ``messages``, no unknown fields, only
  ``user``/``assistant`` roles, and every ``tool_use`` must be answered by ``tool_result``
  blocks in the next (user) message (400 ``invalid_request_error``, Anthropic's wording);
- then it serves the fixture of its current :attr:`AnthropicFake.scenario`, as JSON or, when
  the body says ``"stream": true``, as the scenario's SSE transcript.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import load_json, send_sse, sse_events

PROVIDER = "anthropic"
FIELDS = {
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
}  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """What the fake answers: a status and body (JSON) or an SSE transcript (streams)."""

    json: str | None = None
    sse: str | None = None
    status: int = 200


def _reset_in(seconds: int) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="seconds")


SCENARIOS = {
    "text": Scenario(json="message_text.json", sse="stream_text.sse"),
    "tool_use": Scenario(json="message_tool_use.json", sse="stream_tool_use.sse"),
    "stream_error": Scenario(json="message_text.json", sse="stream_error.sse"),
    "stream_truncated": Scenario(json="message_text.json", sse="stream_truncated.sse"),
    "rate_limited": Scenario(json="error_rate_limit.json", status=429),
    "overloaded": Scenario(json="error_overloaded.json", status=529),
    "prompt_too_long": Scenario(json="error_prompt_too_long.json", status=400),
    "server_error": Scenario(json="error_api.json", status=500),
}


def error(status: int, kind: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, dumps=lambda b: orjson.dumps(b).decode())


class AnthropicFake:
    def __init__(self, *, api_key: str = "sk-ant-test-0123456789") -> None:
        self.api_key = api_key
        self.url = ""
        """Where the fake listens, once served (set by the test)."""
        self.scenario = "text"
        self.quota_exhausted = False
        """Answer with ``anthropic-ratelimit-requests-remaining: 0`` (reset in 30 s)."""
        self.stream_delay_s = 0.0
        """Wait this long after the stream's headers before its first event."""
        self.last_body: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}
        self.requests = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._models)
        return app

    def _rate_limit_headers(self, status: int) -> dict[str, str]:
        exhausted = status == 429 or self.quota_exhausted
        headers = {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0" if exhausted else "49",
            "anthropic-ratelimit-requests-reset": _reset_in(7 if status == 429 else 30),
            "request-id": "req_011CSHoEeqs5C35K2UUqR7Fy",
        }
        if status == 429:
            headers["retry-after"] = "7"
        return headers

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.last_headers = dict(request.headers)
        problem = self._check_headers(request, json_body=True)
        if problem is not None:
            return problem
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return error(400, "invalid_request_error", "There was an issue with your request body")
        if not isinstance(body, dict):
            return error(400, "invalid_request_error", "body: Input should be an object")
        self.last_body = body
        problem = _check_body(body)
        if problem is not None:
            return error(400, "invalid_request_error", problem)
        scenario = SCENARIOS[self.scenario]
        headers = self._rate_limit_headers(scenario.status)
        if body.get("stream") and scenario.sse:
            events = sse_events(PROVIDER, scenario.sse)
            return await send_sse(request, events, headers, delay_s=self.stream_delay_s)
        payload = load_json(PROVIDER, scenario.json or "message_text.json")
        return web.Response(
            body=orjson.dumps(payload),
            status=scenario.status,
            content_type="application/json",
            headers=headers,
        )

    def _check_headers(self, request: web.Request, *, json_body: bool) -> web.Response | None:
        key = request.headers.get("x-api-key")
        if key is None:
            return error(401, "authentication_error", "x-api-key header is required")
        if key != self.api_key:
            return error(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in request.headers:
            return error(400, "invalid_request_error", "anthropic-version: header is required")
        if json_body and request.content_type != "application/json":
            return error(400, "invalid_request_error", "content-type must be application/json")
        return None

    async def _models(self, request: web.Request) -> web.Response:
        problem = self._check_headers(request, json_body=False)
        if problem is not None:
            return problem
        data = [{"type": "model", "id": "claude-sonnet-4-20250514", "display_name": "Sonnet 4"}]
        return web.json_response({"data": data, "has_more": False})


def _check_body(body: dict[str, Any]) -> str | None:
    """Anthropic's validation message for the first problem, or None."""
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            return f"{name}: Field required"
    for name in body:
        if name not in FIELDS:
            return f"{name}: Extra inputs are not permitted"
    if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    messages = body["messages"]
    for i, message in enumerate(messages):
        if message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if not isinstance(content, str | list):
            return f"messages.{i}.content: Field required"
        blocks = content if isinstance(content, list) else []
        uses = [b.get("id") for b in blocks if b.get("type") == "tool_use"]
        if not uses:
            continue
        following = messages[i + 1] if i + 1 < len(messages) else None
        answered = {
            b.get("tool_use_id")
            for b in (following or {}).get("content") or []
            if isinstance(b, dict) and b.get("type") == "tool_result"
        }
        if following is None or following.get("role") != "user" or set(uses) - answered:
            missing = ", ".join(sorted(set(uses) - answered))
            return (
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {missing}. Each `tool_use` block must have a "
                "corresponding `tool_result` block in the next message."
            )
    return None
