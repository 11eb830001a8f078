"""The ``fhir-gateway`` command line (typer's CliRunner): ``db upgrade`` on a fresh SQLite
file, ``clients create`` printing a key that authenticates and is stored only hashed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli import app
from gateway.clients.service import authenticate
from gateway.db.migrate import alembic_config
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests import samples

runner = CliRunner()


@pytest.fixture
def db_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SQLite file the CLI is pointed at (no ``.env`` from the repository)."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cli.db"
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{path}")
    return path


@pytest.fixture
def migrated(db_path: Path) -> Path:
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    return db_path


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_db_upgrade_creates_the_schema_on_a_fresh_file(db_path: Path) -> None:
    assert not db_path.exists()
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "database at revision head (sqlite+aiosqlite)" in result.stdout
    assert {"api_clients", "inbound_messages", "fhir_resources", "deliveries", "cases"} <= tables(
        db_path
    )
    with sqlite3.connect(db_path) as conn:
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    from alembic.script import ScriptDirectory

    assert revision == ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_db_upgrade_twice_is_harmless(migrated: Path) -> None:
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output


def test_db_review_features_adds_the_missing_rows(migrated: Path) -> None:
    """A Patient stored without its duplicate-review features (by a process of the
    release before migration 0021, during a rolling deploy) gets them; a second run adds
    nothing, and a Patient without a birth date never gets any."""
    import json

    with sqlite3.connect(migrated) as conn:
        for pid, resource in (
            ("p-1", {"name": [{"family": "Okafor", "given": ["Ada"]}], "birthDate": "1990-01-02"}),
            ("p-2", {"name": [{"family": "Okafor"}]}),
        ):
            conn.execute(
                "INSERT INTO fhir_resources (resource_type, id, version_id, resource,"
                " created_at, updated_at) VALUES ('Patient', ?, 1, ?, ?, ?)",
                (
                    pid,
                    json.dumps({"resourceType": "Patient", "id": pid, **resource}),
                    "2026-01-01 00:00:00",
                    "2026-01-01 00:00:00",
                ),
            )
    result = runner.invoke(app, ["db", "review-features"])
    assert result.exit_code == 0, result.output
    assert "1 patients' review features computed" in result.stdout
    with sqlite3.connect(migrated) as conn:
        rows = conn.execute(
            "SELECT patient_id, family, given, birth_date FROM patient_review_features"
        ).fetchall()
    assert rows == [("p-1", "okafor", "ada", "1990-01-02")]
    again = runner.invoke(app, ["db", "review-features"])
    assert "0 patients' review features computed" in again.stdout


def create(name: str, *scopes: str) -> tuple[int, str, str]:
    args = ["clients", "create", name]
    for scope in scopes:
        args += ["--scope", scope]
    result = runner.invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def test_clients_create_prints_a_key_that_authenticates(migrated: Path) -> None:
    code, out, err = create("intake-app", "intake:write", "fhir:read")
    assert code == 0, err
    key = out.strip()
    assert key.startswith("fgw_") and "\n" not in key
    assert "client 'intake-app' created with scopes: fhir:read intake:write" in err

    async def use_key() -> tuple[frozenset[str], int]:
        settings = Settings(
            database_url=f"sqlite:///{migrated}",
            run_worker=False,
            _env_file=None,  # type: ignore[call-arg]
        )
        runtime = Runtime.create(settings)
        try:
            async with runtime.sessionmaker() as session:
                principal = await authenticate(session, key=key)
            assert principal is not None
            gateway = create_app(settings, runtime=runtime, run_worker=False)
            async with (
                gateway.router.lifespan_context(gateway),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=gateway), base_url="http://gw.test"
                ) as http,
            ):
                r = await http.post(
                    "/v1/intake-submissions",
                    json=samples.intake(),
                    headers={"Authorization": f"Bearer {key}"},
                )
            return principal.scopes, r.status_code
        finally:
            await runtime.close()

    listed = runner.invoke(app, ["clients", "list"]).stdout
    assert listed.endswith("\tlast-used=never\n")
    scopes, status = asyncio.run(use_key())
    assert scopes == {"intake:write", "fhir:read"}
    assert status == 202
    # The request kept the client's last use, shown to the minute.
    listed = runner.invoke(app, ["clients", "list"]).stdout
    (used,) = re.findall(r"\tlast-used=(\d{4}-\d\d-\d\dT\d\d:\d\dZ)\n", listed)
    assert abs(
        datetime.strptime(used, "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC) - datetime.now(UTC)
    ) < timedelta(minutes=2)


def test_the_key_is_stored_only_as_a_hash(migrated: Path) -> None:
    code, out, _ = create("ops", "ops:read")
    assert code == 0
    key = out.strip()
    with sqlite3.connect(migrated) as conn:
        (key_hash, key_id, name) = conn.execute(
            "SELECT key_hash, key_id, name FROM api_clients"
        ).fetchone()
    assert key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key_id in key and name == "ops"
    secret_part = key.split("_", 2)[2]
    for path in migrated.parent.glob("cli.db*"):  # the database and any WAL file
        assert secret_part.encode() not in path.read_bytes()


def test_scopes_may_be_given_comma_separated(migrated: Path) -> None:
    code, _, err = create("both", "intake:write,checkout:write")
    assert code == 0
    assert "scopes: checkout:write intake:write" in err


def test_an_unknown_scope_exits_non_zero_with_a_clear_message(migrated: Path) -> None:
    code, out, err = create("typo", "intake:write", "intake:wrte")
    assert code == 2
    assert out == ""
    assert "unknown scope(s): intake:wrte; known: intake:write" in err
    with sqlite3.connect(migrated) as conn:
        assert conn.execute("SELECT count(*) FROM api_clients").fetchone() == (0,)


def test_a_duplicate_client_name_exits_non_zero(migrated: Path) -> None:
    assert create("intake-app", "intake:write")[0] == 0
    code, out, err = create("intake-app", "fhir:read")
    assert code == 2
    assert out == ""
    assert "a client named 'intake-app' already exists" in err


def test_clients_list_never_shows_keys(migrated: Path) -> None:
    _, out, _ = create("intake-app", "intake:write")
    result = runner.invoke(app, ["clients", "list"])
    assert result.exit_code == 0
    assert result.stdout == "intake-app\tactive\tintake:write\tlast-used=never\n"
    assert out.strip() not in result.stdout


def test_clients_create_with_event_sources_restricts_the_sender(migrated: Path) -> None:
    result = runner.invoke(
        app,
        [
            "clients",
            "create",
            "pharmacy-feed",
            "--scope",
            "events:write",
            "--event-source",
            "pharmacy",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "it may send events as: pharmacy" in result.stderr

    async def principal() -> Any:
        settings = Settings(
            database_url=f"sqlite:///{migrated}",
            run_worker=False,
            _env_file=None,  # type: ignore[call-arg]
        )
        runtime = Runtime.create(settings)
        try:
            async with runtime.sessionmaker() as session:
                return await authenticate(session, key=result.stdout.strip())
        finally:
            await runtime.close()

    found = asyncio.run(principal())
    assert found.may_send_as("pharmacy") and not found.may_send_as("ehr")


def test_clients_create_without_event_sources_warns(migrated: Path) -> None:
    code, _, err = create("any-sender", "events:write")
    assert code == 0, err
    assert "any sender (restrict it with --event-source)" in err


@pytest.mark.parametrize("command", [["clients", "list"], ["deliveries", "list"], ["mllp"]])
def test_a_setting_that_does_not_validate_is_named_without_its_value(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """Every command loads its settings the same way: exit 2 naming the variable and the
    reason, never echoing the value (it may hold a password or a secret)."""
    monkeypatch.setenv("GATEWAY_PUBLIC_BASE_URL", "ftp://user:hunter2@gateway.internal")
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "configuration error: GATEWAY_PUBLIC_BASE_URL:" in result.output
    assert "must be an absolute http(s) URL" in result.output
    assert "hunter2" not in result.output


def test_profiles_with_problems_stop_a_command_before_it_starts(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "profiles" / "intake").mkdir(parents=True)
    (tmp_path / "profiles" / "intake" / "broken.yaml").write_text("kind: intake\nid: [\n")
    monkeypatch.setenv("GATEWAY_PROFILES_DIR", str(tmp_path / "profiles"))
    result = runner.invoke(app, ["worker"])
    assert result.exit_code == 2, result.output
    assert "broken.yaml" in result.output


def test_clients_create_with_a_jwks_registers_a_smart_backend_client(
    migrated: Path, tmp_path: Path
) -> None:
    import json

    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    public = tmp_path / "jwks.json"
    public.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    args = ["clients", "create", "ehr-backend", "--scope", "fhir:read", "--jwks", str(public)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    with sqlite3.connect(migrated) as conn:
        (stored,) = conn.execute(
            "SELECT jwks FROM api_clients WHERE name = 'ehr-backend'"
        ).fetchone()
    assert json.loads(stored)["keys"][0]["kid"] == "k1"
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
    refused = runner.invoke(
        app, ["clients", "create", "leaky", "--scope", "fhir:read", "--jwks", str(private)]
    )
    assert refused.exit_code != 0
    assert "public key only" in refused.stderr
    url = runner.invoke(
        app,
        [
            "clients",
            "create",
            "by-url",
            "--scope",
            "fhir:read",
            "--jwks-url",
            "https://ehr.example/.well-known/jwks.json",
        ],
    )
    assert url.exit_code == 0, url.stderr


def _commands() -> list[tuple[list[str], Any]]:
    import click
    import typer.main

    found: list[tuple[list[str], Any]] = []

    def walk(command: Any, path: list[str]) -> None:
        found.append((path, command))
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def test_help_texts_are_plain_paragraphs() -> None:
    """Issue 15: no reST markup (``--workers N``) and no line breaks inside a paragraph
    (the terminal wraps; typer keeps the source's breaks after the first paragraph)."""
    for path, command in _commands():
        text = command.help or ""
        assert "``" not in text, path
        assert ":func:`" not in text and ":mod:`" not in text, path
        for paragraph in text.split("\n\n"):
            assert "\n" not in paragraph, (path, paragraph)
        for param in command.params:
            assert "``" not in (getattr(param, "help", None) or ""), (path, param.name)


def test_rendered_help_shows_no_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    for args in (["serve"], ["mllp"], ["deliveries", "show"], ["profiles", "preview"]):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, result.output
        assert "``" not in result.output, args
    serve = runner.invoke(app, ["serve", "--help"]).output
    assert "--workers N processes" in serve


def test_mllp_help_names_the_real_default_of_max_message_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["mllp", "--help"])
    assert "GATEWAY_MAX_BODY_BYTES" in result.output
    assert "[default: 0]" not in result.output
