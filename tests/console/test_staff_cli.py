"""``fhir-gateway staff create|list|disable|enable|password|role`` on a migrated SQLite
file: argon2id hashes, never a password on screen, audited as the CLI user."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from gateway.cli import app
from tests.gateway.test_cli import db_path, migrated  # noqa: F401 - fixtures

runner = CliRunner()
PASSWORD = "a long enough password"


def _row(path: Path, username: str) -> tuple[str, str, int]:
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT password_hash, role, active FROM staff_users WHERE username = ?", (username,)
        ).fetchone()
    assert row is not None
    return row


def test_create_list_disable_and_change_password(migrated: Path) -> None:  # noqa: F811
    created = runner.invoke(
        app, ["staff", "create", "alice", "--role", "operator"], input=f"{PASSWORD}\n{PASSWORD}\n"
    )
    assert created.exit_code == 0, created.output
    assert PASSWORD not in created.stdout.replace("Password", "")
    hashed, role, active = _row(migrated, "alice")
    assert hashed.startswith("$argon2id$") and role == "operator" and active == 1

    listed = runner.invoke(app, ["staff", "list"])
    assert listed.stdout.startswith("alice\toperator\tactive")

    again = runner.invoke(
        app, ["staff", "create", "alice", "--password-stdin"], input=f"{PASSWORD}\n"
    )
    assert again.exit_code == 2 and "taken" in again.output

    assert runner.invoke(app, ["staff", "disable", "alice"]).exit_code == 0
    assert _row(migrated, "alice")[2] == 0
    changed = runner.invoke(
        app, ["staff", "password", "alice", "--password-stdin"], input="another long password\n"
    )
    assert changed.exit_code == 0, changed.output
    assert _row(migrated, "alice")[0] != hashed
    assert runner.invoke(app, ["staff", "role", "alice", "admin"]).exit_code == 0
    assert _row(migrated, "alice")[1] == "admin"
    with sqlite3.connect(migrated) as conn:
        actors = {r[0] for r in conn.execute("SELECT actor FROM audit_log")}
    assert all(a.startswith("cli:") for a in actors) and actors


def test_short_passwords_and_unknown_roles_are_refused(migrated: Path) -> None:  # noqa: F811
    short = runner.invoke(app, ["staff", "create", "bob", "--password-stdin"], input="short\n")
    assert short.exit_code == 2 and "12" in short.output
    role = runner.invoke(
        app, ["staff", "create", "bob", "--role", "root", "--password-stdin"], input=f"{PASSWORD}\n"
    )
    assert role.exit_code == 2 and "viewer" in role.output
    missing = runner.invoke(app, ["staff", "disable", "nobody"])
    assert missing.exit_code == 1
