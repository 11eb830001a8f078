"""``fhir-gateway serve``, ``worker`` and ``db upgrade``: starting the processes."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

import typer

from gateway.cli.common import (
    Database,
    fail,
    profiles_or_exit,
    run_on_database,
    run_until_stopped,
    settings_or_exit,
)

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision")] = "head") -> None:
    """Apply the database migrations (idempotent)."""
    from gateway.db.migrate import upgrade

    settings = settings_or_exit()
    upgrade(settings.database_url, revision)
    typer.echo(f"database at revision {revision} ({settings.database_url.split('://', 1)[0]})")


@db_app.command("review-features")
def db_review_features(
    rebuild: Annotated[
        bool, typer.Option(help="Recompute every Patient's row, not only the missing ones")
    ] = False,
) -> None:
    """Write the duplicate-review features of stored Patients that have none (migration
    0021 fills them for the Patients stored before it; run this after a rolling deploy
    in which processes of the earlier release still registered patients; with
    --rebuild, also after they updated patients)."""
    from gateway.patients.review import fill_review_features

    async def work(database: Database) -> int:
        async with database.session() as session:
            return await fill_review_features(session, rebuild=rebuild)

    typer.echo(f"{run_on_database(work)} patients' review features computed")


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (GATEWAY_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (GATEWAY_PORT)")] = None,
    worker: Annotated[
        bool | None, typer.Option("--worker/--no-worker", help="Run the worker in-process")
    ] = None,
    migrate: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Apply migrations first")
    ] = True,
    workers: Annotated[
        int,
        typer.Option(min=1, max=64, help="Server processes (PostgreSQL only; each runs a worker)"),
    ] = 1,
) -> None:
    """Run the HTTP API (and, by default, the worker) in one process, or in
    ``--workers N`` processes sharing one PostgreSQL database."""
    import uvicorn

    from gateway.app import create_app
    from gateway.db.migrate import upgrade

    settings = settings_or_exit(host=host, port=port, run_worker=worker)
    profiles_or_exit(settings)
    if workers > 1 and settings.is_sqlite:
        raise fail(
            "--workers > 1 needs PostgreSQL: SQLite takes one writing process "
            "(set GATEWAY_DATABASE_URL=postgresql+psycopg://...)"
        )
    if migrate:
        upgrade(settings.database_url)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,
        "proxy_headers": False,
        "ws": "none",
    }
    if workers == 1:
        uvicorn.run(create_app(settings, server_process=True), **common)
        return
    # Each process builds its app from the environment: pass the command-line choices on.
    os.environ["GATEWAY_RUN_WORKER"] = "true" if settings.run_worker else "false"
    uvicorn.run("gateway.app:create_app_from_env", factory=True, workers=workers, **common)


def worker(
    concurrency: Annotated[
        int, typer.Option(min=1, max=256, help="Deliveries in flight at once")
    ] = 4,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve this worker's Prometheus metrics on 127.0.0.1:PORT"),
    ] = None,
) -> None:
    """Run the worker alone (scale out: several on one PostgreSQL): deliveries to EHRs and
    ops webhooks, stored events left to apply, workflow timers.

    SIGTERM/SIGINT: stop claiming and let the work in hand finish. SIGHUP: reload the
    profiles (a profile with problems is refused and the running set kept).
    """
    from gateway.worker import build_worker

    settings = settings_or_exit()
    profiles = profiles_or_exit(settings)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from gateway.metrics import REGISTRY

        start_http_server(metrics_port, addr="127.0.0.1", registry=REGISTRY)

    async def run(runtime: Any, stop: asyncio.Event) -> None:
        from gateway.secrets import warn_unset_target_secrets

        warn_unset_target_secrets(runtime.profiles.current, runtime.secrets)
        worker = build_worker(runtime, concurrency=concurrency)
        try:
            await worker.run(stop)
        finally:
            await worker.aclose()

    run_until_stopped(settings, profiles, run)
