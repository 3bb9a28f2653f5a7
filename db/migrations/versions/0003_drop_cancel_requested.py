"""drop jobs.cancel_requested: written on cancel, never read (the state says it)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite drops a column by copying the table
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_requested")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cancel_requested", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
