"""Composition: the only place that reads :class:`~headrace.config.Settings` and builds backends.

:func:`build_runtime` turns settings into a :class:`Runtime` (services plus what must be
started and stopped); the API and the CLI take it from there.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from headrace.accounting.pricing import PriceTable
from headrace.accounting.retention import UsagePurger
from headrace.accounting.tokens import TokenCounter
from headrace.accounting.usage import UsageWriter
from headrace.cache.base import FlightLock, ResponseCache
from headrace.cache.semantic import DEFAULT_THRESHOLD, SemanticIndex
from headrace.config import (
    CacheConfig,
    ConfigError,
    DeploymentConfig,
    LimitsConfig,
    ModelConfig,
    Settings,
    TracingConfig,
)
from headrace.domain import Call, Deployment, EmbeddingRequest, ModelRoute, Price, Timeouts
from headrace.gateway.admission import Admission
from headrace.gateway.alerts import WebhookAlerts
from headrace.gateway.auth import Authenticator, ensure_admin_key
from headrace.gateway.caching import CachePolicy, ResponseCacher
from headrace.gateway.quota import QuotaGuard
from headrace.gateway.selection import ModelSelector, SelectionRule
from headrace.gateway.semantic import SemanticCache, SemanticPolicy
from headrace.gateway.service import GatewayService
from headrace.jobs.batches import BatchService
from headrace.jobs.service import JobPolicy, JobService, Validate
from headrace.limits.base import Limiter
from headrace.limits.fallback import FallbackLimiter
from headrace.limits.memory import MemoryLimiter
from headrace.observability.metrics import Metrics
from headrace.observability.tracing import Tracing
from headrace.providers import registry
from headrace.providers.base import Provider
from headrace.providers.batching import BatchingProvider
from headrace.providers.http import SessionPool
from headrace.queue.base import JobQueue
from headrace.queue.batches_sql import store_beside
from headrace.routing.breaker import BreakerConfig
from headrace.routing.catalog import Catalog
from headrace.routing.classify import ErrorClass
from headrace.routing.retry import RetryBudget, RetryPolicy
from headrace.routing.router import RoutePolicy, Router
from headrace.store.base import Store
from headrace.store.sql import SqlStore

log = structlog.get_logger("headrace")

Check = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """What the HTTP edge needs to know from settings."""

    max_body_bytes: int
    access_log: bool


class Service(Protocol):
    """Background work a process runs beside the API (job runner, webhook outbox)."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float = 30.0) -> None: ...


@dataclass(frozen=True, slots=True)
class JobsOptions:
    """What a job runner and the webhook outbox need from settings."""

    run_in_process: bool
    concurrency: int
    lease_s: float
    heartbeat_s: float
    retry_base_s: float
    retry_cap_s: float
    webhook_timeout_s: float
    webhook_max_attempts: int
    allow_private_webhooks: bool
    allow_webhook_hosts: frozenset[str]
    webhook_secret: str | None  # None: generated into data_dir on first start
    retention_s: float | None = None  # finished jobs older than this are purged; None: kept


