"""PostgreSQL: the job-state NOTIFY (migration 0007) carries the new state after the job id
("<id> <state>"), so a waiter that only cares how a job ends (GET /v1/jobs/{id}?wait_seconds=)
is not woken, to read the row again, when the job starts running (api/jobwait.py).
SQLite: no-op. Deploy the API before migrating: the API reads both payloads, an older API
takes "<id> <state>" for an id and its waiters fall back to re-reading every few seconds.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 14:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CHANNEL = "convoy_job_state"  # api.jobwait.CHANNEL


def _function(payload: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION convoy_notify_job_state() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', {payload});
            RETURN NULL;
        END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_function("NEW.id || ' ' || NEW.state"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_function("NEW.id"))
