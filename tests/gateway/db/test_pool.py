"""The PostgreSQL connection pool after the server drops its connections (a restart or a
failover): without pre-ping one use fails and the pool is rebuilt; with
``GATEWAY_DATABASE_POOL_PRE_PING`` that use is served."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db.engine import make_engine
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests.conftest import PG_URL

pytestmark = pytest.mark.postgres


def _drop_connections(url: str) -> None:
    """Terminate every server connection to the test database (as a restart would)."""
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )


async def _one(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT 1"))).scalar_one())


async def test_without_pre_ping_one_use_fails_then_the_pool_recovers(postgres_url: str) -> None:
    engine = make_engine(postgres_url, pool_size=2)
    try:
        assert await _one(engine) == 1
        _drop_connections(postgres_url)
        with pytest.raises(DBAPIError) as caught:
            await _one(engine)
        assert caught.value.connection_invalidated
        assert await _one(engine) == 1  # a new connection
    finally:
        await engine.dispose()


async def test_with_pre_ping_the_dropped_connection_is_replaced_unseen(postgres_url: str) -> None:
    engine = make_engine(postgres_url, pool_size=2, pre_ping=True)
    try:
        assert await _one(engine) == 1
        _drop_connections(postgres_url)
        assert await _one(engine) == 1
    finally:
        await engine.dispose()


async def test_the_setting_reaches_the_runtime(postgres_url: str, profiles_dir: Path) -> None:
    """``GATEWAY_DATABASE_POOL_PRE_PING=true`` in the environment: the gateway's runtime
    serves the first use after the connections were dropped."""
    settings = Settings(
        database_url=postgres_url,
        profiles_dir=profiles_dir,
        database_pool_pre_ping="true",  # type: ignore[arg-type]  # as read from the environment
        _env_file=None,  # type: ignore[call-arg]
    )
    runtime = Runtime.create(settings)
    try:
        assert await _one(runtime.engine) == 1
        _drop_connections(postgres_url)
        assert await _one(runtime.engine) == 1
    finally:
        await runtime.close()


async def test_read_sessions_run_each_statement_alone_on_postgresql(runtime: Runtime) -> None:
    """``Runtime.read_session``: on PostgreSQL each statement is its own transaction (no
    BEGIN or ROLLBACK round trips): ``now()``, the transaction's start, moves between two
    statements of one session; in a write session it does not."""
    import asyncio

    if runtime.engine.dialect.name != "postgresql":
        assert runtime.read_sessionmaker is not None
        assert runtime.read_sessionmaker.kw == runtime.sessionmaker.kw  # the usual sessions
        return
    async with runtime.read_session() as session:
        first = await session.scalar(text("SELECT now()"))
        await asyncio.sleep(0.01)
        second = await session.scalar(text("SELECT now()"))
    assert first < second
    async with runtime.sessionmaker() as session:
        first = await session.scalar(text("SELECT now()"))
        await asyncio.sleep(0.01)
        second = await session.scalar(text("SELECT now()"))
    assert first == second