@dataclass(slots=True)
class Runtime:
    """Everything a running gateway process holds. Start once, stop once."""

    gateway: GatewayService
    authenticator: Authenticator
    metrics: Metrics
    store: Store
    providers: Mapping[str, Provider]
    http: SessionPool
    http_options: HttpOptions
    data_dir: Path
    admin_secret: str | None
    new_admin_secret: str | None = None
    readiness: dict[str, Check] = field(default_factory=dict)
    optional_checks: frozenset[str] = frozenset()
    cache: ResponseCache | None = None
    limiter: Limiter | None = None
    usage: UsageWriter | None = None
    jobs: JobService | None = None
    batches: BatchService | None = None
    job_queue: JobQueue | None = None
    jobs_options: JobsOptions | None = None
    services: list[Service] = field(default_factory=list)
    on_job_submitted: Callable[[], None] | None = None  # wakes an in-process runner
    started_at: int = field(default_factory=lambda: int(time.time()))
    announce_admin_key: Callable[[str, Path], None] | None = None
    on_started: Callable[[], None] | None = None  # the process's, once everything has started
    tracing: Tracing | None = None

    async def start(self) -> None:
        await self.store.start()
        if self.limiter is not None:
            await self.limiter.start()
        if self.usage is not None:
            await self.usage.start()
        if self.gateway.cacher is not None:
            await self.gateway.cacher.start()
        if self.job_queue is not None:
            await self.job_queue.start()
        self.new_admin_secret = await ensure_admin_key(self.store, self.data_dir, self.admin_secret)
        if self.new_admin_secret and self.announce_admin_key:
            self.announce_admin_key(self.new_admin_secret, self.data_dir)
        for service in self.services:
            await service.start()
        if self.on_started is not None:
            self.on_started()

    async def stop(self) -> None:
        for service in reversed(self.services):
            await service.stop()
        await asyncio.gather(
            *(provider.aclose() for provider in self.providers.values()),
            return_exceptions=True,
        )
        quota = self.gateway.quota
        if quota is not None:
            await quota.aclose()  # settlements and alerts still running
        if self.limiter is not None:
            await self.limiter.aclose()
        if self.usage is not None:
            await self.usage.aclose()  # flush: nothing accepted is left only in memory
        await self.http.aclose()
        if self.job_queue is not None:
            await self.job_queue.aclose()
        await self.store.aclose()
        cacher = self.gateway.cacher
        if cacher is not None:
            await cacher.aclose()
        if self.tracing is not None:
            await self.tracing.aclose()  # the last spans go out


def _deployment(
    model: ModelConfig, index: int, config: DeploymentConfig, prices: PriceTable
) -> Deployment:
    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if api_key is None:
            log.warning(
                "upstream_api_key_missing",
                model=model.name,
                env=config.api_key_env,
                hint="set this environment variable or remove api_key_env",
            )
    t = config.timeouts
    price = config.price
    return Deployment(
        name=config.name or f"{model.name}/{index}",
        kind=config.provider,
        model=config.model,
        base_url=config.base_url,
        api_key=api_key,
        timeouts=Timeouts(connect_s=t.connect_s, first_token_s=t.first_token_s, total_s=t.total_s),
        weight=config.weight,
        max_concurrency=config.max_concurrency,
        price=prices.lookup(config.model)
        if price is None
        else Price(
            input_per_mtok=_micro_usd(price.input_per_mtok_usd),
            output_per_mtok=_micro_usd(price.output_per_mtok_usd),
            cached_input_per_mtok=None
            if price.cached_input_per_mtok_usd is None
            else _micro_usd(price.cached_input_per_mtok_usd),
        ),
        options=dict(config.options),
    )


def build_providers(
    settings: Settings, routes: Sequence[ModelRoute], context: registry.ProviderContext
) -> dict[str, Provider]:
    """One provider per deployment, by deployment name; embeddings batched as configured."""
    providers: dict[str, Provider] = {}
    batching = {
        (model.name, i): d.embedding_batch
        for model in settings.models
        for i, d in enumerate(model.deployments)
    }
    for route in routes:
        for i, deployment in enumerate(route.deployments):
            if deployment.name in providers:
                raise ValueError(f"deployment name {deployment.name!r} is used twice")
            provider = registry.build(deployment, context)
            batch = batching[(route.name, i)]
            if "embeddings" in route.capabilities and batch.window_ms > 0:
                provider = BatchingProvider(
                    provider, window_s=batch.window_ms / 1000, max_inputs=batch.max_inputs
                )
            providers[deployment.name] = provider
    return providers


def build_tracing(config: TracingConfig) -> Tracing | None:
    """The OTLP exporter ``tracing:`` describes (None: off); a clear error without the
    ``otel`` extra."""
    if not config.enabled:
        return None
    try:
        return Tracing.otlp(
            config.endpoint,
            service_name=config.service_name,
            sample_ratio=config.sample_ratio,
            headers=config.headers,
            timeout_s=config.timeout_s,
        )
    except ImportError as exc:
        raise ConfigError(
            f"tracing.enabled needs the OpenTelemetry SDK and OTLP exporter ({exc.name} is "
            "missing): pip install 'headrace[otel]', or set tracing.enabled: false."
        ) from None


def _micro_usd(dollars: float) -> int:
    """Config prices are decimal dollars; money inside is integer micro-dollars."""
    return round(dollars * 1_000_000)


