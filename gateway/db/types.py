"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator

#: Auto-incrementing 64-bit key on PostgreSQL; SQLite only auto-increments INTEGER keys.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")

#: JSON document column: JSONB on PostgreSQL, JSON (text) on SQLite.
JSONDoc = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp stored in UTC.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so values are converted to
    UTC and stored naive, and read back as aware UTC datetimes. Naive input is refused
    (``ValueError``): every timestamp in the gateway carries its offset.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        when: datetime = value
        if when.tzinfo is None:
            return when.replace(tzinfo=UTC)
        return when.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class json_text(ColumnElement[str]):
    """The text of the top-level ``key`` of a JSON document column, as SQL that matches an
    expression index on it: ``(column ->> 'key')`` on PostgreSQL (JSONB),
    ``json_extract(column, '$.key')`` on SQLite, the key rendered as a literal.

    SQLAlchemy's ``column["key"].as_string()`` sends the key as a bound parameter (and
    quotes the SQLite path), which the planners cannot match to an index expression; this
    renders the same text as the index's own definition (see the migration that creates
    it), unqualified, so use it in statements over one table.

    Args:
        column: the JSON document column (:data:`JSONDoc`).
        key: a top-level element name (letters, digits and ``_`` only).

    Raises:
        ValueError: a key that is not a plain name (it is rendered into SQL).
    """

    type = String()
    inherit_cache = True
    _traverse_internals = [
        ("column_name", InternalTraversal.dp_string),
        ("key", InternalTraversal.dp_string),
    ]

    def __init__(self, column: ColumnElement[Any] | InstrumentedAttribute[Any], key: str) -> None:
        if not key.replace("_", "").isalnum() or not key.isascii():
            raise ValueError(f"not a plain JSON key: {key!r}")
        self.column_name = column.key
        self.key = key


@compiles(json_text)
def _json_text_sqlite(element: json_text, compiler: Any, **kw: Any) -> str:
    return f"json_extract({element.column_name}, '$.{element.key}')"


@compiles(json_text, "postgresql")
def _json_text_postgresql(element: json_text, compiler: Any, **kw: Any) -> str:
    return f"({element.column_name} ->> '{element.key}')"
