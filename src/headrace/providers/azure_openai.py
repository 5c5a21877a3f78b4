"""Azure OpenAI: OpenAI's API behind deployment-based URLs and an ``api-key`` header.

Everything but the dialect is the OpenAI-compatible provider's (bodies, streaming, usage,
timeouts, error mapping, rate-limit hints); this subclass overrides its hooks:

=========================  ===================================================================
OpenAI path                Azure URL (``api-version`` from ``options["api_version"]``,
                           default ``2024-10-21``)
=========================  ===================================================================
``/chat/completions``      ``{base_url}/openai/deployments/{model}/chat/completions?api-version=…``
``/embeddings``            ``{base_url}/openai/deployments/{model}/embeddings?api-version=…``
``/models`` (``check()``)  ``{base_url}/openai/models?api-version=…``
=========================  ===================================================================

``deployment.model`` is the *Azure deployment name*; ``base_url`` is the resource endpoint
(``https://<resource>.openai.azure.com``; a trailing ``/openai`` is tolerated). The key is sent
as ``api-key: <key>``, never as a bearer token (Microsoft Entra ID tokens are not supported).
The body is OpenAI's, ``model`` included: Azure ignores it and routes by the URL.

Azure's own behaviour:

- 400 with ``error.code == "content_filter"`` (the prompt tripped the content filter) →
  :class:`~headrace.errors.UpstreamRejectedError` with code ``content_filter``; 400 with
  ``context_length_exceeded`` keeps that code.
- Streams open with a chunk that has empty ``choices`` and ``prompt_filter_results``, and may
  carry more such filter-only chunks; chunks with neither choices nor usage are skipped.
- ``prompt_filter_results``/``content_filter_results`` on answers and chunks pass through;
  a filtered completion arrives as OpenAI's ``finish_reason: "content_filter"``.
"""

from __future__ import annotations

from urllib.parse import quote

import orjson

from headrace.domain import ChatChunk, Deployment
from headrace.providers.openai_compatible import OpenAICompatibleProvider
from headrace.providers.registry import ProviderContext

DEFAULT_API_VERSION = "2024-10-21"
_PASSED_CODES = frozenset({"content_filter", "context_length_exceeded"})


class AzureOpenAIProvider(OpenAICompatibleProvider):
    """An Azure OpenAI deployment; ``deployment.model`` names the Azure deployment."""

    def __init__(self, deployment: Deployment, context: ProviderContext) -> None:
        self._api_version = str(deployment.options.get("api_version", DEFAULT_API_VERSION))
        super().__init__(deployment, context)
        self._base = self._base.removesuffix("/openai")

    def _auth_headers(self) -> dict[str, str]:
        key = self._deployment.api_key
        return {"api-key": key} if key else {}

    def _url(self, path: str) -> str:
        query = f"?api-version={quote(self._api_version, safe='')}"
        if path == "/models":
            return f"{self._base}/openai/models{query}"
        deployment = quote(self._deployment.model, safe="")
        return f"{self._base}/openai/deployments/{deployment}{path}{query}"

    def _rejection_code(self, raw: bytes) -> str | None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        return code if isinstance(code, str) and code in _PASSED_CODES else None

    def _parse_event(self, line: bytes) -> ChatChunk | object | None:
        chunk = super()._parse_event(line)
        if isinstance(chunk, ChatChunk) and not chunk.body.get("choices") and chunk.usage is None:
            return None  # prompt_filter_results and other filter-only chunks
        return chunk
