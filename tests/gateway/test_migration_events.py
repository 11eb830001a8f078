"""The issue-5 migration (0005) goes down and up again on SQLite and PostgreSQL, and the
schema still matches the models (tests/gateway/db/test_migrations.py checks the head)."""

from __future__ import annotations

import warnings
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import JSON

from gateway.db.engine import make_engine
from gateway.db.migrate import EXPRESSION_INDEX_SKIPPED, include_object, upgrade
from gateway.db.models import Base
from gateway.db.types import UTCDateTime


def _diff(connection: Any) -> list[Any]:
    def compare_type(
        _ctx: Any, _inspected_col: Any, _metadata_col: Any, _inspected: Any, metadata: Any
    ) -> bool | None:
        # The portable column types render as plain types in migrations (env.py).
        if isinstance(metadata, UTCDateTime | JSON):
            return False
        return None

    context = MigrationContext.configure(
        connection, opts={"compare_type": compare_type, "include_object": include_object}
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EXPRESSION_INDEX_SKIPPED)
        return list(compare_metadata(context, Base.metadata))


async def test_downgrade_and_upgrade_again(database_url: str) -> None:
    import asyncio

    await asyncio.to_thread(_down_up, database_url)
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


def _down_up(database_url: str) -> None:
    from alembic import command

    from gateway.db.migrate import alembic_config

    command.downgrade(alembic_config(database_url), "0003")
    upgrade(database_url)
