"""Jobs: the durable job queue, its events, idempotency keys and the webhook outbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def _where_status(status: str, extra: str = "") -> dict[str, Any]:  # dialect kwargs: **Any
    predicate = f"status = '{status}'{extra}"
    return {"postgresql_where": sa.text(predicate), "sqlite_where": sa.text(predicate)}


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(64), nullable=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("priority_rank", sa.Integer, nullable=False),
        sa.Column("fair_seq", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("run_after", sa.Float, nullable=False),
        sa.Column("deadline_at", sa.Float, nullable=True),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("result", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("errors", sa.Text, nullable=False),
        sa.Column("cost_micro_usd", sa.BigInteger, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("webhook_url", sa.Text, nullable=True),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("idempotency_key", sa.Text, nullable=True),
        sa.Column("lease_owner", sa.Text, nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
        sa.Column("event_seq", sa.Integer, nullable=False),
    )
    # Partial indexes, one per state the queue searches (see headrace.store.schema).
    op.create_index(
        "ix_jobs_claim",
        "jobs",
        [sa.text("priority_rank DESC"), "fair_seq", "created_at"],
        **_where_status("queued"),
    )
    op.create_index(
        "ix_jobs_tenant_queue",
        "jobs",
        ["tenant", "priority_rank", "fair_seq"],
        **_where_status("queued"),
    )
    op.create_index(
        "ix_jobs_queued_deadline_at",
        "jobs",
        ["deadline_at"],
        **_where_status("queued", " AND deadline_at IS NOT NULL"),
    )
    op.create_index(
        "ix_jobs_running_lease_expires_at",
        "jobs",
        ["lease_expires_at"],
        **_where_status("running"),
    )
    op.create_index("ix_jobs_dead_finished_at", "jobs", ["finished_at"], **_where_status("dead"))
    op.create_index("ix_jobs_team_id_created_at", "jobs", ["team_id", "created_at"])
    op.create_index("ix_jobs_key_id_created_at", "jobs", ["key_id", "created_at"])
    op.create_index("ix_jobs_batch_id", "jobs", ["batch_id"])

    op.create_table(
        "job_events",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "seq", name="pk_job_events"),
    )

    op.create_table(
        "job_idempotency",
        sa.Column("scope", sa.String(64), nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("body_hash", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name="pk_job_idempotency"),
    )
    op.create_index("ix_job_idempotency_job_id", "job_idempotency", ["job_id"])

    op.create_table(
        "webhook_outbox",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("leased_until", sa.Float, nullable=True),
        sa.Column("done", sa.Boolean, nullable=False),
    )
    op.create_index("ix_webhook_outbox_due", "webhook_outbox", ["done", "next_attempt_at"])
    op.create_index("ix_webhook_outbox_job_id", "webhook_outbox", ["job_id"])

    op.create_table(
        "webhook_deliveries",
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("event_id", "attempt", name="pk_webhook_deliveries"),
    )


def downgrade() -> None:
    # Dropping a table drops its indexes.
    for table in ("webhook_deliveries", "webhook_outbox", "job_idempotency", "job_events", "jobs"):
        op.drop_table(table)