def build_policy(model: ModelConfig) -> RoutePolicy:
    r, b = model.retry, model.breaker
    return RoutePolicy(
        strategy=model.strategy,
        retry=RetryPolicy(
            max_attempts=r.max_attempts,
            base_delay_s=r.base_delay_s,
            max_delay_s=r.max_delay_s,
            max_total_s=r.max_total_s,
        ),
        breaker=BreakerConfig(
            failure_threshold=b.failure_threshold,
            failure_ratio=b.failure_ratio,
            window_s=b.window_s,
            min_requests=b.min_requests,
            cooldown_s=b.cooldown_s,
            half_open_probes=b.half_open_probes,
        ),
        fallbacks=tuple(model.fallbacks),
        context_fallbacks=tuple(model.context_window_fallbacks),
        fallback_on=frozenset(ErrorClass(kind) for kind in model.fallback_on),
        degraded_answer=model.degraded_answer,
    )


def _memory_cache(config: CacheConfig) -> tuple[ResponseCache, FlightLock | None]:
    from headrace.cache.memory import MemoryCache

    # One process: in-process single-flight is enough, no cross-process lock.
    return MemoryCache(config.max_bytes), None


def _redis_cache(config: CacheConfig) -> tuple[ResponseCache, FlightLock | None]:
    from headrace.cache.redis import RedisCache, RedisFlightLock

    assert config.redis_url is not None  # checked by CacheConfig
    return RedisCache(config.redis_url), RedisFlightLock(config.redis_url)


CACHE_BACKENDS: Mapping[str, Callable[[CacheConfig], tuple[ResponseCache, FlightLock | None]]] = {
    "memory": _memory_cache,
    "redis": _redis_cache,
}


def build_semantic(settings: Settings, router: Router) -> SemanticCache | None:
    policies = {
        model.name: SemanticPolicy(
            threshold=model.cache.semantic.threshold or DEFAULT_THRESHOLD,
            embedding_model=model.cache.semantic.embedding_model,
            ttl_s=model.cache.ttl_s,
        )
        for model in settings.models
        if model.cache.enabled and model.cache.semantic.enabled
    }
    if not policies:
        return None

    async def embed(model: str, text: str) -> Sequence[float]:
        request = EmbeddingRequest(model=model, inputs=[text], body={"model": model})
        response = await router.embed(Call(request_id="semantic-cache"), request)
        return response.vectors[0]

    return SemanticCache(SemanticIndex(settings.resolved_database_url), policies, embed)


def build_cacher(
    settings: Settings, routes: list[ModelRoute], metrics: Metrics, router: Router
) -> ResponseCacher | None:
    config = settings.cache
    if config.backend == "none":
        return None
    cache, lock = CACHE_BACKENDS[config.backend](config)
    policies = {
        model.name: CachePolicy(
            enabled=model.cache.enabled,
            ttl_s=model.cache.ttl_s,
            deterministic_only=model.cache.mode == "deterministic",
        )
        for model in settings.models
    }
    prices = {d.name: d.price for route in routes for d in route.deployments}
    return ResponseCacher(
        cache,
        policies,
        metrics=metrics,
        prices=prices,
        flight_lock=lock,
        shared_namespace=config.shared_across_teams,
        flight_timeout_s=config.flight_timeout_s,
        semantic=build_semantic(settings, router),
    )


def _memory_limiter(config: LimitsConfig) -> Limiter:
    return MemoryLimiter()


def _redis_limiter(config: LimitsConfig) -> Limiter:
    from headrace.limits.redis import RedisLimiter

    assert config.redis_url is not None  # checked by LimitsConfig
    try:
        shared = RedisLimiter(config.redis_url, settle_linger_s=config.settle_linger_s)
    except ValueError as exc:  # a URL option the limiter's connection would not honour
        raise ConfigError(f"limits.redis_url: {exc}") from None
    if config.on_backend_down == "refuse":
        return shared
    return FallbackLimiter(shared, MemoryLimiter())


LIMITER_BACKENDS: Mapping[str, Callable[[LimitsConfig], Limiter]] = {
    "memory": _memory_limiter,
    "redis": _redis_limiter,
}


