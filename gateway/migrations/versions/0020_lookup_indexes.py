"""indexes for two lookups that read whole tables

``ix_audit_log_target_mode``: at start-up (and on each profile reload) the gateway reads
the last recorded mode of each EHR target (``entity_type = 'EhrTargetMode'``) newest
first; without an index that is a scan of the audit log, which grows by about nine rows
per intake. A partial index: only those entries are in it, so the other audit writes do
not pay for it.

``ix_exceptions_created_at``: the guards count the exceptions of their window
(``created_at >= since``) on every check.

On a large PostgreSQL database, ``CREATE INDEX`` blocks writes to the table while it
builds; build them beforehand without blocking (docs/DEPLOYMENT.md, "Upgrading") and
this migration finds them there (``IF NOT EXISTS``).

Revision ID: 0020_lookup_indexes
Revises: 0019_reconcile_heartbeat
Create Date: 2026-12-07 20:45:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0020_lookup_indexes"
down_revision: str | None = "0019_reconcile_heartbeat"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX IF NOT EXISTS ix_audit_log_target_mode ON audit_log (entity_id, id)"
        " WHERE entity_type = 'EhrTargetMode'"
    )
    op.execute("CREATE INDEX IF NOT EXISTS ix_exceptions_created_at ON exceptions (created_at)")


def downgrade() -> None:
    op.execute("DROP INDEX ix_exceptions_created_at")
    op.execute("DROP INDEX ix_audit_log_target_mode")
