"""Anthropic's Messages API (``POST {base_url}/v1/messages``), spoken as OpenAI chat completions.

Translation both ways lives in :mod:`headrace.providers.anthropic_translate`; this module does
the HTTP: headers, timeouts, Anthropic's server-sent events and its errors.

Deployment options (``deployment.options``):

=====================  ==============  =====================================================
option                 default         meaning
=====================  ==============  =====================================================
``anthropic_version``  ``2023-06-01``  the ``anthropic-version`` header
``default_max_tokens`` ``4096``        ``max_tokens`` when the client sent none (Anthropic
                                       requires it)
=====================  ==============  =====================================================

``base_url`` defaults to ``https://api.anthropic.com``; the key goes in ``x-api-key``.

Errors (Anthropic's body is ``{"type": "error", "error": {"type", "message"}}``)::

    429 rate_limit_error                → UpstreamRateLimitedError (Retry-After passed on)
    529 overloaded_error, 503           → UpstreamUnavailableError
    400 "prompt is too long…"           → UpstreamRejectedError, code context_length_exceeded
    400, 404, 413, 422                  → UpstreamRejectedError
    401, 403                            → UpstreamStatusError (check the key's env variable)
    408, 504                            → UpstreamTimeoutError
    other                               → UpstreamStatusError
    ``error`` event mid-stream          → UpstreamStatusError
    stream ends before ``message_stop`` → UpstreamStatusError

Anthropic has no embeddings API: :meth:`AnthropicProvider.embed` raises InvalidRequestError.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping
from datetime import datetime
from typing import Any, NoReturn

import aiohttp
import orjson

from headrace.domain import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Deployment,
    EmbeddingRequest,
    EmbeddingResponse,
)
from headrace.errors import (
    InvalidRequestError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamRejectedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from headrace.observability.tracing import trace_headers
from headrace.providers.anthropic_translate import (
    StreamTranslator,
    chat_completion,
    messages_request,
)
from headrace.providers.hints import parse_rate_limit_hints
from headrace.providers.http import transport_error
from headrace.providers.registry import ProviderContext

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_QUOTAS = ("requests", "tokens", "input-tokens", "output-tokens")


def _exhausted_for_s(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds until a used-up quota resets, from ``anthropic-ratelimit-<quota>-remaining: 0``
    and ``-reset`` (an RFC 3339 time); ``None`` when no quota is used up."""
    waits: list[float] = []
    for quota in _QUOTAS:
        if headers.get(f"anthropic-ratelimit-{quota}-remaining") != "0":
            continue
        try:
            reset = datetime.fromisoformat(headers.get(f"anthropic-ratelimit-{quota}-reset", ""))
        except ValueError:
            continue
        if reset.tzinfo is not None:
            waits.append(max(0.0, reset.timestamp() - now))
    return max(waits) if waits else None


class _SseDecoder:
    """Server-sent events, line by line: returns an event's ``data`` when the event ends.

    ``event:`` lines are ignored because Anthropic repeats the event name as ``data.type``.
    """

    def __init__(self) -> None:
        self._data: list[bytes] = []

    def feed(self, line: bytes) -> bytes | None:
        line = line.rstrip(b"\r\n")
        if not line:
            return self.flush()
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        return None

    def flush(self) -> bytes | None:
        data, self._data = self._data, []
        return b"\n".join(data) if data else None


