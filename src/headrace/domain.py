"""Frozen value types shared by every layer.

Headrace's canonical request and response schema is OpenAI's chat-completions schema: the
gateway speaks it to clients, forwards it to OpenAI-compatible upstreams, and native adapters
(Anthropic, Azure) translate to and from it. The types here therefore carry the OpenAI-shaped
payload (so that fields Headrace does not know pass through untouched) plus typed accessors for
the few fields the pipeline reads: model, stream, token counts. See docs/adr/0002.

Money is integer micro-dollars; durations are seconds as floats only at the edges.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as OpenAI reports them for one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> JsonObject:
        body: JsonObject = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens:
            body["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return body

    @classmethod
    def from_openai(cls, body: Mapping[str, Any] | None) -> Usage | None:
        """Read an OpenAI ``usage`` object; ``None`` when absent or not an object."""
        if not isinstance(body, Mapping):
            return None
        details = body.get("prompt_tokens_details")
        cached = details.get("cached_tokens", 0) if isinstance(details, Mapping) else 0
        return cls(
            prompt_tokens=int(body.get("prompt_tokens") or 0),
            completion_tokens=int(body.get("completion_tokens") or 0),
            cached_tokens=int(cached or 0),
        )


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat-completions request.

    ``body`` is the client's JSON object exactly as sent (minus nothing): providers that speak
    OpenAI forward it with only ``model`` (and ``stream_options`` when streaming) rewritten.
    """

    model: str
    messages: Sequence[Mapping[str, Any]]
    body: Mapping[str, Any]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ChatResponse:
    """A complete (non-streamed) answer: an OpenAI ``chat.completion`` object.

    ``exhausted_for_s``: the upstream said (rate-limit headers) that its quota is used up for
    this many seconds; the router skips the deployment until then.
    """

    body: JsonObject
    usage: Usage
    exhausted_for_s: float | None = None


@dataclass(frozen=True, slots=True)
class ChatChunk:
    """One streamed event: an OpenAI ``chat.completion.chunk`` object.

    ``usage`` is set on the final usage-only chunk (OpenAI's ``include_usage`` convention);
    ``exhausted_for_s`` may be set on the first chunk, as on :class:`ChatResponse`.
    """

    body: JsonObject
    usage: Usage | None = None
    exhausted_for_s: float | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A validated embeddings request; ``inputs`` is always a list of strings."""

    model: str
    inputs: Sequence[str]
    body: Mapping[str, Any]
    dimensions: int | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingResponse:
    """One vector per input, in input order, and the tokens they cost."""

    vectors: Sequence[Sequence[float]]
    usage: Usage
    model: str
    exhausted_for_s: float | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-deployment limits, in seconds."""

    connect_s: float = 5.0
    first_token_s: float = 60.0
    total_s: float = 600.0


@dataclass(frozen=True, slots=True)
class Price:
    """What a deployment charges, in integer micro-dollars per million tokens.

    ``cached_input_per_mtok``: for prompt tokens the upstream served from its prompt cache;
    ``None`` bills them as ordinary input.
    """

    input_per_mtok: int = 0
    output_per_mtok: int = 0
    cached_input_per_mtok: int | None = None

    def cost_micro_usd(self, usage: Usage) -> int:
        """The cost of ``usage``, rounded half up to a whole micro-dollar."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_rate = (
            self.input_per_mtok
            if self.cached_input_per_mtok is None
            else self.cached_input_per_mtok
        )
        total = (
            (usage.prompt_tokens - cached) * self.input_per_mtok
            + cached * cached_rate
            + usage.completion_tokens * self.output_per_mtok
        )
        return (total + 500_000) // 1_000_000


@dataclass(frozen=True, slots=True)
class Deployment:
    """One place a public model is served: a provider kind, an upstream model name, a URL.

    ``kind`` names an entry of :data:`headrace.providers.registry.PROVIDERS`.

    ``api_key`` is resolved from the environment by wiring; it is never logged or rendered
    (``repr`` hides it).
    """

    name: str
    kind: str
    model: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeouts: Timeouts = field(default_factory=Timeouts)
    weight: float = 1.0
    max_concurrency: int | None = None
    price: Price = field(default_factory=Price)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A public model name and the deployments that serve it, in preference order."""

    name: str
    deployments: Sequence[Deployment]
    capabilities: frozenset[str] = frozenset({"chat"})
    owned_by: str = "headrace"


class Priority(StrEnum):
    """Request priority: under pressure, lower priorities are shed first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Larger is more important."""
        return {"high": 2, "normal": 1, "low": 0}[self.value]


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The client's ``Cache-Control``: ``no-cache`` skips reading, ``no-store`` skips writing,
    ``max-age=N`` accepts only entries at most N seconds old."""

    no_cache: bool = False
    no_store: bool = False
    max_age_s: float | None = None


@dataclass(frozen=True, slots=True)
class RequestControls:
    """What the client asked of the gateway itself, through headers.

    ``fallbacks``: ``None`` uses the configured chain; an empty tuple disables fallbacks (and
    the degraded answer); names narrow the chain to those models.
    """

    priority: Priority = Priority.NORMAL
    fallbacks: tuple[str, ...] | None = None
    cache: CacheControl = field(default_factory=CacheControl)


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored API key. Only ``secret_hash`` (SHA-256 of the secret) is kept, never the secret.

    ``team_id``, ``allowed_models`` and ``metadata`` are where virtual keys (limits, budgets,
    expiry) attach; the foundation uses ``role`` only.
    """

    id: str
    prefix: str
    secret_hash: str
    role: Role = Role.USER
    name: str = ""
    team_id: str | None = None
    allowed_models: frozenset[str] = frozenset()
    revoked: bool = False
    created_at: float = 0.0
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the authenticated key."""

    key_id: str
    role: Role
    team_id: str | None = None
    allowed_models: frozenset[str] = frozenset()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def may_use(self, model: str) -> bool:
        """An empty ``allowed_models`` allows every model."""
        return not self.allowed_models or model in self.allowed_models


@dataclass(slots=True)
class Call:
    """What one request did, filled in as it goes; the API reads it for headers and logs.

    The one mutable record here: it is owned by a single request.

    ``upstream_ns`` is the time spent waiting on the upstream, so that the gateway's own
    overhead is wall time minus this.
    """

    request_id: str
    principal: Principal | None = None
    model: str | None = None
    deployment: str | None = None
    attempts: int = 0
    upstream_ns: int = 0
    first_chunk_ns: int | None = None
    usage: Usage | None = None
    controls: RequestControls = field(default_factory=RequestControls)
    degraded: bool = False
    cache: str | None = None  # "hit", "miss" or "bypass" once the cache has looked
    similarity: float | None = None  # set on a semantic-cache hit
    cost_micro_usd: int | None = None  # once the answer is complete
    started_ns: int = field(default_factory=time.perf_counter_ns)
