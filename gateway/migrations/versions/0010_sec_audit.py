"""audit_log as IHE BALP AuditEvents in a hash chain; secrets encrypted at rest

``audit_log`` gets the columns of a BALP AuditEvent (the FHIR action code, outcome, the
agent's kind, API client id and network address, the Patient) and the hash chain's
columns (``seq``, ``prev_hash``, ``hash``; NULL until the sealer chains the entry), with
indexes for the searches of ``GET /fhir/AuditEvent`` (by patient, by agent, by date) and a
partial index of the entries not chained yet. ``audit_chain`` holds the chain's head and
the anchor retention leaves. Existing entries get ``code`` C for ``create``, U for
``update``, E otherwise, and are chained by the first seal like new ones.

Secrets at rest: the secret columns keep their type (text). Values written from now on
with a key encryption key are ``enc:v1:`` envelopes; values already stored in plaintext
(and Fernet-encrypted private keys) are still read as they are until
``fhir-gateway keys rotate-kek`` re-encrypts them; a data migration cannot, since the key
is not the database's to know.

Revision ID: 0010_sec_audit
Revises: 0009_inbox_queue
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_sec_audit"
down_revision: str | None = "0009_inbox_queue"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNSEALED = sa.text("seq IS NULL")
GENESIS = "0" * 64


def upgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("code", sa.String(length=1), server_default="E", nullable=False)
        )
        batch_op.add_column(
            sa.Column("outcome", sa.String(length=2), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("agent_kind", sa.String(length=16), server_default="system", nullable=False)
        )
        batch_op.add_column(sa.Column("client_id", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("source_address", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("patient_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("query", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint("uq_audit_log_seq", ["seq"])
        batch_op.create_index("ix_audit_log_patient", ["patient_id", "at"], unique=False)
        batch_op.create_index("ix_audit_log_actor", ["actor", "at"], unique=False)
        batch_op.create_index("ix_audit_log_at", ["at"], unique=False)
        batch_op.create_index(
            "ix_audit_log_unsealed",
            ["id"],
            unique=False,
            postgresql_where=UNSEALED,
            sqlite_where=UNSEALED,
        )
    op.execute("UPDATE audit_log SET code = 'C' WHERE action = 'create'")
    op.execute("UPDATE audit_log SET code = 'U' WHERE action = 'update'")
    op.execute("UPDATE audit_log SET agent_kind = 'client' WHERE actor NOT IN ('cli', 'worker')")
    chain = op.create_table(
        "audit_chain",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.Column("anchor_seq", sa.BigInteger(), nullable=False),
        sa.Column("anchor_hash", sa.String(length=64), nullable=False),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_chain")),
    )
    op.bulk_insert(
        chain,
        [{"id": 1, "last_seq": 0, "last_hash": GENESIS, "anchor_seq": 0, "anchor_hash": GENESIS}],
    )


def downgrade() -> None:
    op.drop_table("audit_chain")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_unsealed")
        batch_op.drop_index("ix_audit_log_at")
        batch_op.drop_index("ix_audit_log_actor")
        batch_op.drop_index("ix_audit_log_patient")
        batch_op.drop_constraint("uq_audit_log_seq", type_="unique")
        for column in (
            "hash",
            "prev_hash",
            "seq",
            "query",
            "patient_id",
            "source_address",
            "client_id",
            "agent_kind",
            "outcome",
            "code",
        ):
            batch_op.drop_column(column)
