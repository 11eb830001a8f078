"""api_clients.event_sources: the senders a client may send clinical events as

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 18:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "event_sources",
                sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        batch_op.drop_column("event_sources")