class AnthropicProvider:
    """An Anthropic deployment; ``deployment.model`` is the Claude model id."""

    def __init__(self, deployment: Deployment, context: ProviderContext) -> None:
        self._deployment = deployment
        self._http = context.http
        self._base = (deployment.base_url or DEFAULT_BASE_URL).rstrip("/")
        options = deployment.options
        self._headers = {
            "content-type": "application/json",
            "anthropic-version": str(options.get("anthropic_version", DEFAULT_VERSION)),
        }
        if deployment.api_key:
            self._headers["x-api-key"] = deployment.api_key
        self._default_max_tokens = int(options.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        if self._default_max_tokens < 1:
            raise ValueError(f"deployment {deployment.name!r}: default_max_tokens must be >= 1")
        t = deployment.timeouts
        self._timeout = aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s)

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    # -- errors ---------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        key = self._deployment.api_key
        return text.replace(key, "[redacted]") if key else text

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        raw = await response.read()
        name, status = self._deployment.name, response.status
        kind, detail = _error_of(raw)
        detail = self._redact(detail)
        retry_after = parse_rate_limit_hints(response.headers).retry_after_s
        message = f"Deployment {name!r} answered HTTP {status}" + (f" ({kind})" if kind else "")
        message += f": {detail}"
        if status == 429:
            headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
            raise UpstreamRateLimitedError(
                message + " Retry later.",
                deployment=name,
                upstream_status=status,
                retry_after_s=retry_after,
                headers=headers,
            )
        if status in (529, 503):
            raise UpstreamUnavailableError(
                message, deployment=name, upstream_status=status, retry_after_s=retry_after
            )
        if status in (400, 404, 413, 422):
            too_long = "prompt is too long" in detail.lower()
            raise UpstreamRejectedError(
                message,
                deployment=name,
                upstream_status=status,
                code="context_length_exceeded" if too_long else None,
            )
        if status in (401, 403):
            raise UpstreamStatusError(
                f"Deployment {name!r} refused Headrace's credentials (HTTP {status}); "
                "check the API key environment variable named in its config.",
                deployment=name,
                upstream_status=status,
            )
        if status in (408, 504):
            raise UpstreamTimeoutError(message, deployment=name, upstream_status=status)
        raise UpstreamStatusError(message, deployment=name, upstream_status=status)

    def _transport_error(self, exc: BaseException) -> NoReturn:
        raise transport_error(self._deployment, self._base, exc) from exc

    def _invalid(self, what: str) -> UpstreamStatusError:
        return UpstreamStatusError(
            f"Deployment {self._deployment.name!r} answered with {what}.",
            deployment=self._deployment.name,
        )

    def _decode(self, raw: bytes) -> dict[str, Any]:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise self._invalid("invalid JSON") from exc
        if not isinstance(parsed, dict):
            raise self._invalid("JSON that is not an object")
        return parsed

    # -- calls ----------------------------------------------------------------------------

    def _body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        return messages_request(
            request.body,
            model=self._deployment.model,
            default_max_tokens=self._default_max_tokens,
            stream=stream,
        )

    async def chat(self, request: ChatRequest) -> ChatResponse:
        body = self._body(request, stream=False)
        session = self._http.get()
        try:
            async with session.post(
                self._base + "/v1/messages",
                data=orjson.dumps(body),
                headers=trace_headers(self._headers),
                timeout=self._timeout,
            ) as response:
                await self._raise_for_status(response)
                raw = await response.read()
                exhausted = _exhausted_for_s(response.headers, time.time())
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._transport_error(exc)
        answer = self._decode(raw)
        if answer.get("type") != "message":
            raise self._invalid(f"a {answer.get('type')!r} object instead of a message")
        completion, usage = chat_completion(answer, created=int(time.time()))
        return ChatResponse(body=completion, usage=usage, exhausted_for_s=exhausted)

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        """Chunks as Anthropic's events arrive; the first must come within ``first_token_s``."""
        body = self._body(request, stream=True)
        translator = StreamTranslator(created=int(time.time()), model=self._deployment.model)
        decoder = _SseDecoder()
        first_token_s = self._deployment.timeouts.first_token_s
        session = self._http.get()
        try:
            async with session.post(
                self._base + "/v1/messages",
                data=orjson.dumps(body),
                headers=trace_headers(self._headers),
                timeout=self._timeout,
            ) as response:
                await self._raise_for_status(response)
                exhausted = _exhausted_for_s(response.headers, time.time())
                deadline: float | None = asyncio.get_running_loop().time() + first_token_s
                lines = response.content.__aiter__()
                while not translator.finished:
                    try:
                        async with asyncio.timeout_at(deadline):
                            line = await anext(lines, b"")
                    except TimeoutError:
                        raise UpstreamTimeoutError(
                            f"Deployment {self._deployment.name!r} sent no first token "
                            f"within {first_token_s:g} s.",
                            deployment=self._deployment.name,
                        ) from None
                    data = decoder.feed(line) if line else decoder.flush()
                    if data is not None:
                        for chunk in translator.feed(self._event(data)):
                            deadline = None
                            if exhausted is None:
                                yield chunk
                            else:
                                yield ChatChunk(chunk.body, chunk.usage, exhausted)
                                exhausted = None
                    if not line:
                        break
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._transport_error(exc)
        if not translator.finished:
            raise UpstreamStatusError(
                f"Deployment {self._deployment.name!r} ended the stream before message_stop.",
                deployment=self._deployment.name,
            )

    def _event(self, data: bytes) -> dict[str, Any]:
        event = self._decode(data)
        if event.get("type") == "error":
            kind, detail = _error_of(data)
            raise UpstreamStatusError(
                f"Deployment {self._deployment.name!r} failed mid-stream ({kind}): "
                f"{self._redact(detail)}",
                deployment=self._deployment.name,
            )
        return event

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        raise InvalidRequestError(
            f"Deployment {self._deployment.name!r} is an Anthropic deployment and Anthropic has "
            "no embeddings API; send embeddings to a model with an embeddings deployment.",
            param="model",
        )

    async def check(self) -> None:
        """Ready when ``GET {base_url}/v1/models`` answers below 500 (any auth outcome is fine)."""
        session = self._http.get()
        try:
            async with session.get(
                self._base + "/v1/models",
                headers=trace_headers(self._headers),
                timeout=aiohttp.ClientTimeout(total=min(5.0, self._deployment.timeouts.total_s)),
            ) as response:
                if response.status >= 500:
                    raise UpstreamUnavailableError(
                        f"Deployment {self._deployment.name!r} answered HTTP {response.status}.",
                        deployment=self._deployment.name,
                    )
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._transport_error(exc)

    async def aclose(self) -> None:
        """Sessions belong to the shared pool, closed by wiring."""


def _error_of(raw: bytes) -> tuple[str, str]:
    """``(error.type, error.message)`` of an Anthropic error body, or ``("", excerpt)``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "", raw[:200].decode("utf-8", "replace").strip() or "no body"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error.get("type") or ""), str(error["message"])
    return "", raw[:200].decode("utf-8", "replace").strip() or "no body"
