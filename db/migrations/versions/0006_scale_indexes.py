"""indexes that keep the hot paths flat as the tables grow (issue 22): a tenant's jobs by
state, open attempts, artifacts by tenant

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_tenant_state_created", "jobs",
                    ["tenant", "state", "created_at", "id"])
    op.create_index("ix_job_attempts_open", "job_attempts", ["started_at"],
                    postgresql_where=sa.text("ended_at IS NULL"),
                    sqlite_where=sa.text("ended_at IS NULL"))
    op.create_index("ix_artifacts_tenant_size", "artifacts", ["tenant", "size"])


def downgrade() -> None:
    op.drop_index("ix_artifacts_tenant_size", table_name="artifacts")
    op.drop_index("ix_job_attempts_open", table_name="job_attempts")
    op.drop_index("ix_jobs_tenant_state_created", table_name="jobs")
