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

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
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
