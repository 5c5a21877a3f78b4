"""Any upstream that speaks OpenAI's HTTP API: OpenAI itself, vLLM, Ollama, llama.cpp's server.

The client's JSON body is forwarded as sent, with ``model`` replaced by the deployment's
upstream model name; fields Headrace does not know pass through untouched. Streams always ask
the upstream for usage (``stream_options.include_usage``) so that every stream can be billed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
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
    Usage,
)
from headrace.errors import (
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamRejectedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from headrace.observability.tracing import trace_headers
from headrace.providers.hints import exhausted_for_s, parse_rate_limit_hints
from headrace.providers.http import transport_error
from headrace.providers.registry import ProviderContext

_DATA = b"data:"
_DONE = b"[DONE]"


def _upstream_message(raw: bytes) -> str:
    """The ``error.message`` of an upstream error body, or a short excerpt of the body."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode("utf-8", "replace").strip() or "no body"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return raw[:200].decode("utf-8", "replace")


class OpenAICompatibleProvider:
    def __init__(self, deployment: Deployment, context: ProviderContext) -> None:
        if not deployment.base_url:
            raise ValueError(f"deployment {deployment.name!r} needs a base_url")
        self._deployment = deployment
        self._http = context.http
        self._base = deployment.base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json", **self._auth_headers()}
        t = deployment.timeouts
        self._timeout = aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s)
        self._stream_timeout = aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s)

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    # -- hooks for OpenAI dialects (Azure OpenAI) -----------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        """Credential headers: ``Authorization: Bearer <key>``, or none without a key."""
        if self._deployment.api_key:
            return {"Authorization": f"Bearer {self._deployment.api_key}"}
        return {}

    def _url(self, path: str) -> str:
        """The URL of an OpenAI API path (``/chat/completions``, ``/embeddings``, ``/models``)."""
        return self._base + path

    def _rejection_code(self, raw: bytes) -> str | None:
        """The error ``code`` for a rejected request (HTTP 400/404/413/422); ``None`` keeps
        :class:`UpstreamRejectedError`'s default."""
        return None

    # -- errors ---------------------------------------------------------------------------

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        raw = await response.read()
        name = self._deployment.name
        detail = _upstream_message(raw)
        status = response.status
        retry_after = parse_rate_limit_hints(response.headers).retry_after_s
        message = f"Deployment {name!r} answered HTTP {status}: {detail}"
        if status == 429:
            headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
            raise UpstreamRateLimitedError(
                message + " Retry later.",
                deployment=name,
                upstream_status=status,
                retry_after_s=retry_after,
                headers=headers,
            )
        if status in (400, 404, 413, 422):
            raise UpstreamRejectedError(
                message, deployment=name, upstream_status=status, code=self._rejection_code(raw)
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
        if status == 503:
            raise UpstreamUnavailableError(
                message, deployment=name, upstream_status=status, retry_after_s=retry_after
            )
        raise UpstreamStatusError(message, deployment=name, upstream_status=status)

    def _transport_error(self, exc: BaseException) -> NoReturn:
        raise transport_error(self._deployment, self._base, exc) from exc

    def _invalid_json(self, exc: BaseException) -> NoReturn:
        raise UpstreamStatusError(
            f"Deployment {self._deployment.name!r} answered with invalid JSON.",
            deployment=self._deployment.name,
        ) from exc

    # -- calls ----------------------------------------------------------------------------

    async def _post_json(
        self, path: str, body: Mapping[str, Any]
    ) -> tuple[dict[str, Any], float | None]:
        """The upstream's JSON object and how long its rate limit is exhausted, if it is."""
        session = self._http.get()
        try:
            async with session.post(
                self._url(path),
                data=orjson.dumps(body),
                headers=trace_headers(self._headers),
                timeout=self._timeout,
            ) as response:
                await self._raise_for_status(response)
                raw = await response.read()
                exhausted = exhausted_for_s(response.headers)
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._transport_error(exc)
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self._invalid_json(exc)
        if not isinstance(parsed, dict):
            self._invalid_json(TypeError("not an object"))
        return parsed, exhausted

    async def chat(self, request: ChatRequest) -> ChatResponse:
        body = {**request.body, "model": self._deployment.model}
        answer, exhausted = await self._post_json("/chat/completions", body)
        usage = Usage.from_openai(answer.get("usage")) or Usage()
        return ChatResponse(body=answer, usage=usage, exhausted_for_s=exhausted)

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        options = request.body.get("stream_options")
        stream_options = dict(options) if isinstance(options, Mapping) else {}
        stream_options["include_usage"] = True
        body = {
            **request.body,
            "model": self._deployment.model,
            "stream": True,
            "stream_options": stream_options,
        }
        session = self._http.get()
        done = False
        try:
            async with session.post(
                self._url("/chat/completions"),
                data=orjson.dumps(body),
                headers=trace_headers(self._headers),
                timeout=self._stream_timeout,
            ) as response:
                await self._raise_for_status(response)
                exhausted = exhausted_for_s(response.headers)
                first_token_s = self._deployment.timeouts.first_token_s
                lines = response.content.__aiter__()
                async with asyncio.timeout(first_token_s):
                    first = await anext(lines, b"")
                line: bytes = first
                while line:
                    chunk = self._parse_event(line)
                    if chunk is _END:
                        done = True
                        break
                    if isinstance(chunk, ChatChunk):
                        if exhausted is not None:
                            chunk = ChatChunk(chunk.body, chunk.usage, exhausted_for_s=exhausted)
                            exhausted = None
                        yield chunk
                    line = await anext(lines, b"")
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._transport_error(exc)
        if not done:
            raise UpstreamStatusError(
                f"Deployment {self._deployment.name!r} ended the stream before [DONE].",
                deployment=self._deployment.name,
            )

    def _parse_event(self, line: bytes) -> ChatChunk | object | None:
        """One SSE line → a chunk, ``None`` (comments, blank lines, other fields) or _END."""
        if not line.startswith(_DATA):
            return None
        payload = line[len(_DATA) :].strip()
        if payload == _DONE:
            return _END
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            self._invalid_json(exc)
        if not isinstance(data, dict):
            self._invalid_json(TypeError("not an object"))
        if "error" in data and "choices" not in data:
            raise UpstreamStatusError(
                f"Deployment {self._deployment.name!r} failed mid-stream: "
                f"{_upstream_message(payload)}",
                deployment=self._deployment.name,
            )
        usage = Usage.from_openai(data.get("usage")) if data.get("usage") else None
        return ChatChunk(body=data, usage=usage)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        body = {
            **request.body,
            "model": self._deployment.model,
            "input": list(request.inputs),
            "encoding_format": "float",
        }
        answer, exhausted = await self._post_json("/embeddings", body)
        try:
            rows = sorted(answer["data"], key=lambda row: row["index"])
            vectors = [row["embedding"] for row in rows]
        except (KeyError, TypeError) as exc:
            self._invalid_json(exc)
        usage = Usage.from_openai(answer.get("usage")) or Usage()
        return EmbeddingResponse(
            vectors=vectors, usage=usage, model=self._deployment.model, exhausted_for_s=exhausted
        )

    async def check(self) -> None:
        """Ready when ``GET {base_url}/models`` answers below 500 (any auth outcome is fine)."""
        session = self._http.get()
        try:
            async with session.get(
                self._url("/models"),
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


_END = object()
