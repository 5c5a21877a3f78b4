"""Settings: one YAML file plus ``HEADRACE_*`` environment variables, typed and strict.

Precedence, highest first: environment variables (nested with ``__``, e.g.
``HEADRACE_SERVER__PORT=9000``), then the YAML file, then the defaults here. Unknown keys are
an error that names the key and the file. Units are in the names (``timeout_s``, ``_bytes``).

Only :mod:`headrace.wiring` and :mod:`headrace.cli` import this module (import-linter enforces
it); everything else receives plain values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

Capability = Literal["chat", "embeddings"]
_CHAT: Capability = "chat"


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutsConfig(_Strict):
    connect_s: float = Field(5.0, gt=0, description="TCP connect timeout.")
    first_token_s: float = Field(60.0, gt=0, description="Stream start to first chunk.")
    total_s: float = Field(600.0, gt=0, description="Whole upstream call.")


class PriceConfig(_Strict):
    input_per_mtok_usd: float = Field(0.0, ge=0)
    output_per_mtok_usd: float = Field(0.0, ge=0)
    cached_input_per_mtok_usd: float | None = Field(None, ge=0)


class PricingConfig(_Strict):
    file: Path | None = Field(
        None, description="A price table (YAML) that extends or overrides the shipped one."
    )


class RetryConfig(_Strict):
    max_attempts: int = Field(3, ge=1, description="Attempts per model, the first included.")
    base_delay_s: float = Field(0.05, ge=0)
    max_delay_s: float = Field(2.0, ge=0)
    max_total_s: float = Field(30.0, gt=0, description="Give up retrying after this long.")


class BreakerConfig(_Strict):
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open it.")
    failure_ratio: float = Field(0.5, gt=0, le=1)
    window_s: float = Field(30.0, gt=0)
    min_requests: int = Field(10, ge=1)
    cooldown_s: float = Field(15.0, gt=0)
    half_open_probes: int = Field(1, ge=1)


FallbackTrigger = Literal["transient", "context_length", "permanent"]
_DEFAULT_FALLBACK_ON: tuple[FallbackTrigger, ...] = ("transient", "context_length")


class SemanticCacheConfig(_Strict):
    enabled: bool = False
    threshold: float | None = Field(
        None, gt=0, le=1, description="Cosine similarity to reuse an answer; default: measured."
    )
    embedding_model: str = Field(
        "all-minilm-l6-v2", description="A configured model with the embeddings capability."
    )


class ModelCacheConfig(_Strict):
    enabled: bool = True
    ttl_s: float = Field(3600.0, gt=0)
    mode: Literal["deterministic", "all"] = Field(
        "deterministic", description="deterministic: only temperature 0 or seeded requests."
    )
    semantic: SemanticCacheConfig = SemanticCacheConfig()


class EmbeddingBatchConfig(_Strict):
    window_ms: float = Field(
        2.0, ge=0, description="Merge embeddings calls arriving this close together; 0: off."
    )
    max_inputs: int = Field(256, ge=1, description="Inputs per merged upstream call.")


class DeploymentConfig(_Strict):
    """One upstream serving a public model."""

    provider: str = Field(description="Provider kind: openai_compatible, local, ...")
    model: str = Field(description="The model name the upstream knows.")
    name: str | None = Field(None, description="Defaults to '<public model>/<n>'.")
    base_url: str | None = Field(None, description="e.g. https://api.openai.com/v1")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable that holds the upstream API key."
    )
    timeouts: TimeoutsConfig = TimeoutsConfig()
    weight: float = Field(1.0, gt=0, description="Share of traffic for weighted_random.")
    max_concurrency: int | None = Field(
        None, ge=1, description="Requests in flight at once; beyond it the router skips it."
    )
    price: PriceConfig | None = Field(
        None, description="USD per million tokens; default: the price table by model name."
    )
    embedding_batch: EmbeddingBatchConfig = EmbeddingBatchConfig()
    options: dict[str, Any] = Field(default_factory=dict, description="Provider-specific.")


class ModelConfig(_Strict):
    """A public model name and the deployments behind it, in preference order."""

    name: str
    deployments: list[DeploymentConfig] = Field(min_length=1)
    capabilities: list[Capability] = Field(default_factory=lambda: [_CHAT])
    strategy: str = Field(
        "weighted_random",
        description="weighted_random, round_robin, least_in_flight, latency_aware, cost_first",
    )
    fallbacks: list[str] = Field(default_factory=list, description="Models to try next, in order.")
    context_window_fallbacks: list[str] = Field(
        default_factory=list, description="Models with larger windows for too-long prompts."
    )
    fallback_on: list[FallbackTrigger] = Field(
        default_factory=lambda: list(_DEFAULT_FALLBACK_ON),
        description="Error classes that move on to the fallbacks.",
    )
    degraded_answer: str | None = Field(
        None, description="Static answer, marked degraded, when every upstream failed."
    )
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    cache: ModelCacheConfig = ModelCacheConfig()


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Larger bodies get 413.")
    graceful_shutdown_s: float = Field(30.0, ge=0)
    gc_freeze: bool = Field(
        True,
        description="Once started, move every object alive into the collector's permanent "
        "generation, so that full collections skip it (serve and worker).",
    )
    gc_threshold: int = Field(
        10_000,
        ge=100,
        description="Collect young objects after this many more allocations than frees; "
        "Python's default is 700 (serve and worker).",
    )


class AuthConfig(_Strict):
    enabled: bool = True
    key_cache_ttl_s: float = Field(30.0, ge=0)


class RetryBudgetConfig(_Strict):
    ratio: float = Field(0.2, ge=0, description="Retries allowed as a share of requests.")
    window_s: float = Field(10.0, gt=0)
    min_per_s: float = Field(1.0, ge=0, description="Retries always allowed per second.")


class AdmissionConfig(_Strict):
    max_concurrent: int = Field(1024, ge=1, description="Model requests served at once.")
    max_queue: int = Field(2048, ge=0, description="Requests waiting beyond that; then shed.")
    max_wait_s: float = Field(10.0, gt=0, description="Longest wait in the queue before 503.")


class RouterConfig(_Strict):
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    admission: AdmissionConfig = AdmissionConfig()


class CacheConfig(_Strict):
    backend: Literal["memory", "redis", "none"] = Field(
        "memory", description="Where cached responses live; none turns caching off."
    )
    max_bytes: int = Field(256 * 2**20, gt=0, description="Memory backend size bound.")
    redis_url: str | None = Field(None, description="For backend redis: redis://host:6379/0")
    shared_across_teams: bool = Field(
        False, description="Let every tenant share entries (off: one namespace per team/key)."
    )
    flight_timeout_s: float = Field(
        30.0, gt=0, description="How long identical requests wait for the first one's answer."
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> CacheConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError(
                "cache.backend is redis: set cache.redis_url (or HEADRACE_CACHE__REDIS_URL)"
            )
        return self


class LimitsConfig(_Strict):
    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: exact within one process; redis: shared by every process."
    )
    redis_url: str | None = Field(None, description="For backend redis: redis://host:6379/0")
    on_backend_down: Literal["local", "refuse"] = Field(
        "local",
        description="Redis unreachable: fall back to per-process limits (local) or answer 503.",
    )
    default_completion_tokens: int = Field(
        1024, ge=0, description="Output tokens reserved when a request sets no max_tokens."
    )
    lease_ttl_s: float = Field(
        900.0, gt=0, description="A parallel-request slot is freed after this long regardless."
    )
    settle_linger_s: float = Field(
        0.0,
        ge=0,
        le=0.1,
        description="For backend redis: how long a settlement may wait to ride the next call.",
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> LimitsConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError(
                "limits.backend is redis: set limits.redis_url (or HEADRACE_LIMITS__REDIS_URL)"
            )
        return self


class BudgetsConfig(_Strict):
    alert_webhook_url: str | None = Field(
        None, description="POSTed a JSON alert when a key or team crosses its soft budget."
    )
    alert_timeout_s: float = Field(5.0, gt=0)


class UsageConfig(_Strict):
    enabled: bool = Field(True, description="Write one usage record per request.")
    batch_size: int = Field(
        500,
        ge=1,
        description="Records per database insert (larger batches hold the event loop longer).",
    )
    flush_interval_s: float = Field(
        1.0,
        gt=0,
        description="Longest a record waits in memory (what a crash of the process can lose).",
    )
    max_buffer: int = Field(
        100_000, ge=1, description="Records held in memory; beyond that they go to the spool."
    )
    spool_dir: Path | None = Field(
        None, description="Where records wait while the database is down; default data_dir/spool."
    )
    retention_days: float = Field(
        0.0,
        ge=0,
        description="Per-request records older than this are deleted (the per-day aggregates "
        "that reports and budgets read are kept); 0 keeps them forever; else at least 1.",
    )

    @model_validator(mode="after")
    def _retention_of_a_day_at_least(self) -> UsageConfig:
        if 0 < self.retention_days < 1:
            # A record deleted and then replayed from a spool file would be counted twice.
            raise ValueError("usage.retention_days must be 0 (keep forever) or at least 1")
        return self


class StoreConfig(_Strict):
    migrate_on_start: bool | None = Field(
        None,
        description="Apply migrations at start. Default: yes for SQLite, no for PostgreSQL "
        "(run `headrace migrate` when deploying).",
    )


class SelectionWhen(_Strict):
    models: list[str] = Field(
        default_factory=list, description="Requested model names or fnmatch patterns; empty: any."
    )
    min_prompt_tokens: int | None = Field(None, ge=0)
    max_prompt_tokens: int | None = Field(None, ge=0)
    tools: bool | None = Field(None, description="true: only with tools; false: only without.")
    images: bool | None = Field(None, description="true: only with image parts; false: without.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="X-Headrace-* request headers that must match exactly."
    )
    key_tiers: list[str] = Field(
        default_factory=list, description="The key's `tier` metadata must be one of these."
    )


class SelectionRuleConfig(_Strict):
    name: str
    when: SelectionWhen = SelectionWhen()
    use: str = Field(description="The model that serves a matching request.")


class WebhooksConfig(_Strict):
    signing_secret: SecretStr | None = Field(
        None,
        description="whsec_... secret that signs job webhooks (Standard Webhooks); default: "
        "generated on first start into data_dir/webhook-secret. Set it when several "
        "processes deliver webhooks.",
    )
    allow_private_targets: bool = Field(
        False, description="Allow webhook URLs on loopback/private/link-local addresses."
    )
    allow_hosts: list[str] = Field(
        default_factory=list, description="Host names allowed whatever they resolve to."
    )
    timeout_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(12, ge=1, description="Delivery attempts before giving up.")


class JobsConfig(_Strict):
    backend: Literal["sql", "procrastinate"] = Field(
        "sql",
        description="sql: the job table in the store's database, claimed with leases by "
        "in-process runners or `headrace worker` processes; procrastinate: the same table on "
        "PostgreSQL, dispatched through Procrastinate.",
    )
    run_in_process: bool = Field(
        True, description="`headrace serve` also runs jobs (off when workers run them)."
    )
    concurrency: int = Field(1000, ge=1, description="Jobs in flight per process.")
    lease_s: float = Field(60.0, gt=0, description="A crashed worker's jobs run again after this.")
    heartbeat_s: float = Field(15.0, gt=0)
    max_attempts: int = Field(5, ge=1, description="Attempts before a job is a dead letter.")
    retry_base_s: float = Field(1.0, gt=0)
    retry_cap_s: float = Field(300.0, gt=0)
    idempotency_ttl_s: float = Field(86_400.0, gt=0, description="How long keys are remembered.")
    events_poll_s: float = Field(
        0.1,
        gt=0,
        le=10,
        description="While job event streams are open, how often a process reads whether "
        "their jobs moved (one query for all of them).",
    )
    retention_days: float = Field(
        30.0,
        ge=0,
        description="Jobs that ended this long ago (succeeded, failed, cancelled; not dead "
        "letters, not batch jobs) are deleted with their history; 0 keeps them forever.",
    )
    webhooks: WebhooksConfig = WebhooksConfig()

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> JobsConfig:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("jobs.heartbeat_s must be shorter than jobs.lease_s")
        return self


class TracingConfig(_Strict):
    """OpenTelemetry traces over OTLP/HTTP; needs the ``otel`` extra when enabled."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # a collector's OTLP/HTTP traces URL
    service_name: str = "headrace"
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)  # of traces the caller did not sample
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. a hosted collector's token
    timeout_s: float = Field(10.0, gt=0)


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    access_log: bool = True


