"""The Alembic migrations and the SQLAlchemy models agree, on SQLite and PostgreSQL:
autogenerate against a migrated database finds nothing to do."""

from __future__ import annotations

import warnings
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, create_engine, inspect

from gateway.db.migrate import EXPRESSION_INDEX_SKIPPED, alembic_config, include_object
from gateway.db.models import Base


def sync_url(url: str) -> str:
    return url.replace("sqlite+aiosqlite:", "sqlite:")


def differences(url: str) -> list[Any]:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as connection, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=EXPRESSION_INDEX_SKIPPED)
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "compare_server_default": False,
                    "include_object": include_object,
                },
            )
            return compare_metadata(context, Base.metadata)  # type: ignore[no-any-return]
    finally:
        engine.dispose()


def test_the_migrated_schema_matches_the_models(database_url: str) -> None:
    assert differences(database_url) == []


def test_the_database_is_at_the_head_revision(database_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    engine = create_engine(sync_url(database_url))
    try:
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == head
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) <= tables


def test_a_model_change_without_a_migration_is_detected(database_url: str) -> None:
    """A control: the comparison sees a column the migrations do not create."""
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["cases"].append_column(Column("priority", Integer, nullable=True))
    engine = create_engine(sync_url(database_url))
    try:
        with engine.connect() as connection, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=EXPRESSION_INDEX_SKIPPED)
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "include_object": include_object}
            )
            diff = compare_metadata(context, changed)
    finally:
        engine.dispose()
    assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "cases", "priority")]
