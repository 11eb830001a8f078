"""authenticated senders and scoped clients: who sent each message and event, and what a
client may send as and see

``inbound_messages.principal`` and ``case_events.principal`` record the authenticated
principal of each message and of each event in a case's history (an API client, an MLLP
client certificate, a verified signature), and ``exceptions.principal`` that of a
refused HL7 v2 message; ``api_clients.partners`` binds a client to the
HL7 v2 partners it may send as, ``api_clients.programs`` limits what it sees to some
programs (NULL: no limit, as before).

Revision ID: 0012_sec_hl7
Revises: 0011_delivery
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision: str = "0012_sec_hl7"
down_revision: str | None = "0011_delivery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("partners", JSON, nullable=True))
        batch_op.add_column(sa.Column("programs", JSON, nullable=True))
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("principal", sa.String(length=256), nullable=True))
    with op.batch_alter_table("case_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("principal", sa.String(length=256), nullable=True))
    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("principal", sa.String(length=256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.drop_column("principal")
    with op.batch_alter_table("case_events", schema=None) as batch_op:
        batch_op.drop_column("principal")
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.drop_column("principal")
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        batch_op.drop_column("programs")
        batch_op.drop_column("partners")
