"""patient_review_features: what duplicate review compares of each stored Patient

A new patient is scored against the stored Patients born on the same date or a typo of
it (``gateway.patients.review``). Until now each candidate was read from
``fhir_resources`` as JSON and normalized again for every new patient: with tens of
thousands of patients that was most of an intake's CPU (docs/PERFORMANCE.md). This table
holds each Patient's normalized name, birth date, phone, email and address
(``PatientFeatures.row_of``), written with the Patient from now
on; this migration fills it from the Patients stored so far, 1,000 at a time. A Patient
that a process of the previous release registers after this migration (a rolling
deploy) gets no row: ``fhir-gateway db review-features`` adds the missing ones.

Revision ID: 0021_patient_review_features
Revises: 0020_lookup_indexes
Create Date: 2026-12-07 23:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from gateway.db.identity_models import PatientFeatures
from gateway.db.types import JSONDoc

revision: str = "0021_patient_review_features"
down_revision: str | None = "0020_lookup_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 1000


def upgrade() -> None:
    table = op.create_table(
        "patient_review_features",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("birth_date", sa.Text(), nullable=False),
        sa.Column("family", sa.Text(), nullable=False),
        sa.Column("given", sa.Text(), nullable=False),
        sa.Column("phone", sa.Text(), nullable=True),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("address_line", sa.Text(), nullable=True),
        sa.Column("postal_code", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("patient_id", name=op.f("pk_patient_review_features")),
    )
    op.create_index(
        "ix_patient_review_features_birth_date",
        "patient_review_features",
        ["birth_date"],
        unique=False,
    )
    resources = sa.table(
        "fhir_resources",
        sa.column("resource_type", sa.String()),
        sa.column("id", sa.String()),
        sa.column("resource", JSONDoc),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    bind = op.get_bind()
    last = ""
    while True:  # keyset pages: a large table is not held in memory
        page = bind.execute(
            sa.select(resources.c.id, resources.c.resource, resources.c.updated_at)
            .where(resources.c.resource_type == "Patient", resources.c.id > last)
            .order_by(resources.c.id)
            .limit(_CHUNK)
        ).all()
        if not page:
            break
        last = page[-1][0]
        rows = []
        for patient_id, resource, updated_at in page:
            row = PatientFeatures.row_of(dict(resource, id=patient_id), now=updated_at)
            if row is not None:  # this revision's columns only: the model may grow later
                rows.append({c.key: row[c.key] for c in table.c})
        if rows:
            bind.execute(table.insert(), rows)


def downgrade() -> None:
    op.drop_index("ix_patient_review_features_birth_date", table_name="patient_review_features")
    op.drop_table("patient_review_features")
