"""inbound_messages: the inbox on the one queue (lease owner, due time, claim index)

The inbox of clinical events is claimed by the same queue code as the outbox
(``gateway.queue``): a lease now has an owner (``locked_by``), so a process that lost its
lease cannot overwrite the outcome of the one that took over, and every waiting message
has a due time (``available_at``; existing rows get their ``received_at``). The partial
index ``ix_inbound_messages_due`` holds only the waiting (``received``) messages in due
order, so a claim reads the first few instead of scanning the inbox.

Revision ID: 0009_inbox_queue
Revises: 0008_delivery_due_index
Create Date: 2026-11-25 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_inbox_queue"
down_revision: str | None = "0008_delivery_due_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RECEIVED = sa.text("status = 'received'")


def upgrade() -> None:
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("locked_by", sa.String(length=128), nullable=True))
    op.execute("UPDATE inbound_messages SET available_at = received_at WHERE available_at IS NULL")
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_inbound_messages_due",
            ["available_at", "received_at"],
            unique=False,
            postgresql_where=RECEIVED,
            sqlite_where=RECEIVED,
        )


def downgrade() -> None:
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_inbound_messages_due")
        batch_op.drop_column("locked_by")
