"""The semantic cache in the pipeline: reuse an answer to a question asked in other words.

Opt-in per model. On an exact-cache miss, the last user message is embedded with the model's
``embedding_model`` and looked up among earlier answers in the same scope; a match at or above
the threshold is served as a hit, with ``X-Headrace-Cache-Similarity``. The scope is the
tenant, the model, the embedding model, the answer kind (JSON or stream) and a hash of
everything else in the request — system prompt, earlier turns, sampling parameters — so only
the wording of the last question may differ.

The default threshold comes from a labelled set of paraphrases and hard negatives
(``tests/fixtures/paraphrases.jsonl``): with all-MiniLM-L6-v2 no threshold reached 0.95
precision on it except one so high that only near-verbatim repeats match
(:data:`headrace.cache.semantic.DEFAULT_THRESHOLD`). Lowering it trades wrong answers for
hits; the set measures the trade.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from headrace.cache.base import CacheUnavailableError
from headrace.cache.keys import cache_key
from headrace.cache.semantic import SemanticIndex
from headrace.domain import ChatRequest
from headrace.errors import HeadraceError

log = structlog.get_logger("headrace.cache")

Embed = Callable[[str, str], Awaitable[Sequence[float]]]  # (embedding model, text) -> vector


@dataclass(frozen=True, slots=True)
class SemanticPolicy:
    threshold: float
    embedding_model: str
    ttl_s: float


@dataclass(frozen=True, slots=True)
class Probe:
    """One request's place in the semantic index, and what it found there."""

    namespace: str
    vector: Sequence[float]
    ttl_s: float
    value: dict[str, Any] | None = None
    similarity: float | None = None


def _last_user_text(request: ChatRequest) -> tuple[int, str] | None:
    for index in range(len(request.messages) - 1, -1, -1):
        message = request.messages[index]
        if message.get("role") == "user":
            content = message.get("content")
            return (index, content) if isinstance(content, str) and content.strip() else None
    return None


class SemanticCache:
    def __init__(
        self, index: SemanticIndex, policies: Mapping[str, SemanticPolicy], embed: Embed
    ) -> None:
        self._index = index
        self._policies = policies
        self._embed = embed

    @property
    def index(self) -> SemanticIndex:
        return self._index

    def _scope(
        self, tenant: str, kind: str, request: ChatRequest, policy: SemanticPolicy, at: int
    ) -> str:
        messages = [dict(m) for m in request.messages]
        messages[at] = {**messages[at], "content": ""}
        context = cache_key(tenant, kind, request.model, {**request.body, "messages": messages})
        digest = hashlib.sha256(context.encode()).hexdigest()[:32]
        return f"{tenant}/{request.model}/{policy.embedding_model}/{kind}/{digest}"

    async def probe(self, tenant: str, kind: str, request: ChatRequest) -> Probe | None:
        """Look the request up; None when semantic caching does not apply or cannot run."""
        policy = self._policies.get(request.model)
        found = _last_user_text(request)
        if policy is None or found is None:
            return None
        at, text = found
        namespace = self._scope(tenant, kind, request, policy, at)
        try:
            vector = await self._embed(policy.embedding_model, text)
            hit = await self._index.search(namespace, vector, policy.threshold)
        except (HeadraceError, CacheUnavailableError) as exc:
            log.warning("semantic_cache_unavailable", error=str(exc))
            return None
        if hit is None:
            return Probe(namespace, vector, policy.ttl_s)
        return Probe(
            namespace, vector, policy.ttl_s, orjson.loads(hit.value), round(hit.similarity, 6)
        )

    async def store(self, probe: Probe, value: object) -> None:
        try:
            await self._index.add(probe.namespace, probe.vector, orjson.dumps(value), probe.ttl_s)
        except CacheUnavailableError as exc:
            log.warning("semantic_cache_unavailable", error=str(exc))
