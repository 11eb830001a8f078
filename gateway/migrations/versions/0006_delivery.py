"""delivery: signing keys, per-kind target state (circuit, throttling, rate bucket), token
errors, replay and review columns

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 16:30:31.916653
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(length=128), nullable=False),
        sa.Column("alg", sa.String(length=16), nullable=False),
        sa.Column("private_key", sa.Text(), nullable=False),
        sa.Column("encrypted", sa.Boolean(), nullable=False),
        sa.Column("public_jwk", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activates_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_signing_keys")),
    )
    with op.batch_alter_table("signing_keys", schema=None) as batch_op:
        batch_op.create_index("ix_signing_keys_alg", ["alg", "activates_at"], unique=False)

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("review", JSON, nullable=True))

    with op.batch_alter_table("oauth_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error_kind", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("signed_with_kid", sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column("refresh_lease_until", sa.DateTime(timezone=True), nullable=True)
        )

    # target_states is keyed by (kind, target) from now on: an ops webhook subscriber may
    # share a name with an EHR target.
    with op.batch_alter_table("target_states", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="ehr")
        )
        batch_op.add_column(
            sa.Column("probe_failures", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("throttled_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("rate_tokens", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("rate_updated_s", sa.Float(), nullable=True))
        batch_op.drop_constraint("pk_target_states", type_="primary")
        batch_op.create_primary_key("pk_target_states", ["kind", "target"])
    with op.batch_alter_table("target_states", schema=None) as batch_op:
        batch_op.alter_column("kind", server_default=None)
        batch_op.alter_column("probe_failures", server_default=None)


def downgrade() -> None:
    op.execute("DELETE FROM target_states WHERE kind <> 'ehr'")
    with op.batch_alter_table("target_states", schema=None) as batch_op:
        batch_op.drop_constraint("pk_target_states", type_="primary")
        batch_op.create_primary_key("pk_target_states", ["target"])
        batch_op.drop_column("rate_updated_s")
        batch_op.drop_column("rate_tokens")
        batch_op.drop_column("throttled_until")
        batch_op.drop_column("probe_failures")
        batch_op.drop_column("kind")

    with op.batch_alter_table("oauth_tokens", schema=None) as batch_op:
        batch_op.drop_column("refresh_lease_until")
        batch_op.drop_column("signed_with_kid")
        batch_op.drop_column("error_kind")

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("review")
        batch_op.drop_column("replayed_at")

    with op.batch_alter_table("signing_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_signing_keys_alg")
    op.drop_table("signing_keys")
