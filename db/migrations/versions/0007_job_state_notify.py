"""PostgreSQL: a NOTIFY on channel convoy_job_state (payload: the job id) whenever a job's
state changes, so the API can wake a long-polling GET or an event stream at once instead of
polling the row (api/jobwait.py). Delivered at commit; SQLite has no equivalent (no-op).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 01:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

CHANNEL = "convoy_job_state"  # api.jobwait.CHANNEL


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""
        CREATE FUNCTION convoy_notify_job_state() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', NEW.id);
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER jobs_state_notify AFTER UPDATE OF state ON jobs FOR EACH ROW
        WHEN (OLD.state IS DISTINCT FROM NEW.state)
        EXECUTE FUNCTION convoy_notify_job_state()""")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_state_notify ON jobs")
    op.execute("DROP FUNCTION IF EXISTS convoy_notify_job_state()")
