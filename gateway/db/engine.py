"""Engine and session factory for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        An :class:`AsyncEngine`. For SQLite, every connection uses WAL, a 10 s busy
        timeout and foreign keys, and a database file it creates is created 0600 (its WAL
        and shared-memory files take the same mode). For PostgreSQL, pooled connections are recycled
        after 30 minutes and, unless ``pre_ping``, not pinged before use.
    """
    url = normalize_database_url(database_url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            create_private_file(Path(database))
        engine = create_async_engine(url, echo=echo)
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
