"""``fhir-gateway import`` and ``fhir-gateway reconcile`` on the command line."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from tests import samples

runner = CliRunner()


@pytest.fixture
def migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("GATEWAY_LOG_LEVEL", "warning")
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    return tmp_path


def test_import_prints_the_counts_writes_refusals_and_a_rerun_finds_duplicates(
    migrated: Path,
) -> None:
    history = migrated / "history.ndjson"
    lines = [json.dumps(samples.intake()), "{oops", json.dumps(samples.canonical_checkout())]
    history.write_text("\n".join(lines) + "\n")
    refusals = migrated / "refused.ndjson"
    result = runner.invoke(
        app,
        [
            "import",
            str(history),
            "--source",
            "old-crm",
            "--refusals",
            str(refusals),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert (counts["read"], counts["mapped"], counts["refused"]) == (3, 2, 1)
    [refused] = [json.loads(line) for line in refusals.read_text().splitlines()]
    assert refused["line"] == 2 and refused["record"] == "{oops"

    again = runner.invoke(app, ["import", str(history), "--no-progress"])
    assert again.exit_code == 0, again.output
    counts = json.loads(again.stdout.strip().splitlines()[-1])
    assert counts["duplicate"] == 2 and counts["mapped"] == 0


def test_a_csv_without_its_profile_is_refused_with_exit_2(migrated: Path) -> None:
    orders = migrated / "orders.csv"
    orders.write_text("order_id\n1\n")
    result = runner.invoke(app, ["import", str(orders), "--csv-profile", "nope", "--no-progress"])
    assert result.exit_code == 2
    assert "no CSV import profile 'nope'" in result.output


def test_reconcile_names_an_unknown_target(migrated: Path) -> None:
    result = runner.invoke(app, ["reconcile", "no-such-ehr"])
    assert result.exit_code == 2
    assert "no EHR target 'no-such-ehr'" in result.output


def test_import_of_a_fhir_bulk_export_takes_the_patient_file_first(migrated: Path) -> None:
    export = Path(__file__).resolve().parents[3] / "examples" / "fhir-bulk-export"
    files = [str(export / f"{name}.ndjson") for name in ("QuestionnaireResponse", "Patient")]
    args = ["import", *files, "--source", "old-emr", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert (counts["read"], counts["mapped"], counts["refused"]) == (4, 4, 0)

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    counts = json.loads(again.stdout.strip().splitlines()[-1])
    assert (counts["duplicate"], counts["mapped"]) == (4, 0)


def test_the_same_files_under_another_path_resume_their_job(migrated: Path, tmp_path: Path) -> None:
    """A job is found by its files' content: run from another directory, or with the
    file moved, the command resumes it (its parts keep their names)."""
    first = migrated / "a" / "history.ndjson"
    first.parent.mkdir()
    first.write_text(json.dumps(samples.intake()) + "\n")
    started = runner.invoke(app, ["import", str(first), "--no-progress"])
    assert started.exit_code == 0, started.output
    # a job left running (as after a crash), then the file moved
    with sqlite3.connect(migrated / "cli.db") as db:
        db.execute("UPDATE import_jobs SET status = 'running'")
        db.execute("UPDATE import_files SET status = 'running', cursor = 0, line = 1")
    moved = migrated / "b" / "moved.ndjson"
    moved.parent.mkdir()
    first.rename(moved)
    again = runner.invoke(app, ["import", str(moved), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "resuming import job" in again.output
    counts = json.loads(again.stdout.strip().splitlines()[-1])
    assert counts["duplicate"] == 1  # read again from its cursor, stored once
