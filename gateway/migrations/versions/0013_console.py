"""the ops console: staff accounts and their sessions, exception owners, paused targets

``staff_users`` are the people who sign in to ``/console`` (argon2id password hashes,
a role), ``staff_sessions`` their server-side sessions (the SHA-256 of the cookie's
token, the CSRF token of the forms, the last time seen for idle expiry).
``exceptions.assigned_to`` / ``assigned_at``: who owns an exception now;
``exceptions.escalated_at``: when it was escalated past its SLA.
``target_states.paused_at`` / ``paused_by`` / ``pause_reason``: a target paused by a
person (no delivery is claimed for it until resumed). ``ix_deliveries_delivered_at``
(partial, delivered rows): the console's deliveries per minute and 24-hour sparkline.

Revision ID: 0013_console
Revises: 0015_migrate
Create Date: 2026-12-07 14:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_console"
down_revision: str | None = "0015_migrate"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
DELIVERED = sa.text("status = 'delivered'")


def upgrade() -> None:
    op.create_table(
        "staff_users",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=True),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_staff_users")),
        sa.UniqueConstraint("username", name=op.f("uq_staff_users_username")),
    )
    op.create_table(
        "staff_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("staff_id", sa.BigInteger(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["staff_id"],
            ["staff_users.id"],
            name=op.f("fk_staff_sessions_staff_id_staff_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_staff_sessions")),
    )
    op.create_index(
        op.f("ix_staff_sessions_staff_id"), "staff_sessions", ["staff_id"], unique=False
    )
    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("assigned_to", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("escalated_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_deliveries_delivered_at",
        "deliveries",
        ["delivered_at"],
        unique=False,
        postgresql_where=DELIVERED,
        sqlite_where=DELIVERED,
    )
    with op.batch_alter_table("target_states", schema=None) as batch_op:
        batch_op.add_column(sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("paused_by", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("pause_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_index("ix_deliveries_delivered_at", table_name="deliveries")
    with op.batch_alter_table("target_states", schema=None) as batch_op:
        batch_op.drop_column("pause_reason")
        batch_op.drop_column("paused_by")
        batch_op.drop_column("paused_at")
    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.drop_column("escalated_at")
        batch_op.drop_column("assigned_at")
        batch_op.drop_column("assigned_to")
    op.drop_index(op.f("ix_staff_sessions_staff_id"), table_name="staff_sessions")
    op.drop_table("staff_sessions")
    op.drop_table("staff_users")
