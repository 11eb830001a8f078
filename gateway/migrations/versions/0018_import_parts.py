"""import files read in parts, by several processes; the run that owns an import job

``import_files.start_offset`` / ``stop_offset``: the byte range of the file a row
covers (``stop_offset`` NULL: to the end). ``fhir-gateway import --workers N`` splits each
NDJSON file into N ranges at line starts, one row each, so N processes import one file
side by side, each resuming at its own cursor. A row of a file read whole covers
``[0, NULL)``, as every row did before.

``import_jobs.runner``: the token of the run that owns the job (a fencing token: a batch
commits only while the job still names its run), so a job resumed elsewhere stops the
run it replaced instead of running twice.

Revision ID: 0018_import_parts
Revises: 0017_birth_date_index
Create Date: 2026-12-07 17:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018_import_parts"
down_revision: str | None = "0017_birth_date_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("import_files") as batch:
        batch.add_column(
            sa.Column("start_offset", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("stop_offset", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("import_jobs") as batch:
        batch.add_column(sa.Column("runner", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("import_jobs") as batch:
        batch.drop_column("runner")
    with op.batch_alter_table("import_files") as batch:
        batch.drop_column("stop_offset")
        batch.drop_column("start_offset")