def default_models() -> list[ModelConfig]:
    """The embedded default: a local chat model and a local embedding model."""
    return [
        ModelConfig(
            name="smollm2-135m-instruct",
            deployments=[DeploymentConfig(provider="local", model="smollm2-135m-instruct")],
        ),
        ModelConfig(
            name="all-minilm-l6-v2",
            capabilities=["embeddings"],
            deployments=[DeploymentConfig(provider="local_embeddings", model="all-minilm-l6-v2")],
        ),
    ]


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "headrace"


class Settings(BaseSettings):
    """Everything Headrace reads at start. See docs/configuration.md for each key."""

    model_config = SettingsConfigDict(
        env_prefix="HEADRACE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default: SQLite in data_dir."
    )
    admin_key: SecretStr | None = Field(
        None, description="Fixes the admin key instead of generating one on first start."
    )
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    log: LogConfig = LogConfig()
    tracing: TracingConfig = TracingConfig()
    router: RouterConfig = RouterConfig()
    cache: CacheConfig = CacheConfig()
    pricing: PricingConfig = PricingConfig()
    store: StoreConfig = StoreConfig()
    limits: LimitsConfig = LimitsConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    usage: UsageConfig = UsageConfig()
    jobs: JobsConfig = JobsConfig()
    models: list[ModelConfig] = Field(default_factory=default_models)
    selection: list[SelectionRuleConfig] = Field(
        default_factory=list,
        description="Cost-aware model selection: the first matching rule picks the model.",
    )

    @model_validator(mode="after")
    def _unique_model_names(self) -> Settings:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        known = set(names)
        for model in self.models:
            for target in [*model.fallbacks, *model.context_window_fallbacks]:
                if target not in known:
                    raise ValueError(
                        f"model {model.name!r} falls back to {target!r}, which is not a "
                        f"configured model; add it under models or remove it"
                    )
        for rule in self.selection:
            if rule.use not in known:
                raise ValueError(
                    f"selection rule {rule.name!r} uses {rule.use!r}, which is not a "
                    f"configured model; add it under models or fix the rule"
                )
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'headrace.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file; the file arrives as init kwargs (see load_settings).
        return (env_settings, init_settings)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"Invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check its spelling; see docs/configuration.md)")
        else:
            lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def load_settings(path: Path | None = None) -> Settings:
    """Read ``path`` (YAML) if given, then the environment. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = "the environment (HEADRACE_*)"
    if path is not None:
        source = f"{path} or the environment (HEADRACE_*)"
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {path}: {exc.strerror}.") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
        data = loaded
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
