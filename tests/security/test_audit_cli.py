"""``fhir-gateway audit verify|export|purge`` on a SQLite file (typer's CliRunner): the
CLI's own actions are audited as ``cli:<user>``, verify exits 1 on a changed entry, the
export is NDJSON of valid AuditEvents in a 0600 file."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from typer.testing import CliRunner

from gateway.cli import app

runner = CliRunner()


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "gw.db"
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{path}")
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    for name in ("alpha", "beta"):
        result = runner.invoke(app, ["clients", "create", name, "--scope", "fhir:read"])
        assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["clients", "revoke", "beta"]).exit_code == 0
    return path


def test_verify_passes_then_finds_a_changed_entry(db: Path) -> None:
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "checked 3 entries (seq 1..3), chained 3 now, 0 not chained yet" in result.stdout
    assert "audit chain OK" in result.stdout
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_log SET action = 'read' WHERE seq = 2")
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 1
    assert "seq 2 (id 2): the entry does not match its hash" in result.stderr


def test_export_writes_ndjson_audit_events_to_a_private_file(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit.ndjson"
    result = runner.invoke(app, ["audit", "export", "-o", str(out), "--action", "C"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(events) == 2  # the two clients created (the revoke is an update)
    for event in events:
        AuditEvent.model_validate(event)
        assert event["action"] == "C"
        assert event["agent"][0]["who"]["display"].startswith("cli:")
        assert {e["url"] for e in event["extension"][0]["extension"]} == {"seq", "prevHash", "hash"}
    result = runner.invoke(app, ["audit", "export", "--since", "not-a-date"])
    assert result.exit_code == 2


def test_purge_keeps_a_verifiable_chain(db: Path) -> None:
    assert runner.invoke(app, ["audit", "seal"]).exit_code == 0
    result = runner.invoke(app, ["audit", "purge", "--before", "2999-01-01T00:00:00Z"])
    assert result.exit_code == 0, result.output
    assert "deleted 3 audit entries" in result.stdout
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "audit chain OK" in result.stdout
