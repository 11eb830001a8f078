"""Shared fixtures: real databases (SQLite and PostgreSQL), the app, API keys.

PostgreSQL: the server at ``GATEWAY_TEST_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``). Migrations run once into a template
database; each test gets a database of its own cloned from it, which is reset to the
template's state (schema checked, rows deleted, sequences restarted) when the test ends
and reused, so tests never see each other's data (:mod:`tests.support.databases`). Without a reachable server the PostgreSQL tests skip with
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
from tests.support.databases import PgPool
from tests.support.profiles import check_unchanged, shared_profiles

#: The local EHR fixtures (``fhir_server``, ``make_ehr``): tests/support/ehr.py.
pytest_plugins = ("tests.support.ehr",)

#: Every peer of the tests (the local EHR, subscribers, token endpoints) listens on
#: 127.0.0.1 over http: the egress policy lets loopback through for the tests and the
#: processes they start (tests/security/test_egress_*.py build their own policies).
os.environ["GATEWAY_EGRESS_ALLOW_LOOPBACK"] = "true"

PG_URL = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_skipped_postgres: list[str] = []
_skipped_browser: list[str] = []
_pool_stats: dict[str, int] = {}


def _add_pool_stats(stats: dict[str, int]) -> None:
    for key, value in stats.items():
        _pool_stats[key] = _pool_stats.get(key, 0) + value


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
def pg_server() -> str:
    """The PostgreSQL server's maintenance database URL (``GATEWAY_TEST_PG_URL``); a test
    using it skips without a reachable server, or fails under ``CI=true``."""
    reason = _pg_reachable()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return PG_URL


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> Iterator[str]:
    """Name of a migrated template database (created once per test session and worker)."""
    name = f"fgw_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        upgrade(_pg_url_for(name))
        yield name
    finally:
        with _admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def pg_pool(pg_template: str, request: pytest.FixtureRequest) -> Iterator[PgPool]:
    """Clones of the template, each given to one test at a time and reset between tests
    (:class:`tests.support.databases.PgPool`)."""
    pool = PgPool(PG_URL, pg_template)
    try:
        yield pool
    finally:
        pool.close()
        stats = {"created": pool.created, "reset": pool.reset, "discarded": pool.discarded}
        workeroutput = getattr(request.config, "workeroutput", None)  # a pytest-xdist worker
        if workeroutput is not None:
            workeroutput["pg_pool"] = stats
        else:
            _add_pool_stats(stats)


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
    yield request.getfixturevalue("postgres_url")


@pytest.fixture
def postgres_url(pg_pool: PgPool) -> Iterator[str]:
    """A PostgreSQL database of the test's own (empty, migrated) for tests of PostgreSQL
    behaviour; connections left open when the test ends are terminated."""
    with pg_pool.database() as name:
        yield _pg_url_for(name)


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
    """The wired runtime on the test database, with profiles loaded once per test run
    for each distinct profiles directory content (:func:`shared_profiles`)."""
    profiles = shared_profiles(settings.profiles_dir)
    rt = Runtime.create(settings, profiles=profiles)
    try:
        yield rt
    finally:
        await rt.close()
    check_unchanged(profiles)


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
        *scopes: str,
        name: str | None = None,
        event_sources: list[str] | None = None,
        partners: list[str] | None = None,
        programs: list[str] | None = None,
    ) -> str:
        async with runtime.sessionmaker() as session:
            _, key = await create_client(
                session,
                name=name or f"test-{uuid.uuid4().hex[:8]}",
                scopes=list(scopes),
                event_sources=event_sources,
                partners=partners,
                programs=programs,
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
    if report.skipped and "browser" in report.keywords:
        _skipped_browser.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped_postgres:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CI=true: {len(_skipped_postgres)} PostgreSQL test(s) were skipped; they must run in CI",
                red=True,
            )
    if IN_CI and _skipped_browser:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CI=true: {len(_skipped_browser)} browser test(s) were skipped; they must run in CI",
                red=True,
            )


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist: add up the workers' PostgreSQL database counts."""
    stats = getattr(node, "workeroutput", {}).get("pg_pool")
    if stats:
        _add_pool_stats(stats)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _pool_stats:
        terminalreporter.write_line(
            f"PostgreSQL test databases: {_pool_stats['created']} cloned from the template, "
            f"{_pool_stats['reset']} resets for the next test, "
            f"{_pool_stats['discarded']} dropped after a schema change"
        )
