"""The store's tables (SQLAlchemy Core), as the Alembic migrations leave them at head.

The migrations in :mod:`headrace.store.migrations` are the source of truth for the database;
this module is the same schema as Python objects for the queries (and for
``alembic revision --autogenerate``). A test checks the two agree.

Conventions: ids are short strings; times are unix seconds (UTC) as floats; money is integer
micro-dollars in BigInteger columns; mappings are JSON in text columns. Strings a client
controls (model names, errors) are unbounded ``Text`` so that one odd request cannot make a
whole usage batch fail.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()


def _quota_columns() -> list[Column[object]]:
    """The columns of :class:`headrace.domain.Quota`; NULL means no limit of that kind."""
    return [
        Column("rpm", Integer, nullable=True),
        Column("tpm", Integer, nullable=True),
        Column("max_parallel", Integer, nullable=True),
        Column("budget_micro_usd", BigInteger, nullable=True),
        Column("budget_period", String(16), nullable=False, server_default="month"),
        Column("soft_budget_ratio", Float, nullable=True),
    ]


teams = Table(
    "teams",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("organization", String(200), nullable=False, server_default=""),
    *_quota_columns(),
    Column("metadata", Text, nullable=False, server_default="{}"),
    Column("created_at", Float, nullable=False),
)

# The columns up to ``metadata`` are the pre-Alembic table (revision 0001), unchanged.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("prefix", String(32), nullable=False),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("team_id", String(64), nullable=True),
    Column("allowed_models", Text, nullable=False),
    Column("revoked", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("metadata", Text, nullable=False),
    Column("user", String(200), nullable=True),
    *_quota_columns(),
    Column("expires_at", Float, nullable=True),
    Index("ix_api_keys_team_id", "team_id"),
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("request_id", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("operation", String(32), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("team_id", String(64), nullable=True),
    Column("model", Text, nullable=False),
    Column("requested_model", Text, nullable=False),
    Column("deployment", Text, nullable=True),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("cost_micro_usd", BigInteger, nullable=False),
    Column("baseline_cost_micro_usd", BigInteger, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("status", Integer, nullable=False),
    Column("error", Text, nullable=True),
    Column("cache_hit", Boolean, nullable=False),
    Column("degraded", Boolean, nullable=False),
    Column("stream", Boolean, nullable=False),
    Index("ix_usage_records_created_at", "created_at"),
    Index("ix_usage_records_team_id_created_at", "team_id", "created_at"),
    Index("ix_usage_records_request_id", "request_id"),  # revision 0006: feedback's lookup
)

# Feedback on answers (revision 0006): who gave it, about which request (a usage record's
# request_id, of the same team), and what they said.
feedback = Table(
    "feedback",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("request_id", Text, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("team_id", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("score", Float, nullable=True),
    Column("label", Text, nullable=True),
    Column("comment", Text, nullable=True),
    Column("metadata", Text, nullable=False),
    Index("ix_feedback_request_id", "request_id"),
    Index("ix_feedback_team_id_created_at", "team_id", "created_at"),
)

# One row per (UTC day, key, team, model); team_id is '' for "no team" so that it can be part
# of the primary key. Every counter is BigInteger: a day of tokens overflows 32 bits.
usage_daily = Table(
    "usage_daily",
    metadata,
    Column("day", String(10), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("team_id", String(64), nullable=False),
    Column("model", String(255), nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("cost_micro_usd", BigInteger, nullable=False),
    Column("baseline_cost_micro_usd", BigInteger, nullable=False),
    Column("cache_hits", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    PrimaryKeyConstraint("day", "key_id", "team_id", "model", name="pk_usage_daily"),
)

# -- jobs (revision 0003) -------------------------------------------------------------------
# The durable job queue (headrace.queue.sql). ``tenant`` is the fairness group: the team, or
# the key for a key without a team. ``fair_seq`` is the job's virtual-time tag inside its
# priority (see the queue's docstring). ``event_seq`` is the seq of the job's last event, so
# the next event's seq comes from the same UPDATE that changes the job (no MAX(), no race).
#
# The worker-side indexes are partial, one per state the queue searches (queued, running,
# dead): each holds only the rows in that state, so the claim reads the queue itself however
# many finished jobs the table keeps, and no index on ``status`` can tempt the planner into
# sorting the whole queue when its statistics are stale. Queries must spell the state as a
# literal (``status = 'queued'``), not a bound parameter, for the planner to use them.
jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("body", Text, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("team_id", String(64), nullable=True),
    Column("tenant", String(64), nullable=False),
    Column("priority", String(16), nullable=False),
    Column("priority_rank", Integer, nullable=False),
    Column("fair_seq", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("run_after", Float, nullable=False),
    Column("deadline_at", Float, nullable=True),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("result", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("errors", Text, nullable=False),
    Column("cost_micro_usd", BigInteger, nullable=False),
    Column("metadata", Text, nullable=False),
    Column("webhook_url", Text, nullable=True),
    Column("batch_id", String(64), nullable=True),
    Column("idempotency_key", Text, nullable=True),
    Column("lease_owner", Text, nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("event_seq", Integer, nullable=False),
    Column("traceparent", Text, nullable=True),  # revision 0005: the submitting request's span
    Index("ix_jobs_team_id_created_at", "team_id", "created_at"),
    Index("ix_jobs_key_id_created_at", "key_id", "created_at"),
    Index("ix_jobs_batch_id", "batch_id"),
)


def _where_status(status: str, extra: str = "") -> dict[str, Any]:  # dialect kwargs: **Any
    predicate = f"status = '{status}'{extra}"
    return {"postgresql_where": text(predicate), "sqlite_where": text(predicate)}


# In the claim's order: ``ORDER BY priority_rank DESC, fair_seq, created_at LIMIT n``.
Index(
    "ix_jobs_claim",
    jobs.c.priority_rank.desc(),
    jobs.c.fair_seq,
    jobs.c.created_at,
    **_where_status("queued"),
)
Index(
    "ix_jobs_tenant_queue",
    jobs.c.tenant,
    jobs.c.priority_rank,
    jobs.c.fair_seq,
    **_where_status("queued"),
)
# Only jobs that have a deadline: the claim (which does not say ``deadline_at IS NOT NULL``)
# cannot use it, so it never competes with ix_jobs_claim for the claim query.
Index(
    "ix_jobs_queued_deadline_at",
    jobs.c.deadline_at,
    **_where_status("queued", " AND deadline_at IS NOT NULL"),
)
Index("ix_jobs_running_lease_expires_at", jobs.c.lease_expires_at, **_where_status("running"))
Index("ix_jobs_dead_finished_at", jobs.c.finished_at, **_where_status("dead"))

job_events = Table(
    "job_events",
    metadata,
    Column("job_id", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("at", Float, nullable=False),
    Column("detail", Text, nullable=False),
    PrimaryKeyConstraint("job_id", "seq", name="pk_job_events"),
)

# Idempotency-Key records: the primary key is what makes concurrent duplicates create one job.
job_idempotency = Table(
    "job_idempotency",
    metadata,
    Column("scope", String(64), nullable=False),
    Column("key", Text, nullable=False),
    Column("body_hash", String(64), nullable=False),
    Column("job_id", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
    PrimaryKeyConstraint("scope", "key", name="pk_job_idempotency"),
    Index("ix_job_idempotency_job_id", "job_id"),
)

webhook_outbox = Table(
    "webhook_outbox",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("job_id", String(64), nullable=False),
    Column("url", Text, nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("leased_until", Float, nullable=True),
    Column("done", Boolean, nullable=False),
    Index("ix_webhook_outbox_due", "done", "next_attempt_at"),
    Index("ix_webhook_outbox_job_id", "job_id"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("event_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("error", Text, nullable=True),
    PrimaryKeyConstraint("event_id", "attempt", name="pk_webhook_deliveries"),
)

# -- files and batches (revision 0004) ------------------------------------------------------
# The OpenAI Batch API (headrace.queue.batches_sql). A file's bytes live in the row
# (``content``: BLOB on SQLite, BYTEA on PostgreSQL). An upload is one HTTP request body, so
# ``server.max_body_bytes`` (8 MiB by default) bounds a file, and a batch's output file is
# written in one transaction: fine for the embedded default and for batches of thousands of
# requests; batches of hundreds of megabytes want object storage instead.
files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("team_id", String(64), nullable=True),
    Column("key_id", String(64), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("content", LargeBinary, nullable=False),
    Index("ix_files_team_id_created_at", "team_id", "created_at"),
    Index("ix_files_key_id_created_at", "key_id", "created_at"),
)

# One row per batch; its requests are jobs (``jobs.batch_id``). ``request_counts`` are the
# counts last computed from those jobs; ``errors`` (JSON list of OpenAI batch errors) and
# ``usage`` (JSON, OpenAI's batch usage) are set when the batch fails or ends.
batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("team_id", String(64), nullable=True),
    Column("key_id", String(64), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("in_progress_at", Float, nullable=True),
    Column("finalizing_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("failed_at", Float, nullable=True),
    Column("expired_at", Float, nullable=True),
    Column("cancelling_at", Float, nullable=True),
    Column("cancelled_at", Float, nullable=True),
    Column("expires_at", Float, nullable=False),
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("metadata", Text, nullable=False),
    Column("errors", Text, nullable=True),
    Column("usage", Text, nullable=True),
    Index("ix_batches_team_id_created_at", "team_id", "created_at"),
    Index("ix_batches_key_id_created_at", "key_id", "created_at"),
)
