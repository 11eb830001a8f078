"""``fhir-gateway import --workers N``: NDJSON files cut into parts at line starts, the
parts imported by N processes on PostgreSQL, the job's counts added up, the same
patient across parts stored once, a deadlocked batch run again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from gateway.cli import app
from gateway.db.models import FhirResource, ImportFile, ImportJob
from gateway.imports import service
from gateway.imports.readers import read_ndjson, split_ndjson
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests import samples
from tests.samples import EXAMPLES

runner = CliRunner()


def test_split_ndjson_cuts_at_line_starts_and_the_parts_cover_every_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.ndjson"
    lines = [json.dumps({"submission_id": f"s-{i}", "pad": "x" * (i % 53)}) for i in range(500)]
    path.write_bytes(("\r\n".join(lines) + "\r\n\r\n").encode())  # CRLF, a blank line at the end
    for parts in (1, 2, 3, 8, 499, 2000):
        cuts = split_ndjson(path, parts)
        assert cuts[0] == (0, 1)
        assert len(cuts) <= parts
        data = path.read_bytes()
        assert all(data[start - 1 : start] == b"\n" for start, _ in cuts[1:])
        stops: list[int | None] = [start for start, _ in cuts[1:]]
        seen = []
        for (start, line), stop in zip(cuts, [*stops, None], strict=True):
            seen += [
                (r.line, r.raw) for r in read_ndjson(path, start=start, first_line=line, stop=stop)
            ]
        assert seen == [(i + 1, line.encode()) for i, line in enumerate(lines)], parts


@pytest.fixture
def pg_cli(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATEWAY_DATABASE_URL", postgres_url)
    monkeypatch.setenv("GATEWAY_LOG_LEVEL", "warning")
    monkeypatch.setattr(service, "MIN_PART_BYTES", 1)  # split even a small file
    return postgres_url


def _counts(result: Any) -> dict[str, int]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.postgres
def test_two_processes_import_one_file_and_a_rerun_finds_duplicates(
    pg_cli: str, tmp_path: Path
) -> None:
    # A patient's intake in the first half and their checkout in the second: the two
    # processes must settle on one Patient, as two concurrent live requests do.
    intake = samples.intake()
    email = intake["patient"]["email"].strip().lower()
    checkout = samples.canonical_checkout()
    checkout["customer"]["email"] = email
    records = [samples.varied(samples.intake(), i) for i in range(10)]
    records += [samples.varied(samples.canonical_checkout(), 10 + i) for i in range(8)]
    lines = [json.dumps(r) for r in records]
    lines.insert(0, json.dumps(intake))
    lines.insert(5, "{not json")
    lines.append(json.dumps(checkout))
    history = tmp_path / "history.ndjson"
    history.write_text("\n".join(lines) + "\n")

    counts = _counts(
        runner.invoke(app, ["import", str(history), "--workers", "2", "--no-progress"])
    )
    assert (counts["read"], counts["mapped"], counts["refused"]) == (21, 20, 1)

    async def stored() -> tuple[list[ImportFile], ImportJob, int | None]:
        runtime = Runtime.create(Settings(database_url=pg_cli, _env_file=None))  # type: ignore[call-arg]
        try:
            async with runtime.sessionmaker() as session:
                parts = list(
                    (await session.scalars(select(ImportFile).order_by(ImportFile.id))).all()
                )
                job = (await session.scalars(select(ImportJob))).one()
                patients = await session.scalar(
                    select(func.count())
                    .select_from(FhirResource)
                    .where(FhirResource.resource_type == "Patient")
                )
                return parts, job, patients
        finally:
            await runtime.close()

    parts, job, patients = asyncio.run(stored())
    assert len(parts) == 2 and {p.status for p in parts} == {"completed"}
    assert parts[0].start_offset == 0 and parts[0].stop_offset == parts[1].start_offset
    assert parts[0].cursor == parts[0].stop_offset and parts[1].stop_offset is None
    assert parts[1].cursor == history.stat().st_size
    assert job.status == "completed"
    assert patients == 19  # 10 + 8 varied, and the one patient of both halves

    again = _counts(runner.invoke(app, ["import", str(history), "--workers", "2", "--no-progress"]))
    assert (again["duplicate"], again["mapped"], again["refused"]) == (20, 0, 1)


def test_workers_are_refused_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{tmp_path / 'g.db'}")
    history = tmp_path / "h.ndjson"
    history.write_text(json.dumps(samples.intake()) + "\n")
    result = runner.invoke(app, ["import", str(history), "--workers", "2", "--no-progress"])
    assert result.exit_code == 2
    assert "--workers needs PostgreSQL" in result.output


async def _three_intakes_job(
    runtime: Runtime, tmp_path: Path
) -> tuple[Path, service.ImportSource, ImportJob]:
    """A file of three intakes and an import job made for it."""
    history = tmp_path / "h.ndjson"
    history.write_text("\n".join(json.dumps(samples.intake()) for _ in range(3)) + "\n")
    source = service.ImportSource(name=history.name, path=history)
    async with runtime.sessionmaker() as session:
        job = await service.create_job(
            session, source="x", notify=False, actor="t", csv_profile=None, files=[source]
        )
        await session.commit()
    return history, source, job


async def test_a_batch_aborted_as_a_deadlock_is_run_again_whole(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL aborts one of two deadlocked transactions (SQLSTATE 40P01); the
    import runs that batch again instead of failing the job."""
    _, source, job = await _three_intakes_job(runtime, tmp_path)
    real = service._import_record
    calls = {"n": 0}

    async def deadlocks_once(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the second record of the first attempt
            raise DBAPIError("INSERT ...", None, psycopg.errors.DeadlockDetected())
        return await real(*args)

    monkeypatch.setattr(service, "_import_record", deadlocks_once)
    monkeypatch.setattr(service.random, "uniform", lambda a, b: 0.0)
    counts = await service.run_job(runtime, job.id, [source], batch_size=3)
    assert (counts["read"], counts["mapped"], counts["duplicate"]) == (3, 3, 0)
    assert calls["n"] == 5  # 1 + the deadlocked one, then the whole batch of 3 again
    async with runtime.sessionmaker() as session:
        patients = await session.scalar(
            select(func.count())
            .select_from(FhirResource)
            .where(FhirResource.resource_type == "Patient")
        )
    assert patients == 3  # the first attempt left nothing behind


@pytest.mark.postgres
def test_a_bulk_data_export_in_parallel_imports_its_patients_first(pg_cli: str) -> None:
    """Patient files are a phase of their own: the processes that import the other
    files start once every Patient is stored, whatever the order given."""
    export = EXAMPLES / "fhir-bulk-export"
    files = [str(export / f"{t}.ndjson") for t in ("MedicationRequest", "QuestionnaireResponse")]
    counts = _counts(
        runner.invoke(
            app,
            ["import", *files, str(export / "Patient.ndjson"), "--workers", "2", "--no-progress"],
        )
    )
    assert (counts["read"], counts["mapped"], counts["refused"]) == (6, 6, 0)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.postgres
def test_a_killed_process_stops_the_run_and_the_same_command_resumes_it(
    pg_cli: str, tmp_path: Path
) -> None:
    """``kill -9`` of one import process: the command stops the other, exits 1 saying
    how to resume, and the same command then finishes the job: every record stored
    once, none read twice."""
    history = tmp_path / "history.ndjson"
    history.write_text(
        "".join(json.dumps(samples.varied(samples.intake(), i)) + "\n" for i in range(240))
    )
    command = [
        str(Path(sys.executable).with_name("fhir-gateway")),
        "import",
        str(history),
        "--workers",
        "2",
        "--batch-size",
        "10",
        "--no-progress",
    ]
    assert history.stat().st_size >= 256 * 1024  # the default MIN_PART_BYTES: 2 parts
    env = dict(os.environ)  # the test's database (pg_cli)
    cli = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    victims: list[int] = []
    while time.monotonic() < deadline and cli.poll() is None:
        with psycopg.connect(pg_cli.replace("+psycopg", "")) as conn:
            row = conn.execute("SELECT coalesce(sum(read), 0) FROM import_jobs").fetchone()
        victims = [p for p in _children(cli.pid) if "spawn_main" in _cmdline(p)]
        if row and row[0] >= 20 and len(victims) == 2:
            break
        time.sleep(0.2)
    assert victims, "the import processes did not start"
    os.kill(victims[0], signal.SIGKILL)
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 1
    assert b"run the same command again to resume" in err

    again = subprocess.run(command, env=env, capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert b"resuming import job" in again.stderr
    counts = json.loads(again.stdout.decode().strip().splitlines()[-1])
    assert (counts["read"], counts["mapped"], counts["duplicate"]) == (240, 240, 0)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_parallel_processes_refuse_a_file_changed_since_the_job_started(
    runtime: Runtime, tmp_path: Path
) -> None:
    """``run_parallel`` hashes each file once and checks it against the job before any
    process starts (so on either database): a changed file is refused and nothing is
    imported."""
    from gateway.clients.actor import Actor
    from gateway.imports.parallel import run_parallel

    history, source, job = await _three_intakes_job(runtime, tmp_path)
    history.write_text(json.dumps(samples.intake()) + "\n")
    with pytest.raises(service.ImportFileError, match="changed since the job started"):
        await run_parallel(
            runtime, job.id, [source], workers=2, batch_size=3, actor=Actor("user", "t")
        )
    async with runtime.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(FhirResource)) == 0
