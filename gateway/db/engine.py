"""Engine and session factory for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession  # re-export

from gateway.db.encryption import Keyring, attach_keyring, create_private_file
from gateway.settings import normalize_database_url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run while the worker writes; busy_timeout makes a writer wait for
    # the lock instead of failing at once; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


#: orjson options for :func:`json_dumps`: keys that are not strings written as JSON keys
#: (as :func:`json.dumps` does); a datetime or dataclass is not JSON data and is left to
#: :func:`json.dumps`, which refuses it as before.
_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def json_dumps(value: Any) -> str:
    """A JSON column's value as the text the database stores: orjson (about 5 times
    faster than :func:`json.dumps`), compact, UTF-8 not escaped. What orjson cannot write
    (an integer beyond 64 bits; a datetime, which is not JSON data) goes to
    :func:`json.dumps`, which writes the integer and raises ``TypeError`` for the rest.
    """
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        return json.dumps(value)


def json_loads(text: str | bytes) -> Any:
    """A JSON column's text as Python values: orjson (a read of 200 candidate Patients
    for duplicate review spent most of its client CPU in :func:`json.loads`); what orjson
    refuses (an integer beyond 64 bits, a lone surrogate escape an older row may hold) is
    read by :func:`json.loads`.

    Raises:
        json.JSONDecodeError: the text is not JSON.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def make_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    pre_ping: bool = False,
    echo: bool = False,
    keyring: Keyring | None = None,
) -> AsyncEngine:
    """Create the async engine for ``database_url``.

    Args:
        database_url: ``sqlite+aiosqlite:///path.db`` or ``postgresql+psycopg://...``
            (plain ``sqlite:``/``postgresql:`` URLs are given the async driver).
        pool_size: connections kept open (PostgreSQL only).
        pre_ping: test each pooled connection with a round trip before use (PostgreSQL
            only; ``GATEWAY_DATABASE_POOL_PRE_PING``). Off by default, see below.
        echo: log SQL (development only: statements may carry PHI in parameters).
        keyring: encrypts the secret columns (:mod:`gateway.db.encryption`); None:
            written as plaintext.

    Returns:
        An :class:`AsyncEngine` whose JSON columns are written and read with orjson
        (:func:`json_dumps`, :func:`json_loads`). For SQLite, every connection uses WAL, a 10 s busy
        timeout and foreign keys, and a database file it creates is created 0600 (its WAL
        and shared-memory files take the same mode). For PostgreSQL, pooled connections are recycled
        after 30 minutes and, unless ``pre_ping``, not pinged before use.
    """
    url = normalize_database_url(database_url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            create_private_file(Path(database))
        engine = create_async_engine(
            url, echo=echo, json_serializer=json_dumps, json_deserializer=json_loads
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        attach_keyring(engine, keyring)
        return engine
    # No pre-ping by default: it costs a round trip on every checkout (one per request). A connection
    # the server closed fails its statement instead, and SQLAlchemy then discards every
    # pooled connection of that generation, so one request sees the error (a 500 its client
    # retries; the transaction rolled back, nothing half written); connections older than
    # ``pool_recycle`` are replaced before use, ahead of server or proxy idle timeouts.
    engine = create_async_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        json_serializer=json_dumps,
        json_deserializer=json_loads,
    )
    attach_keyring(engine, keyring)
    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that do not expire objects on commit (responses are built after commit)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def make_read_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for reads that need no snapshot shared by their statements (the delivery
    worker loading what it sends). On PostgreSQL every statement runs in autocommit mode
    (``isolation_level="AUTOCOMMIT"`` on the same pool): one round trip per query instead
    of ``BEGIN``, the query and a ``ROLLBACK`` when the session closes; writing through
    them is a mistake (each statement would commit alone). On SQLite: the usual sessions.
    """
    if engine.dialect.name != "postgresql":
        return make_sessionmaker(engine)
    return make_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))
