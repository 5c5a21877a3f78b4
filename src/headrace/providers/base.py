"""The provider seam: how the gateway talks to one deployment.

A provider instance is bound to one :class:`~headrace.domain.Deployment`. Implementations are
picked by the deployment's ``kind`` through :mod:`headrace.providers.registry` and imported
lazily, so optional dependencies (llama-cpp-python, say) load only when a deployment uses them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from headrace.domain import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Deployment,
    EmbeddingRequest,
    EmbeddingResponse,
)


class Provider(Protocol):
    """One deployment's upstream.

    Errors: raise :class:`headrace.errors.UpstreamError` subclasses naming the deployment for
    upstream failures (never including credentials), and
    :class:`headrace.errors.InvalidRequestError` for requests the deployment cannot serve.
    Cancellation: when the awaiting task is cancelled (a client went away), the upstream call
    must be abandoned promptly and its resources released.
    """

    @property
    def deployment(self) -> Deployment: ...

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """Answer a non-streamed chat request; ``usage`` must be filled in."""
        ...

    def stream_chat(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        """Yield chunks as the upstream produces them, never buffering the whole answer.

        The last chunk carries ``usage`` (a usage-only chunk with empty ``choices``),
        whether or not the client asked for it; the gateway drops it when the client did not.
        """
        ...

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """Return one vector per input, in order."""
        ...

    async def check(self) -> None:
        """Raise if the deployment cannot serve now (used by ``/health/ready``)."""
        ...

    async def aclose(self) -> None:
        """Release sockets, threads and models."""
        ...
