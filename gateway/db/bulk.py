"""Inserting rows: collect rows of several tables and insert them with one statement per
table (:class:`BulkInserts`), and ``INSERT ... ON CONFLICT DO NOTHING`` for either
database (:func:`insert_ignore`).

The ORM unit of work costs a few hundred microseconds per object; an ingest request
writes a dozen rows, so the hot path queues plain row dicts here and sends them as Core INSERTs
(``session.execute(insert(table), rows)``: one executemany per table) in the order the
tables were first used.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Base


def insert_ignore(session: AsyncSession, table: Any) -> Any:
    """An ``INSERT`` for the session's dialect (PostgreSQL or SQLite 3.24+) that takes
    ``.values(...)``, ``.on_conflict_do_nothing(...)`` and ``.returning(...)``: the
    database, not a look-up before the insert, decides whether a row with the same unique
    key exists."""
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(table)


class BulkInserts:
    """Rows waiting to be inserted, per model, in first-use order."""

    def __init__(self) -> None:
        self._rows: dict[type[Base], list[dict[str, Any]]] = {}

    def add(self, model: type[Base], **values: Any) -> None:
        """Queue one row of ``model``."""
        self._rows.setdefault(model, []).append(values)

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    async def flush(self, session: AsyncSession) -> None:
        """Insert every queued row (one statement per table and set of columns given)
        and forget them.

        Core INSERTs on the table: unlike the ORM's bulk INSERT, they keep a column given
        as None in the statement, so rows with and without a value (a resource with no
        business identifier) still go in one executemany. Columns not given get their
        defaults.
        """
        for model, rows in self._rows.items():
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in rows:
                groups.setdefault(tuple(row), []).append(row)
            for group in groups.values():
                await session.execute(insert(cast(Table, model.__table__)), group)
        self._rows.clear()
