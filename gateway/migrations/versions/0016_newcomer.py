"""grouped refusals: repeated 400/415/422 of one client for one reason are one exception

``exceptions.group_key`` names the group (channel, sender, status and problem codes),
``occurrences`` counts the refusals and ``last_seen_at`` is the latest; every refused
payload is kept whole in ``exception_payloads`` (``seq`` 1 the first). Rows written
before are groups of one (``occurrences`` 1, their payload on the exception).

Revision ID: 0016_newcomer
Revises: 0012_sec_hl7
Create Date: 2026-12-07 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016_newcomer"
down_revision: str | None = "0012_sec_hl7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group_key", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("occurrences", sa.Integer(), server_default="1", nullable=False)
        )
        batch_op.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_exceptions_group", ["group_key", "status"], unique=False)
    op.create_table(
        "exception_payloads",
        sa.Column("id", BIGINT, autoincrement=True, nullable=False),
        sa.Column("exception_id", BIGINT, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.String(length=128), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["exception_id"],
            ["exceptions.id"],
            name=op.f("fk_exception_payloads_exception_id_exceptions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exception_payloads")),
        sa.UniqueConstraint(
            "exception_id", "seq", name=op.f("uq_exception_payloads_exception_id_seq")
        ),
    )


def downgrade() -> None:
    op.drop_table("exception_payloads")
    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.drop_index("ix_exceptions_group")
        batch_op.drop_column("last_seen_at")
        batch_op.drop_column("occurrences")
        batch_op.drop_column("group_key")
