"""A deterministic in-process provider: the test fake and a zero-dependency demo upstream.

It answers with the last user message, optionally prefixed (``options.prefix``), and counts
tokens as whitespace-separated words. ``options.delay_s`` adds latency.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from headrace.domain import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Deployment,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
)
from headrace.providers.registry import ProviderContext


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def _words(text: str) -> int:
    return len(text.split())


class EchoProvider:
    def __init__(self, deployment: Deployment, context: ProviderContext) -> None:
        self._deployment = deployment
        self._prefix = str(deployment.options.get("prefix", ""))
        self._delay_s = float(deployment.options.get("delay_s", 0.0))
        self.calls = 0

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    def _answer(self, request: ChatRequest) -> tuple[str, Usage]:
        last_user = next((m for m in reversed(request.messages) if m.get("role") == "user"), None)
        text = self._prefix + (_text_of(last_user.get("content")) if last_user else "")
        prompt = sum(_words(_text_of(m.get("content"))) for m in request.messages)
        return text, Usage(prompt_tokens=prompt, completion_tokens=_words(text))

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.calls += 1
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        text, usage = self._answer(request)
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._deployment.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage.to_openai(),
        }
        return ChatResponse(body=body, usage=usage)

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        self.calls += 1
        text, usage = self._answer(request)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._deployment.model,
        }
        yield ChatChunk(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
        for i, word in enumerate(text.split(" ")):
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            piece = word if i == 0 else " " + word
            yield ChatChunk(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                }
            )
        yield ChatChunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield ChatChunk({**base, "choices": [], "usage": usage.to_openai()}, usage=usage)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        self.calls += 1
        dims = request.dimensions or 8
        vectors = [
            [(b - 128) / 128.0 for b in hashlib.shake_128(text.encode()).digest(dims)]
            for text in request.inputs
        ]
        usage = Usage(prompt_tokens=sum(_words(t) for t in request.inputs))
        return EmbeddingResponse(vectors=vectors, usage=usage, model=self._deployment.model)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