def _spool_check(usage: UsageWriter) -> Check:
    async def check() -> None:
        if usage.spooling:
            raise RuntimeError(
                f"usage records are going to the spool ({usage.pending} pending): "
                "the database is not accepting writes; they are replayed when it does"
            )

    return check


def build_store(settings: Settings) -> Store:
    return SqlStore(settings.resolved_database_url, migrate_on_start=_migrate_on_start(settings))


def _migrate_on_start(settings: Settings) -> bool:
    """Embedded SQLite migrates itself; PostgreSQL waits for `headrace migrate`."""
    migrate = settings.store.migrate_on_start
    if migrate is None:
        return settings.resolved_database_url.startswith("sqlite")
    return migrate


def build_selector(settings: Settings) -> ModelSelector | None:
    if not settings.selection:
        return None
    return ModelSelector(
        [
            SelectionRule(
                name=rule.name,
                use=rule.use,
                models=tuple(rule.when.models),
                min_prompt_tokens=rule.when.min_prompt_tokens,
                max_prompt_tokens=rule.when.max_prompt_tokens,
                tools=rule.when.tools,
                images=rule.when.images,
                headers={k.lower(): v for k, v in rule.when.headers.items()},
                key_tiers=frozenset(rule.when.key_tiers),
            )
            for rule in settings.selection
        ]
    )


def _sql_queue(settings: Settings, engine: AsyncEngine | None) -> JobQueue:
    from headrace.queue.sql import SqlJobQueue

    return SqlJobQueue(
        engine or settings.resolved_database_url, migrate_on_start=_migrate_on_start(settings)
    )


def _procrastinate_queue(settings: Settings, engine: AsyncEngine | None) -> JobQueue:
    from headrace.queue.procrastinate import ProcrastinateJobQueue

    return ProcrastinateJobQueue(
        engine or settings.resolved_database_url, migrate_on_start=_migrate_on_start(settings)
    )


# A job queue in the store's database shares the store's engine when there is one (the
# store disposes it, after the queue has stopped): one connection pool per process.
JOB_QUEUES: Mapping[str, Callable[[Settings, AsyncEngine | None], JobQueue]] = {
    "sql": _sql_queue,
    "procrastinate": _procrastinate_queue,
}


def build_jobs(
    settings: Settings, validate: Validate, engine: AsyncEngine | None = None
) -> tuple[JobService, JobQueue, JobsOptions]:
    config = settings.jobs
    queue = JOB_QUEUES[config.backend](settings, engine)
    hooks = config.webhooks
    policy = JobPolicy(
        max_attempts=config.max_attempts,
        idempotency_ttl_s=config.idempotency_ttl_s,
        allow_private_webhooks=hooks.allow_private_targets,
        allow_webhook_hosts=frozenset(hooks.allow_hosts),
    )
    options = JobsOptions(
        run_in_process=config.run_in_process,
        concurrency=config.concurrency,
        lease_s=config.lease_s,
        heartbeat_s=config.heartbeat_s,
        retry_base_s=config.retry_base_s,
        retry_cap_s=config.retry_cap_s,
        webhook_timeout_s=hooks.timeout_s,
        webhook_max_attempts=hooks.max_attempts,
        allow_private_webhooks=hooks.allow_private_targets,
        allow_webhook_hosts=frozenset(hooks.allow_hosts),
        webhook_secret=hooks.signing_secret.get_secret_value() if hooks.signing_secret else None,
        retention_s=config.retention_days * 86_400 if config.retention_days else None,
    )
    jobs = JobService(queue, validate, policy, events_poll_s=config.events_poll_s)
    return jobs, queue, options


def build_routes(settings: Settings) -> list[ModelRoute]:
    prices = PriceTable.load(settings.pricing.file)
    return [
        ModelRoute(
            name=model.name,
            deployments=[_deployment(model, i, d, prices) for i, d in enumerate(model.deployments)],
            capabilities=frozenset(model.capabilities),
        )
        for model in settings.models
    ]


