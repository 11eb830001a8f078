"""The migrations (including 0004, delivery) build exactly the tables the models declare,
on SQLite and PostgreSQL, and 0004 downgrades cleanly."""

from __future__ import annotations

import warnings
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import JSON, inspect

from gateway.db.engine import make_engine
from gateway.db.migrate import EXPRESSION_INDEX_SKIPPED, alembic_config, include_object, upgrade
from gateway.db.models import Base
from gateway.db.types import UTCDateTime


def _compare_type(
    ctx: Any, inspected: Any, metadata: Any, inspected_type: Any, metadata_type: Any
) -> bool | None:
    # Our portable types render as plain DateTime(timezone=True) / JSON(B) in migrations.
    if isinstance(metadata_type, UTCDateTime | JSON):
        return False
    return None


async def _diff(database_url: str) -> list[Any]:
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:

            def run(sync_conn: Any) -> list[Any]:
                context = MigrationContext.configure(
                    sync_conn,
                    opts={"compare_type": _compare_type, "include_object": include_object},
                )
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=EXPRESSION_INDEX_SKIPPED)
                    return list(compare_metadata(context, Base.metadata))

            return await conn.run_sync(run)
    finally:
        await engine.dispose()


async def test_models_match_the_migrations(database_url: str) -> None:
    assert await _diff(database_url) == []


async def test_delivery_migration_downgrades_and_upgrades_again(database_url: str) -> None:
    import asyncio

    await asyncio.to_thread(command.downgrade, alembic_config(database_url), "0001")
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
            pk = await conn.run_sync(lambda c: inspect(c).get_pk_constraint("target_states"))
    finally:
        await engine.dispose()
    assert "signing_keys" not in tables
    assert pk["constrained_columns"] == ["target"]

    await asyncio.to_thread(upgrade, database_url)
    assert await _diff(database_url) == []
