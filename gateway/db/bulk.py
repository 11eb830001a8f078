"""Writing rows: collect rows of several tables (and UPDATEs by id) and send them
with one statement each, in one round trip on PostgreSQL (:class:`BulkInserts`,
:func:`execute_many`), and ``INSERT ... ON CONFLICT DO NOTHING`` for either database
(:func:`insert_ignore`).

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

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Executable, Table, insert
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
class PreparedStatement:
    """A statement run with many rows of parameters (an ``INSERT`` of one table and set
    of columns, an ``UPDATE ... WHERE id = :_id``...), compiled for one dialect.

    Attributes:
        sql: the statement in the driver's parameter style.
        names: the parameters in statement order (qmark style) or None (named style:
            rows are passed as dicts).
        processors: ``(parameter, bind processor)`` for the values the driver cannot
            take as they are (JSON, encrypted text, SQLite times).
        defaults: ``(column, value or callable, is callable)`` for the columns of an
            INSERT not given that have a Python-side default (``mapped_column(default=...)``).
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


def prepared_statement(
    dialect: Dialect,
    key: Hashable,
    build: Callable[[], Executable],
    column_keys: tuple[str, ...] | None = None,
) -> PreparedStatement:
    """The :class:`PreparedStatement` of ``build()`` for ``dialect``, compiled on first
    use of ``key`` and then kept on the dialect (``key`` names the statement: the same
    key must always build the same statement).

    Args:
        column_keys: for an INSERT, the columns given (the others get their defaults).

    Raises:
        ValueError: a column left out of an INSERT has a default the database does not
            fill in and Python cannot (a SQL expression).
    """
    cache: dict[Hashable, PreparedStatement] = dialect.__dict__.setdefault(
        "gateway_prepared_statements", {}
    )
    found = cache.get(key)
    if found is not None:
        return found
    compiled = cast(Any, build()).compile(
        dialect=dialect, column_keys=list(column_keys) if column_keys is not None else None
    )
    defaults = []
    for column in compiled.insert_prefetch:
        default = column.default
        if default is None or not (default.is_scalar or default.is_callable):
            raise ValueError(f"{column}: no Python-side default to fill in")
        defaults.append((column.key, cast(Any, default).arg, bool(default.is_callable)))
    processors = []
    for name, bind in compiled.binds.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((name, process))
    positional = compiled.positiontup if dialect.paramstyle in ("qmark", "numeric") else None
    found = PreparedStatement(
        sql=compiled.string,
        names=tuple(positional) if positional is not None else None,
        processors=tuple(processors),
        defaults=tuple(defaults),
    )
    cache[key] = found
    return found


#: A statement to run with many rows: ``(key, build, column keys of an INSERT or None)``.
Statement = tuple[Hashable, Callable[[], Executable], tuple[str, ...] | None]


async def execute_many(
    session: AsyncSession, batches: Sequence[tuple[Statement, list[dict[str, Any]]]]
) -> None:
    """Run each statement with its rows (each row a dict of the statement's parameters,
    the same keys in every row of a batch) in the session's transaction, straight through
    the driver (see the module docstring); nothing is read back.

    Statement hooks (``before_cursor_execute`` listeners: SQL logging, the statement
    counts of the tests) are told of each statement.

    Raises:
        sqlalchemy.exc.DBAPIError: the database refused a row (an ``IntegrityError`` for
            a unique or foreign key), as SQLAlchemy raises it.
    """
    batches = [b for b in batches if b[1]]
    if not batches:
        return
    connection = await session.connection()
    dialect = connection.dialect
    sync = connection.sync_connection
    assert sync is not None
    work = []
    for (key, build, columns), rows in batches:
        prepared = prepared_statement(dialect, key, build, columns)
        work.append((prepared, prepared.parameters(rows)))
    fairy = await connection.get_raw_connection()
    driver: Any = fairy.driver_connection
    error: type[Exception] = dialect.loaded_dbapi.Error
    # named in the error (in a pipeline a refusal surfaces at its end: the statement
    # named may be a later one of the same round trip; parameters are never shown)
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


def _insert_builder(table: Table) -> Callable[[], Executable]:
    return lambda: insert(table)


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
        self._statements: list[tuple[Statement, list[dict[str, Any]]]] = []

    def add(self, model: type[Base], **values: Any) -> None:
        """Queue one row of ``model``."""
        self._rows.setdefault(model, []).append(values)

    def rows(self, model: type[Base]) -> list[dict[str, Any]]:
        """The queue of ``model``'s rows (append row dicts to it)."""
        return self._rows.setdefault(model, [])

    def add_statement(
        self,
        key: Hashable,
        build: Callable[[], Executable],
        rows: list[dict[str, Any]],
    ) -> None:
        """Queue ``build()`` (an ``UPDATE ... WHERE id = :_id``, an upsert...) to run with
        each of ``rows`` (dicts of its parameters, the same keys in each; compiled once
        per dialect and ``key``): sent after the queued INSERTs, in the order added."""
        if rows:
            self._statements.append(((key, build, None), rows))

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values()) + sum(
            len(rows) for _, rows in self._statements
        )

    async def flush(self, session: AsyncSession) -> None:
        """Send every queued row and statement (:func:`execute_many`: one statement per
        table and set of columns given, then the statements in the order added) and
        forget them.

        A column given as None stays in the statement, so rows with and without a value
        (a resource with no business identifier) still go in one executemany. Columns not
        given get their defaults.
        """
        batches: list[tuple[Statement, list[dict[str, Any]]]] = []
        for model, rows in self._rows.items():
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in rows:
                groups.setdefault(tuple(row), []).append(row)
            table = cast(Table, model.__table__)
            for columns, group in groups.items():
                insert_of = _insert_builder(table)
                batches.append(((("insert", table.name, columns), insert_of, columns), group))
        batches += self._statements
        self._rows.clear()
        self._statements = []
        await execute_many(session, batches)
