"""``fhir-gateway demo``: against a real gateway (uvicorn on 127.0.0.1 in a thread, a
migrated SQLite file), against no gateway, and against one that refuses the intake. The
demo's own API client never outlives the run."""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import tomllib
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli import app
from gateway.settings import Settings

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A migrated SQLite file the CLI is pointed at, run from a directory that is not the
    project's (no ``.env``, no ``examples/`` beside it)."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "demo.db"
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{path}")
    monkeypatch.setenv("GATEWAY_LOG_LEVEL", "warning")
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    return path


def _serve(asgi: object) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        asgi,  # type: ignore[arg-type]
        log_level="warning",
        log_config=None,
        access_log=False,
        ws="none",
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def gateway_url(migrated: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The gateway on the migrated file, with a Stripe webhook secret (the signed path)."""
    monkeypatch.setenv("GATEWAY_STRIPE_WEBHOOK_SECRET", "whsec_demo_test_secret")
    settings = Settings(_env_file=None)
    yield from _serve(create_app(settings, run_worker=False))


def _clients(path: Path) -> list[tuple[str, str | None]]:
    with sqlite3.connect(path) as conn:
        return list(conn.execute("SELECT name, revoked_at FROM api_clients"))


def test_demo_runs_the_flow_and_revokes_the_client_it_created(
    migrated: Path, gateway_url: str
) -> None:
    result = runner.invoke(app, ["demo", "--url", gateway_url])
    assert result.exit_code == 0, result.output
    assert "== 2. Stripe checkout.session.completed (signed)" in result.stdout
    assert "POST /v1/webhooks/stripe -> 200" in result.stdout
    assert '"state": "approved"' in result.stdout
    [(name, revoked_at)] = _clients(migrated)
    assert name.startswith("demo-") and revoked_at is not None
    assert f"created API client {name} for this run" in result.stdout
    assert f"revoked API client {name}" in result.stdout


def test_demo_without_a_stripe_secret_says_it_sends_the_canonical_checkout(
    migrated: Path,
) -> None:
    settings = Settings(_env_file=None)
    assert settings.stripe_webhook_secret is None
    for url in _serve(create_app(settings, run_worker=False)):
        result = runner.invoke(app, ["demo", "--url", url])
    assert result.exit_code == 0, result.output
    assert "== 2. canonical checkout" in result.stdout
    assert "Stripe checkout.session.completed" not in result.stdout
    assert "POST /v1/checkouts -> 202" in result.stdout


def test_demo_revokes_its_client_when_the_run_fails(migrated: Path) -> None:
    async def refuse(request: object) -> Response:
        return JSONResponse({"title": "refused"}, status_code=422)

    async def healthy(request: object) -> Response:
        return JSONResponse({"status": "ok"})

    refusing = Starlette(
        routes=[
            Route("/healthz", healthy),
            Route("/v1/intake-submissions", refuse, methods=["POST"]),
        ]
    )
    for url in _serve(refusing):
        result = runner.invoke(app, ["demo", "--url", url])
    assert result.exit_code == 1
    [(name, revoked_at)] = _clients(migrated)
    assert revoked_at is not None, name


def test_demo_against_no_gateway_prints_one_line_naming_the_url(migrated: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = runner.invoke(app, ["demo", "--url", url])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert url in lines[0] and "ConnectError" in lines[0]
    assert "Traceback" not in result.output
    assert _clients(migrated) == []  # nothing created when nothing answers


def test_the_demo_payloads_are_package_data() -> None:
    shipped = {p.name for p in files("gateway").joinpath("examples").iterdir()}
    assert {
        "intake-glp1.json",
        "stripe-checkout-session-completed.json",
        "event-provider-assigned.json",
        "event-decision-approved.json",
    } <= shipped
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert "examples/*.json" in package_data["gateway"]
