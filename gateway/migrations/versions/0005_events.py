"""clinical events: FHIR subscriptions, inbox leases, case SLA timers, per-sender event ids

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-23 16:36:59.024219

- ``fhir_subscriptions``: status and event-number tracking per EHR subscription.
- ``inbound_messages``: ``attempts``, ``available_at``, ``locked_until`` (applying after
  the acknowledgement, with a lease and backoff).
- ``cases``: ``sla_due_at``, ``sla_timer``, ``overdue_at``.
- ``case_events``: ``sender``, ``channel``, ``reference``, ``hold_until``; event ids are
  unique per case and *sender* (two pharmacies may both send ``evt_1``); existing rows get
  ``sender = source``.
- ``exceptions``: ``note``, ``retries``; ``subscribers``: ``retry`` (policy).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fhir_subscriptions",
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("subscription", sa.String(length=256), nullable=False),
        sa.Column("topic", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("last_event_number", sa.BigInteger(), nullable=False),
        sa.Column(
            "missing", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("handshake_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_notification_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("target", "subscription", name=op.f("pk_fhir_subscriptions")),
    )
    with op.batch_alter_table("case_events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("sender", sa.String(length=128), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("channel", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("reference", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("hold_until", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE case_events SET sender = source WHERE sender = ''")
    with op.batch_alter_table("case_events", schema=None) as batch_op:
        batch_op.drop_constraint("uq_case_events_dedupe", type_="unique")
        batch_op.create_unique_constraint(
            "uq_case_events_dedupe", ["case_id", "sender", "event_id"]
        )
        batch_op.create_index("ix_case_events_pending", ["outcome", "hold_until"], unique=False)

    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sla_due_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("sla_timer", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("overdue_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_cases_sla_due_at", ["sla_due_at"], unique=False)

    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("note", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("retries", sa.Integer(), server_default="0", nullable=False))

    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("available_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "retry", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.drop_column("retry")

    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.drop_column("locked_until")
        batch_op.drop_column("available_at")
        batch_op.drop_column("attempts")

    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.drop_column("retries")
        batch_op.drop_column("note")

    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_sla_due_at")
        batch_op.drop_column("overdue_at")
        batch_op.drop_column("sla_timer")
        batch_op.drop_column("sla_due_at")

    with op.batch_alter_table("case_events", schema=None) as batch_op:
        batch_op.drop_index("ix_case_events_pending")
        batch_op.drop_constraint("uq_case_events_dedupe", type_="unique")
        batch_op.create_unique_constraint(
            "uq_case_events_dedupe", ["case_id", "source", "event_id"]
        )
        batch_op.drop_column("hold_until")
        batch_op.drop_column("reference")
        batch_op.drop_column("channel")
        batch_op.drop_column("sender")

    op.drop_table("fhir_subscriptions")
