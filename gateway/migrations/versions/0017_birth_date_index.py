"""an index on each Patient's birth date, for merge review's candidate query

``ix_fhir_resources_birth_date`` on ``(resource_type, <the resource's birthDate>)``: the
expression is ``resource ->> 'birthDate'`` on PostgreSQL and
``json_extract(resource, '$.birthDate')`` on SQLite, exactly as the candidate query of
:func:`gateway.patients.review.detect_duplicates` then rendered it (the planners use an
expression index only for the same expression). Since migration 0021 that query reads
``patient_review_features`` instead, and no query uses this index. Without it, every new patient's merge review read the
``birthDate`` of every stored Patient: ingest got slower with each patient stored.

Not declared on the model: autogenerate cannot compare expression indexes.

On a large PostgreSQL table, ``CREATE INDEX`` blocks writes to ``fhir_resources`` while
it builds; build it beforehand without blocking (docs/DEPLOYMENT.md, "Upgrading")::

    CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_fhir_resources_birth_date
        ON fhir_resources (resource_type, (resource ->> 'birthDate'));

and this migration finds it there (``IF NOT EXISTS``).

Revision ID: 0017_birth_date_index
Revises: 0013_console
Create Date: 2026-12-07 16:50:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017_birth_date_index"
down_revision: str | None = "0013_console"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EXPRESSION = {
    "postgresql": "(resource ->> 'birthDate')",
    "sqlite": "json_extract(resource, '$.birthDate')",
}


def upgrade() -> None:
    expression = EXPRESSION[op.get_bind().dialect.name]
    op.execute(
        "CREATE INDEX IF NOT EXISTS ix_fhir_resources_birth_date"
        f" ON fhir_resources (resource_type, {expression})"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix_fhir_resources_birth_date")
