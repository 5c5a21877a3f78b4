"""Feedback on answers: the ``feedback`` table, and usage records found by request id.

``POST /v1/feedback`` checks that the request it is about is one of the caller's team's, in
``usage_records`` by ``request_id``: hence that index. On a large ``usage_records`` this
migration takes a while (PostgreSQL builds the index under a lock that holds inserts back; the
usage writer spools meanwhile and replays after).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_usage_records_request_id", "usage_records", ["request_id"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("label", sa.Text, nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("metadata", sa.Text, nullable=False),
    )
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])
    op.create_index("ix_feedback_team_id_created_at", "feedback", ["team_id", "created_at"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_index("ix_usage_records_request_id", "usage_records")
