"""target_states: the circuit breaker's failure-rate window, half-open trials and reason

Issue 17: the circuit opens on the share of transient failures over a sliding window
(a two-bucket sliding-window counter: this window's and the previous one's calls and
failures), half-open admits a few trial deliveries and counts their results, and the
reason the circuit opened is kept for ``GET /v1/ops/targets``. Every new column has a
server default (or is nullable), so code that does not know them keeps working.

Revision ID: 0011_delivery
Revises: 0010_sec_audit
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_delivery"
down_revision: str | None = "0010_sec_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = (
    "window_calls",
    "window_failures",
    "prev_window_calls",
    "prev_window_failures",
    "trial_successes",
    "trial_failures",
)


def upgrade() -> None:
    with op.batch_alter_table("target_states", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("window_started_at", sa.DateTime(timezone=True), nullable=True)
        )
        for name in COUNTERS:
            batch_op.add_column(
                sa.Column(name, sa.Integer(), nullable=False, server_default=sa.text("0"))
            )
        batch_op.add_column(sa.Column("open_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("target_states", schema=None) as batch_op:
        batch_op.drop_column("open_reason")
        for name in reversed(COUNTERS):
            batch_op.drop_column(name)
        batch_op.drop_column("window_started_at")
