"""FHIR face: SMART Backend Services clients and tokens, patient merge review

``api_clients.jwks`` / ``jwks_url``: the public keys a SMART backend client signs its
assertions with; ``access_tokens``: the tokens ``POST /oauth/token`` issued (hashed);
``assertion_jtis``: assertion ids seen until they expire (replay protection);
``patient_reviews``: probable duplicate Patients, scored, waiting for a person or linked.

Revision ID: 0014_fhir_face
Revises: 0016_newcomer
Create Date: 2026-12-07 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision: str = "0014_fhir_face"
down_revision: str | None = "0016_newcomer"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("jwks", JSON, nullable=True))
        batch_op.add_column(sa.Column("jwks_url", sa.Text(), nullable=True))
    op.create_table(
        "access_tokens",
        sa.Column("token_id", sa.String(length=32), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.BigInteger(), nullable=False),
        sa.Column("scopes", JSON, nullable=False),
        sa.Column("resource_types", JSON, nullable=True),
        sa.Column("granted", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["api_clients.id"],
            name=op.f("fk_access_tokens_client_id_api_clients"),
        ),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_access_tokens")),
    )
    op.create_index(
        op.f("ix_access_tokens_client_id"), "access_tokens", ["client_id"], unique=False
    )
    op.create_table(
        "assertion_jtis",
        sa.Column("client_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("jti", sa.String(length=256), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("client_id", "jti", name=op.f("pk_assertion_jtis")),
    )
    op.create_index(
        op.f("ix_assertion_jtis_expires_at"), "assertion_jtis", ["expires_at"], unique=False
    )
    op.create_table(
        "patient_reviews",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("candidate_id", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("parts", JSON, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_reviews")),
        sa.UniqueConstraint("patient_id", "candidate_id", name="uq_patient_reviews_pair"),
    )
    op.create_index(
        op.f("ix_patient_reviews_patient_id"), "patient_reviews", ["patient_id"], unique=False
    )
    op.create_index(
        op.f("ix_patient_reviews_candidate_id"),
        "patient_reviews",
        ["candidate_id"],
        unique=False,
    )
    op.create_index("ix_patient_reviews_status", "patient_reviews", ["status"], unique=False)


def downgrade() -> None:
    op.drop_table("patient_reviews")
    op.drop_table("assertion_jtis")
    op.drop_table("access_tokens")
    with op.batch_alter_table("api_clients", schema=None) as batch_op:
        batch_op.drop_column("jwks_url")
        batch_op.drop_column("jwks")
