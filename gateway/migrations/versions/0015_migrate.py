"""migration tools (issue 16): bulk imports with a cursor per file and the refused
records, what a target in shadow mode would have written, reconciliation runs and
cutover guard breaches

Revision ID: 0015_migrate
Revises: 0014_fhir_face
Create Date: 2026-12-07 14:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision: str = "0015_migrate"
down_revision: str | None = "0014_fhir_face"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "import_jobs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("notify", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("csv_profile", sa.String(length=128), nullable=True),
        sa.Column("read", sa.Integer(), nullable=False),
        sa.Column("mapped", sa.Integer(), nullable=False),
        sa.Column("refused", sa.Integer(), nullable=False),
        sa.Column("duplicate", sa.Integer(), nullable=False),
        sa.Column("suppressed_webhooks", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_jobs")),
    )
    op.create_table(
        "import_files",
        sa.Column("id", BIGINT, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["import_jobs.id"], name=op.f("fk_import_files_job_id_import_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_files")),
    )
    op.create_index(op.f("ix_import_files_job_id"), "import_files", ["job_id"])
    op.create_index(op.f("ix_import_files_sha256"), "import_files", ["sha256"])
    op.create_table(
        "import_refusals",
        sa.Column("id", BIGINT, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("file", sa.String(length=512), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("business_id", sa.String(length=256), nullable=True),
        sa.Column("problems", JSON, nullable=False),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["import_jobs.id"], name=op.f("fk_import_refusals_job_id_import_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_refusals")),
    )
    op.create_index(op.f("ix_import_refusals_job_id"), "import_refusals", ["job_id"])
    op.create_table(
        "shadow_results",
        sa.Column("id", BIGINT, autoincrement=True, nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("delivery_id", BIGINT, nullable=True),
        sa.Column("message_id", sa.String(length=64), nullable=True),
        sa.Column("resource_ref", sa.String(length=128), nullable=False),
        sa.Column("identifier", sa.String(length=512), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("remote_id", sa.String(length=128), nullable=True),
        sa.Column("diff", JSON, nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shadow_results")),
    )
    op.create_index("ix_shadow_results_target", "shadow_results", ["target", "outcome", "id"])
    op.create_table(
        "reconcile_jobs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("summary", JSON, nullable=True),
        sa.Column("items", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconcile_jobs")),
    )
    op.create_table(
        "guard_breaches",
        sa.Column("id", BIGINT, autoincrement=True, nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("guard", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("breached_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_guard_breaches")),
    )
    op.create_index("ix_guard_breaches_open", "guard_breaches", ["target", "guard", "cleared_at"])


def downgrade() -> None:
    op.drop_index("ix_guard_breaches_open", table_name="guard_breaches")
    op.drop_table("guard_breaches")
    op.drop_table("reconcile_jobs")
    op.drop_index("ix_shadow_results_target", table_name="shadow_results")
    op.drop_table("shadow_results")
    op.drop_index(op.f("ix_import_refusals_job_id"), table_name="import_refusals")
    op.drop_table("import_refusals")
    op.drop_index(op.f("ix_import_files_sha256"), table_name="import_files")
    op.drop_index(op.f("ix_import_files_job_id"), table_name="import_files")
    op.drop_table("import_files")
    op.drop_table("import_jobs")