def build_runtime(
    settings: Settings,
    *,
    store: Store | None = None,
    validate_job: Validate | None = None,
    tracing: Tracing | None = None,
) -> Runtime:
    """Build every service from ``settings``. Nothing is started or connected yet.

    ``validate_job`` checks a job's request body at submission (the API passes its wire
    parser); without it, jobs are not offered. ``tracing`` replaces the one
    ``settings.tracing`` describes (tests export to memory).
    """
    tracing = tracing or build_tracing(settings.tracing)
    routes = build_routes(settings)
    http = SessionPool()
    providers = build_providers(settings, routes, registry.ProviderContext(http=http))
    metrics = Metrics()
    store = store or build_store(settings)
    authenticator = Authenticator(
        store, enabled=settings.auth.enabled, cache_ttl_s=settings.auth.key_cache_ttl_s
    )
    readiness: dict[str, Check] = {"store": store.check}
    # A store outage degrades: cached keys keep working and usage records wait in the spool.
    optional: set[str] = {"store"}
    for name, provider in providers.items():
        readiness[f"deployment:{name}"] = provider.check
    catalog = Catalog(routes)
    budget = settings.router.retry_budget
    router = Router(
        catalog,
        providers,
        {model.name: build_policy(model) for model in settings.models},
        budget=RetryBudget(
            ratio=budget.ratio, window_s=budget.window_s, min_per_s=budget.min_per_s
        ),
        metrics=metrics,
        tracing=tracing,
    )
    limits = settings.router.admission
    admission = Admission(
        max_concurrent=limits.max_concurrent,
        max_queue=limits.max_queue,
        max_wait_s=limits.max_wait_s,
        metrics=metrics,
    )
    cacher = build_cacher(settings, routes, metrics, router)
    if cacher is not None:
        readiness["cache"] = cacher.cache.check
        optional.add("cache")  # a cache that is down is bypassed, not fatal
    limiter = LIMITER_BACKENDS[settings.limits.backend](settings.limits)
    if settings.limits.backend != "memory":
        readiness["limits"] = limiter.check
        if isinstance(limiter, FallbackLimiter):
            optional.add("limits")  # local limits stand in while Redis is down
    alert = None
    if settings.budgets.alert_webhook_url:
        alert = WebhookAlerts(
            settings.budgets.alert_webhook_url, http, timeout_s=settings.budgets.alert_timeout_s
        )
    usage = None
    services: list[Service] = []
    if settings.usage.enabled:
        u = settings.usage
        usage = UsageWriter(
            store,
            u.spool_dir or settings.data_dir / "spool",
            batch_size=u.batch_size,
            flush_interval_s=u.flush_interval_s,
            max_buffer=u.max_buffer,
        )
        if u.retention_days > 0:
            services.append(UsagePurger(store, u.retention_days * 86_400))
    jobs = job_queue = jobs_options = batches = None
    if validate_job is not None:
        engine = store.engine if isinstance(store, SqlStore) else None
        jobs, job_queue, jobs_options = build_jobs(settings, validate_job, engine)
        batches = BatchService(jobs, store_beside(job_queue))
        readiness["jobs"] = job_queue.check
        optional.add("jobs")  # the job table is the store's database: degraded with it
    if usage is not None:
        readiness["usage"] = _spool_check(usage)
        optional.add("usage")  # records wait in the spool; nothing is lost
    return Runtime(
        gateway=GatewayService(
            catalog,
            router,
            admission,
            metrics,
            cacher,
            prices={d.name: d.price for route in routes for d in route.deployments},
            quota=QuotaGuard(limiter, store, lease_ttl_s=settings.limits.lease_ttl_s, alert=alert),
            selector=build_selector(settings),
            tokens=TokenCounter(),
            usage=usage,
            default_completion_tokens=settings.limits.default_completion_tokens,
        ),
        authenticator=authenticator,
        metrics=metrics,
        store=store,
        limiter=limiter,
        usage=usage,
        jobs=jobs,
        batches=batches,
        job_queue=job_queue,
        jobs_options=jobs_options,
        providers=providers,
        http=http,
        http_options=HttpOptions(
            max_body_bytes=settings.server.max_body_bytes,
            access_log=settings.log.access_log,
        ),
        data_dir=settings.data_dir,
        admin_secret=settings.admin_key.get_secret_value() if settings.admin_key else None,
        readiness=readiness,
        optional_checks=frozenset(optional),
        cache=cacher.cache if cacher is not None else None,
        tracing=tracing,
        services=services,
    )
