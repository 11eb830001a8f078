"""Shared fixtures: real databases (SQLite and PostgreSQL), the app, API keys.

PostgreSQL: the server at ``GATEWAY_TEST_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``). Migrations run once into a template
database; each test gets a fresh database created from it, dropped afterwards, so runs
never see each other's data. Without a reachable server the PostgreSQL tests skip with
the reason, except under ``CI=true``, where they fail, and a skipped PostgreSQL test
fails the session.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from gateway.app import create_app
from gateway.clients.service import create_client
from gateway.db.migrate import upgrade
from gateway.runtime import Runtime
from gateway.settings import BUNDLED_PROFILES_DIR, Settings

#: The local EHR fixtures (``fhir_server``, ``make_ehr``): tests/support/ehr.py.
pytest_plugins = ("tests.support.ehr",)

PG_URL = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_skipped_postgres: list[str] = []


def _pg_reachable() -> str | None:
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {PG_URL} ({type(exc).__name__})"
    return None


def _pg_url_for(dbname: str, driver: str = "postgresql+psycopg") -> str:
    base = PG_URL.split("://", 1)[1].rsplit("/", 1)[0]
    return f"{driver}://{base}/{dbname}"


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(PG_URL, autocommit=True)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """Name of a migrated template database (created once per test session)."""
    reason = _pg_reachable()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    name = f"fgw_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    upgrade(_pg_url_for(name))
    yield name
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def create_pg_database(template: str) -> str:
    """A fresh database cloned from the template; returns its name."""
    name = f"fgw_t_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return name


def drop_pg_database(name: str) -> None:
    """Drop a test database (closing leftover connections)."""
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database: SQLite file or PostgreSQL database (parametrized)."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "gateway.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    name = create_pg_database(request.getfixturevalue("pg_template"))
    try:
        yield _pg_url_for(name)
    finally:
        drop_pg_database(name)


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh PostgreSQL database only (for tests of PostgreSQL behaviour)."""
    name = create_pg_database(request.getfixturevalue("pg_template"))
    try:
        yield _pg_url_for(name)
    finally:
        drop_pg_database(name)


@pytest.fixture
def profiles_dir() -> Path:
    """The profiles the test runs with (the bundled ones unless overridden)."""
    return BUNDLED_PROFILES_DIR


@pytest.fixture
def settings(database_url: str, profiles_dir: Path) -> Settings:
    """Settings for a test: its database, no worker in the app, a Stripe test secret."""
    return Settings(
        database_url=database_url,
        profiles_dir=profiles_dir,
        run_worker=False,
        stripe_webhook_secret="whsec_test_secret_for_tests_only",  # type: ignore[arg-type]
        log_json=True,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """The wired runtime on the test database."""
    rt = Runtime.create(settings)
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
async def client(settings: Settings, runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process (lifespan run, no worker)."""
    app = create_app(settings, runtime=runtime, run_worker=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
        ) as http,
    ):
        yield http


ApiKeyFactory = Callable[..., Awaitable[str]]


@pytest.fixture
def make_api_key(runtime: Runtime) -> ApiKeyFactory:
    """``await make_api_key("intake:write", ...)`` -> a new API key with those scopes."""

    async def make(
        *scopes: str, name: str | None = None, event_sources: list[str] | None = None
    ) -> str:
        async with runtime.sessionmaker() as session:
            _, key = await create_client(
                session,
                name=name or f"test-{uuid.uuid4().hex[:8]}",
                scopes=list(scopes),
                event_sources=event_sources,
            )
            await session.commit()
        return key

    return make


@pytest.fixture
async def admin_headers(make_api_key: ApiKeyFactory) -> dict[str, str]:
    """Authorization headers with every scope."""
    from gateway.clients.service import SCOPES

    return {"Authorization": f"Bearer {await make_api_key(*SCOPES)}"}


# --------------------------------------------------------------------------- CI guard


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "postgres" in report.keywords:
        _skipped_postgres.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped_postgres:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CI=true: {len(_skipped_postgres)} PostgreSQL test(s) were skipped; they must run in CI",
                red=True,
            )
