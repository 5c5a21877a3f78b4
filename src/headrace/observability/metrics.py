"""Prometheus metrics, one registry per application (no module-level state).

Names follow the OpenTelemetry GenAI semantic conventions where one exists
(``gen_ai_client_token_usage``, ``gen_ai_client_operation_duration_seconds``,
``gen_ai_server_time_to_first_token_seconds``) and ``headrace_*`` otherwise.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Overhead is sub-millisecond when healthy; resolve it finely.
_OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.1,
)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class Children(Generic[_Metric]):
    """A labelled metric's children, each made once per label values.

    ``metric.labels(...)`` checks its arguments, builds a key and takes a lock on every call
    (about 2 µs here); a request path that records five labelled figures calls this instead,
    a dictionary lookup. Children are never removed (Headrace removes none), so the cache
    holds what the metric itself holds.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _Metric) -> None:
        self._metric: _Metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """Every metric the gateway exports. Build one per app; tests read ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "headrace_requests", "HTTP requests answered.", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "headrace_request_duration_seconds",
            "Wall time from request start to the last byte sent.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "headrace_overhead_seconds",
            "Gateway time minus upstream time, per request.",
            ["stage"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.active = Gauge("headrace_active_requests", "Requests being served now.", registry=r)
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request by type (input, output).",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Upstream call duration.",
            ["gen_ai_operation_name", "gen_ai_request_model", "error_type"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from request start to the first streamed chunk.",
            ["gen_ai_request_model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )

        self.breaker_state = Gauge(
            "headrace_breaker_state",
            "Circuit breaker per deployment: 0 closed, 1 half-open, 2 open.",
            ["deployment"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "headrace_upstream_errors",
            "Failed upstream attempts by deployment and error class.",
            ["deployment", "error_class"],
            registry=r,
        )
        self.retries = Counter(
            "headrace_retries",
            "Retries started, by the deployment that failed.",
            ["deployment"],
            registry=r,
        )
        self.stream_resumes = Counter(
            "headrace_stream_resumes",
            "Streams cut after output and resumed on a retry, by the deployment that cut.",
            ["deployment"],
            registry=r,
        )
        self.fallbacks = Counter(
            "headrace_fallbacks",
            "Requests moved to a fallback model.",
            ["model", "fallback"],
            registry=r,
        )
        self.shed = Counter(
            "headrace_shed", "Requests refused by admission control.", ["priority"], registry=r
        )
        self.admission_queue = Gauge(
            "headrace_admission_queue", "Requests waiting for a serving slot.", registry=r
        )

        self.cost = Counter(
            "headrace_cost_usd",
            "What answers cost upstream, by API key and model (cache hits cost nothing).",
            ["key", "model"],
            registry=r,
        )
        self.cache_requests = Counter(
            "headrace_cache_requests",
            "Cache lookups by result (hit, miss, bypass).",
            ["result"],
            registry=r,
        )
        self.cache_saved_usd = Counter(
            "headrace_cache_saved_cost_usd", "Upstream cost avoided by cache hits.", registry=r
        )
        self.cache_bytes = Gauge("headrace_cache_bytes", "Bytes held by the cache.", registry=r)
        self.cache_entries = Gauge("headrace_cache_entries", "Entries in the cache.", registry=r)
        self.cache_evictions = Gauge(
            "headrace_cache_evictions",
            "Entries evicted to stay within the size bound.",
            registry=r,
        )

        self.quota_refusals = Counter(
            "headrace_quota_refusals",
            "Requests refused by a key's or team's quota, by scope and limit.",
            ["scope", "limit"],
            registry=r,
        )
        self.usage_records = Gauge(
            "headrace_usage_records",
            "Usage records since start by outcome (written, spooled, replayed, unspooled).",
            ["outcome"],
            registry=r,
        )
        self.usage_pending = Gauge(
            "headrace_usage_pending", "Usage records not yet in the database.", registry=r
        )
        self.usage_spooling = Gauge(
            "headrace_usage_spooling", "1 while usage records go to the spool.", registry=r
        )

        self.queue_depth = Gauge(
            "headrace_queue_depth",
            "Queued jobs per priority class (the signal to scale workers on).",
            ["priority"],
            registry=r,
        )
        self.queue_oldest_age = Gauge(
            "headrace_queue_oldest_age_seconds",
            "Age of the oldest queued job per priority class.",
            ["priority"],
            registry=r,
        )

        # The process as a whole: CPU, memory, and the collector (cli/heap.py tunes it).
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        # Set when the process freezes its heap: gc.get_freeze_count() walks every frozen
        # object (160,000 in a gateway, milliseconds of CPU), too slow for every scrape.
        self.gc_frozen = Gauge(
            "headrace_gc_frozen_objects",
            "Objects in the collector's permanent generation, never walked (server.gc_freeze).",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
