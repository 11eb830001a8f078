"""Inserting rows: collect rows of several tables and insert them with one statement per
table (:class:`BulkInserts`), and ``INSERT ... ON CONFLICT DO NOTHING`` for either
database (:func:`insert_ignore`).

The ORM unit of work costs a few hundred microseconds per object; an ingest request
writes a dozen rows, so the hot path queues plain row dicts here and sends them with one
executemany per table, in the order the tables were first used. Each INSERT is compiled by
SQLAlchemy once per dialect and set of columns (its SQL, the columns' bind processors:
JSON, encrypted columns, times; the Python-side column defaults) and sent straight to the
driver's connection inside the session's transaction: on PostgreSQL every table's rows in
one psycopg pipeline (one round trip for all of them,
https://www.psycopg.org/psycopg3/docs/advanced/pipeline.html), on SQLite one
``executemany`` call to aiosqlite's thread per table. Building, compiling and
cache-keying a Core statement per flush cost more CPU than the database spent on the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Base


def insert_ignore(session: AsyncSession, table: Any) -> Any:
    """An ``INSERT`` for the session's dialect (PostgreSQL or SQLite 3.24+) that takes
    ``.values(...)``, ``.on_conflict_do_nothing(...)`` and ``.returning(...)``: the
    database, not a look-up before the insert, decides whether a row with the same unique
    key exists."""
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(table)


@dataclass(frozen=True)
class PreparedInsert:
    """An ``INSERT`` of one table and set of columns, compiled for one dialect.

    Attributes:
        sql: the statement in the driver's parameter style.
        names: the parameters in statement order (qmark style) or None (named style:
            rows are passed as dicts).
        processors: ``(column, bind processor)`` for the columns whose values the driver
            cannot take as they are (JSON, encrypted text, SQLite times).
        defaults: ``(column, value or callable)`` for the columns not given that have a
            Python-side default (``mapped_column(default=...)``).
    """

    sql: str
    names: tuple[str, ...] | None
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]
    defaults: tuple[tuple[str, Any, bool], ...]

    def parameters(self, rows: list[dict[str, Any]]) -> list[Any]:
        """The driver parameters of ``rows`` (defaults filled in, values processed)."""
        out: list[Any] = []
        for row in rows:
            values = dict(row)
            for name, default, is_callable in self.defaults:
                values[name] = default(None) if is_callable else default
            for name, process in self.processors:
                values[name] = process(values[name])
            out.append(values if self.names is None else tuple(values[n] for n in self.names))
        return out


def prepared_insert(dialect: Dialect, table: Table, columns: tuple[str, ...]) -> PreparedInsert:
    """The :class:`PreparedInsert` of ``table`` with ``columns`` given, for ``dialect``
    (compiled on first use, then kept on the dialect)."""
    cache: dict[tuple[str, tuple[str, ...]], PreparedInsert] = dialect.__dict__.setdefault(
        "gateway_prepared_inserts", {}
    )
    key = (table.name, columns)
    found = cache.get(key)
    if found is not None:
        return found
    compiled = insert(table).compile(dialect=dialect, column_keys=list(columns))
    defaults = []
    for column in compiled.insert_prefetch:
        default = column.default
        if default is None or not (default.is_scalar or default.is_callable):
            raise ValueError(f"{table.name}.{column.key}: no Python-side default to fill in")
        defaults.append((column.key, cast(Any, default).arg, bool(default.is_callable)))
    processors = []
    for name, bind in compiled.binds.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((name, process))
    positional = compiled.positiontup if dialect.paramstyle in ("qmark", "numeric") else None
    found = PreparedInsert(
        sql=compiled.string,
        names=tuple(positional) if positional is not None else None,
        processors=tuple(processors),
        defaults=tuple(defaults),
    )
    cache[key] = found
    return found


async def insert_rows(
    session: AsyncSession, batches: list[tuple[Table, list[dict[str, Any]]]]
) -> None:
    """Insert each batch of rows (all rows of a batch give the same columns) in the
    session's transaction, straight through the driver (see the module docstring).

    Statement hooks (``before_cursor_execute`` listeners: SQL logging, the statement
    counts of the tests) are told of each statement.

    Raises:
        sqlalchemy.exc.DBAPIError: the database refused a row (an ``IntegrityError`` for
            a unique or foreign key), as a Core INSERT raises it.
    """
    if not batches:
        return
    connection = await session.connection()
    dialect = connection.dialect
    sync = connection.sync_connection
    assert sync is not None
    work = []
    for table, rows in batches:
        prepared = prepared_insert(dialect, table, tuple(rows[0]))
        work.append((prepared, prepared.parameters(rows)))
    fairy = await connection.get_raw_connection()
    driver: Any = fairy.driver_connection
    error: type[Exception] = dialect.loaded_dbapi.Error
    prepared, params = work[0]
    try:
        if dialect.name == "postgresql":
            async with driver.pipeline(), driver.cursor() as cursor:
                for prepared, params in work:
                    sync.dispatch.before_cursor_execute(
                        sync, cursor, prepared.sql, params, None, True
                    )
                    await cursor.executemany(prepared.sql, params)
        else:
            for prepared, params in work:
                sync.dispatch.before_cursor_execute(sync, None, prepared.sql, params, None, True)
                await driver.executemany(prepared.sql, params)
    except error as exc:
        invalidated = dialect.is_disconnect(exc, fairy.dbapi_connection, None)  # type: ignore[arg-type]
        if invalidated:
            await connection.invalidate(exc)
        raise DBAPIError.instance(
            prepared.sql,
            params,
            exc,
            error,
            hide_parameters=True,
            connection_invalidated=invalidated,
            dialect=dialect,
            ismulti=True,
        ) from exc


def row_values(obj: Base) -> dict[str, Any]:
    """The column values of a transient ORM object, as a row for :class:`BulkInserts`:
    every column set to a value, and the columns left None that have no default (written
    as NULL; those with a default get it, as in an ORM INSERT of an attribute never set).
    """
    table = cast(Table, type(obj).__table__)
    values: dict[str, Any] = {}
    for column in table.columns:
        value = getattr(obj, column.key)
        if value is not None or (
            column.default is None
            and column.server_default is None
            and not (column.primary_key and column.autoincrement in (True, "auto"))
        ):
            values[column.key] = value
    return values


class BulkInserts:
    """Rows waiting to be inserted, per model, in first-use order."""

    def __init__(self) -> None:
        self._rows: dict[type[Base], list[dict[str, Any]]] = {}

    def add(self, model: type[Base], **values: Any) -> None:
        """Queue one row of ``model``."""
        self._rows.setdefault(model, []).append(values)

    def rows(self, model: type[Base]) -> list[dict[str, Any]]:
        """The queue of ``model``'s rows (append row dicts to it)."""
        return self._rows.setdefault(model, [])

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    async def flush(self, session: AsyncSession) -> None:
        """Insert every queued row (one statement per table and set of columns given,
        :func:`insert_rows`) and forget them.

        A column given as None stays in the statement, so rows with and without a value
        (a resource with no business identifier) still go in one executemany. Columns not
        given get their defaults.
        """
        batches: list[tuple[Table, list[dict[str, Any]]]] = []
        for model, rows in self._rows.items():
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in rows:
                groups.setdefault(tuple(row), []).append(row)
            table = cast(Table, model.__table__)
            batches += [(table, group) for group in groups.values()]
        self._rows.clear()
        await insert_rows(session, batches)
