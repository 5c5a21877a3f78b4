"""Jobs remember the trace they were submitted in: ``jobs.traceparent``.

A job's runs are traces of their own, each linked to the span of the request that submitted
it (W3C ``traceparent``, null when tracing was off). A nullable column: no rewrite of the
table, and the release before this one ignores it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("traceparent", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "traceparent")
