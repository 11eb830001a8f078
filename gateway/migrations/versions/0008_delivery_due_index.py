"""deliveries: a partial index of the pending rows in claim order (kind, target, due time)

The claim takes a target's pending rows in ``(available_at, id)`` order. The existing
``ix_deliveries_claim`` (status, available_at) does not lead with the target and keeps
every delivered row; this one holds only pending rows, so a claim reads the first few due
rows of its target in order instead of sorting the whole backlog.

Revision ID: 0008_delivery_due_index
Revises: 0007
Create Date: 2026-11-23 19:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_delivery_due_index"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_due",
            ["kind", "target", "available_at", "id"],
            unique=False,
            postgresql_where=PENDING,
            sqlite_where=PENDING,
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_due")
