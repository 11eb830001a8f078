"""Apply the Alembic migrations programmatically (``fhir-gateway db upgrade``, tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

#: Expression indexes the migrations create and the models do not declare (autogenerate
#: cannot compare them): ``ix_fhir_resources_birth_date`` (0017).
MIGRATION_ONLY_INDEXES = frozenset({"ix_fhir_resources_birth_date"})

#: The warning SQLAlchemy's SQLite reflection gives for such an index (it skips it).
EXPRESSION_INDEX_SKIPPED = "Skipped unsupported reflection of expression-based index"


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
    """Alembic's ``include_object`` hook for autogenerate and ``compare_metadata``: leave
    out :data:`MIGRATION_ONLY_INDEXES` (PostgreSQL reflects them, and autogenerate would
    propose dropping them)."""
    return not (type_ == "index" and name in MIGRATION_ONLY_INDEXES)


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and ``database_url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database at ``database_url`` to ``revision``.

    Blocking, and it runs its own event loop: from async code use :func:`upgrade_async`.
    """
    command.upgrade(alembic_config(database_url), revision)


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    """:func:`upgrade` from async code (runs it in a worker thread)."""
    await asyncio.to_thread(upgrade, database_url, revision)
