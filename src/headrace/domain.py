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
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

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
    hints: Mapping[str, str] = field(default_factory=dict)  # X-Headrace-* headers, lower-case


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"


class BudgetPeriod(StrEnum):
    """How often a budget starts again. Periods are UTC calendar periods (weeks start Monday)."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    TOTAL = "total"

    def current(self, now: float) -> tuple[str, float, float]:
        """``(period id, start, end)`` of the period holding unix time ``now``.

        The id names the counter, so a new period is a new counter: budgets reset without a
        job that resets them. ``total`` never ends (its end is ``inf``).
        """
        moment = datetime.fromtimestamp(now, UTC)
        day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        if self is BudgetPeriod.DAY:
            start, end = day, day + timedelta(days=1)
            label = start.strftime("%Y-%m-%d")
        elif self is BudgetPeriod.WEEK:
            start = day - timedelta(days=day.weekday())
            end = start + timedelta(days=7)
            year, week, _ = start.isocalendar()
            label = f"{year}-W{week:02d}"
        elif self is BudgetPeriod.MONTH:
            start = day.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
            label = start.strftime("%Y-%m")
        else:
            return "total", 0.0, float("inf")
        return label, start.timestamp(), end.timestamp()


@dataclass(frozen=True, slots=True)
class Quota:
    """The limits and budget a key or a team carries. ``None`` means no limit of that kind.

    A request must pass both its key's quota and its team's.
    """

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + completion) per minute
    max_parallel: int | None = None  # requests in flight at once
    budget_micro_usd: int | None = None  # hard budget per period; refused beyond it
    budget_period: BudgetPeriod = BudgetPeriod.MONTH
    soft_budget_ratio: float | None = None  # alert once per period when spend crosses this share

    @property
    def unlimited(self) -> bool:
        return (
            self.rpm is None
            and self.tpm is None
            and self.max_parallel is None
            and self.budget_micro_usd is None
        )


NO_QUOTA = Quota()


@dataclass(frozen=True, slots=True)
class Team:
    """A tenant: owns keys, usage and jobs; carries its own quota on top of its keys'."""

    id: str
    name: str
    organization: str = ""
    quota: Quota = NO_QUOTA
    metadata: Mapping[str, str] = field(default_factory=dict)
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored (virtual) API key. Only ``secret_hash`` (SHA-256 of the secret) is kept.

    ``allowed_models`` holds model names or ``fnmatch`` patterns (empty: every model).
    ``metadata`` drives per-key policy (``priority``, ``cache``, ``cache_ttl_s``, ``tier``).
    """

    id: str
    prefix: str
    secret_hash: str
    role: Role = Role.USER
    name: str = ""
    team_id: str | None = None
    user: str | None = None  # the person the key was issued to (free text, e.g. an email)
    allowed_models: frozenset[str] = frozenset()
    quota: Quota = NO_QUOTA
    expires_at: float | None = None  # unix time; None never expires
    revoked: bool = False
    created_at: float = 0.0
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the authenticated key, with its team's quota resolved."""

    key_id: str
    role: Role
    team_id: str | None = None
    allowed_models: frozenset[str] = frozenset()
    metadata: Mapping[str, str] = field(default_factory=dict)
    quota: Quota = NO_QUOTA
    team_quota: Quota = NO_QUOTA
    expires_at: float | None = None

    def may_use(self, model: str) -> bool:
        """An empty ``allowed_models`` allows every model; entries may be ``fnmatch`` patterns."""
        if not self.allowed_models or model in self.allowed_models:
            return True
        return any(fnmatchcase(model, pattern) for pattern in self.allowed_models)


class UsageRecord(NamedTuple):
    """One request's account: written once per request, whatever its outcome.

    ``id`` is unique and travels with the record through the spool, so a replay inserts it
    exactly once. ``baseline_cost_micro_usd`` is what the model the client asked for would have
    cost; it differs from ``cost_micro_usd`` when a selection rule routed elsewhere.

    A named tuple, not a frozen dataclass like the other values here: as immutable, and every
    request builds one, which as a frozen dataclass cost about 40,000 instructions (each of
    its twenty fields set through ``object.__setattr__``) against 16,000. Write it as JSON
    through :meth:`_asdict` (``orjson`` refuses a named tuple).
    """

    id: str
    request_id: str
    created_at: float  # unix time, UTC
    operation: str  # "chat" or "embeddings"
    key_id: str
    team_id: str | None
    model: str  # the model that answered (after selection rules)
    requested_model: str
    deployment: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_micro_usd: int = 0
    baseline_cost_micro_usd: int = 0
    latency_ms: float = 0.0
    status: int = 200
    error: str | None = None
    cache_hit: bool = False
    degraded: bool = False
    stream: bool = False


@dataclass(frozen=True, slots=True)
class Feedback:
    """What a caller thought of one answer (``POST /v1/feedback``), kept beside its usage.

    ``request_id`` is the answer's ``X-Request-Id``; ``key_id`` and ``team_id`` are who gave
    the feedback (the same team as the request's). At least one of ``score``, ``label`` and
    ``comment`` is set.
    """

    id: str
    request_id: str
    key_id: str
    team_id: str | None
    created_at: float  # unix time, UTC
    score: float | None = None
    label: str | None = None
    comment: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


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
    requested_model: str | None = None  # what the client asked for, before selection rules
    baseline_cost_micro_usd: int | None = None  # the requested model's price for the same usage
    quota_headers: dict[str, str] | None = None  # RateLimit / RateLimit-Policy for the response
    recorded: bool = False  # its one usage record is written
    started_ns: int = field(default_factory=time.perf_counter_ns)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"

    @property
    def final(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class JobKind(StrEnum):
    CHAT = "chat.completions"
    EMBEDDINGS = "embeddings"


@dataclass(frozen=True, slots=True)
class Job:
    """One unit of asynchronous work: a chat or embeddings request body run later by a worker.

    ``errors`` is the history of failed attempts (OpenAI-shaped error objects plus ``attempt``
    and ``at``); ``error`` is the last one. ``run_after`` delays a retry; ``deadline_at`` is
    the latest start time (a job not started by then fails as expired).
    """

    id: str
    kind: JobKind
    body: Mapping[str, Any]
    key_id: str
    team_id: str | None = None
    priority: Priority = Priority.NORMAL
    status: JobStatus = JobStatus.QUEUED
    attempts: int = 0
    max_attempts: int = 5
    created_at: float = 0.0
    run_after: float = 0.0
    deadline_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None
    errors: tuple[Mapping[str, Any], ...] = ()
    cost_micro_usd: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)
    webhook_url: str | None = None
    batch_id: str | None = None
    idempotency_key: str | None = None
    traceparent: str | None = None  # the submitting request's span (W3C), when traced


@dataclass(frozen=True, slots=True)
class JobEvent:
    """A status change of a job, in order (``seq`` increases per job)."""

    job_id: str
    seq: int
    status: JobStatus
    at: float
    detail: Mapping[str, Any] = field(default_factory=dict)
