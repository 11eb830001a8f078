"""reconciliation jobs say which process runs them and when it last showed life

``reconcile_jobs.runner``: the process running the job (``host:pid``);
``reconcile_jobs.heartbeat_at``: renewed while it runs. A job still ``running`` whose
heartbeat (or, for a job started before this revision, its creation) is older than
``gateway.ops.reconcile.STALE_AFTER_S`` lost its process to a restart or a crash and is
shown ``failed`` (``interrupted``) instead of running forever.

Revision ID: 0019_reconcile_heartbeat
Revises: 0018_import_parts
Create Date: 2026-12-07 20:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019_reconcile_heartbeat"
down_revision: str | None = "0018_import_parts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reconcile_jobs") as batch:
        batch.add_column(sa.Column("runner", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reconcile_jobs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("runner")
