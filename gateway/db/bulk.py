"""Collect rows of several tables and insert them with one statement per table.

The ORM unit of work costs a few hundred microseconds per object; an ingest request
writes a dozen rows, so the hot path queues plain row dicts here and sends them as Core INSERTs
(``session.execute(insert(table), rows)``: one executemany per table) in the order the
tables were first used.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Base


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
