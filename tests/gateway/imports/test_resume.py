"""One run owns an import job at a time: a job resumed elsewhere stops the run it
replaced at that run's next batch (nothing of that batch committed); the API's resume
refuses a job whose run is making progress and takes over a stopped one; a gateway
process takes over a stopped upload job by itself."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from gateway.clients.actor import SYSTEM
from gateway.db.models import FhirResource, ImportFile, ImportJob
from gateway.db.types import utcnow
from gateway.imports import repository as repo
from gateway.imports import service
from gateway.imports.service import (
    ImportSource,
    ImportTakenOver,
    claim_job,
    create_job,
    run_job,
)
from gateway.imports.uploads import (
    create_upload_job,
    resume_stopped_uploads,
    start_upload_job,
    wait_for_uploads,
)
from gateway.runtime import Runtime
from tests import samples


def _history(n: int) -> bytes:
    return b"".join(
        json.dumps(samples.varied(samples.intake(), i)).encode() + b"\n" for i in range(n)
    )


async def _patients(runtime: Runtime) -> int:
    async with runtime.sessionmaker() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(FhirResource)
                .where(FhirResource.resource_type == "Patient")
            )
            or 0
        )


async def _age(runtime: Runtime, job_id: str, seconds: float) -> None:
    """Make the job's last progress ``seconds`` old (its run stopped that long ago)."""
    async with runtime.write_session() as session:
        await session.execute(
            update(ImportJob)
            .where(ImportJob.id == job_id)
            .values(updated_at=utcnow() - timedelta(seconds=seconds))
        )
        await session.commit()


async def test_a_run_taken_over_stops_at_its_next_batch(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "history.ndjson"
    path.write_bytes(_history(6))
    source = ImportSource(name=path.name, path=path)
    async with runtime.sessionmaker() as session:
        job = await create_job(
            session, source="x", notify=False, actor="t", csv_profile=None, files=[source]
        )
        await session.commit()
    other: list[str | None] = []
    counts_of = repo.job_counts

    async def counts_then_taken_over(session: Any, job_id: str, **kw: Any) -> dict[str, int]:
        """After the first batch committed, another run claims the job (as a second
        ``import`` of the same files does)."""
        if not other:
            async with runtime.write_session() as write:
                other.append(await claim_job(write, job_id, force=True))
                await write.commit()
        return await counts_of(session, job_id, **kw)

    monkeypatch.setattr(repo, "job_counts", counts_then_taken_over)
    with pytest.raises(ImportTakenOver):
        await run_job(runtime, job.id, [source], batch_size=2)
    monkeypatch.undo()
    assert await _patients(runtime) == 2  # its second batch was rolled back
    async with runtime.sessionmaker() as session:
        row = await session.get(ImportJob, job.id)
        assert row is not None and row.status == "running" and row.runner == other[0]

    done = await run_job(runtime, job.id, [source], batch_size=2, runner=other[0])
    assert (done["read"], done["mapped"], done["duplicate"]) == (6, 6, 0)
    assert await _patients(runtime) == 6


async def test_only_one_of_two_claims_of_a_stopped_job_wins(runtime: Runtime) -> None:
    async with runtime.write_session() as session:
        job = await create_upload_job(
            session,
            body=_history(1),
            name="h.ndjson",
            source="x",
            notify=False,
            actor="t",
            csv_profile=None,
        )
        await session.commit()
    await _age(runtime, job.id, 600)
    async with runtime.write_session() as session:
        first = await claim_job(session, job.id)
        await session.commit()
    async with runtime.write_session() as session:
        second = await claim_job(session, job.id)
        await session.commit()
    assert first is not None and second is None


async def test_resume_refuses_a_running_job_and_takes_over_a_stopped_one(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    async with runtime.write_session() as session:
        job = await create_upload_job(
            session,
            body=_history(3),
            name="h.ndjson",
            source="x",
            notify=False,
            actor="t",
            csv_profile=None,
        )
        assert await claim_job(session, job.id) is None  # fresh: a run would own it
        assert await claim_job(session, job.id, force=True) is not None  # "its run"
        await session.commit()

    r = await client.post(f"/v1/imports/{job.id}/resume", headers=admin_headers)
    assert r.status_code == 409, r.text
    assert r.json()["errors"][0]["code"] == "running"

    await _age(runtime, job.id, 600)  # its process died ten minutes ago
    r = await client.post(f"/v1/imports/{job.id}/resume", headers=admin_headers)
    assert r.status_code == 202, r.text
    await wait_for_uploads()
    r = await client.get(f"/v1/imports/{job.id}", headers=admin_headers)
    assert r.json()["status"] == "completed"
    assert r.json()["counts"]["mapped"] == 3


async def test_a_gateway_process_takes_over_a_stopped_upload_job(runtime: Runtime) -> None:
    async with runtime.write_session() as session:
        job = await create_upload_job(
            session,
            body=_history(2),
            name="h.ndjson",
            source="x",
            notify=False,
            actor="t",
            csv_profile=None,
        )
        await claim_job(session, job.id, force=True)  # a run that then died
        await session.commit()

    assert await resume_stopped_uploads(runtime) == []  # not stopped long enough yet
    await _age(runtime, job.id, 600)
    assert await resume_stopped_uploads(runtime) == [job.id]
    await wait_for_uploads()
    async with runtime.sessionmaker() as session:
        row = await session.get(ImportJob, job.id, populate_existing=True)
        assert row is not None and row.status == "completed" and row.read == 2
        bodies = await session.scalars(select(ImportFile.body).where(ImportFile.job_id == job.id))
        assert list(bodies) == [None]  # the upload is dropped once the job completed
    assert await resume_stopped_uploads(runtime) == []


async def test_resume_refuses_a_job_of_the_command_line(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], tmp_path: Path
) -> None:
    """The API has no copy of a command-line job's files: resuming it there would fail it."""
    path = tmp_path / "history.ndjson"
    path.write_bytes(_history(1))
    async with runtime.write_session() as session:
        job = await create_job(
            session,
            source="x",
            notify=False,
            actor="t",
            csv_profile=None,
            files=[ImportSource(name=str(path), path=path)],
        )
        await session.commit()
    await _age(runtime, job.id, 600)
    r = await client.post(f"/v1/imports/{job.id}/resume", headers=admin_headers)
    assert r.status_code == 409, r.text
    assert r.json()["errors"][0]["code"] == "not_an_upload"


async def test_an_upload_job_that_crashes_is_failed_not_taken_over_again(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error (a bug, not a bad record) fails the job with the error's type;
    left running, every gateway process would take it over and crash again."""

    async def boom(*_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "_import_record", boom)
    async with runtime.write_session() as session:
        job = await create_upload_job(
            session,
            body=_history(1),
            name="h.ndjson",
            source="x",
            notify=False,
            actor="t",
            csv_profile=None,
        )
        await session.commit()
    start_upload_job(runtime, job.id, actor=SYSTEM)
    await wait_for_uploads()
    async with runtime.sessionmaker() as session:
        row = await session.get(ImportJob, job.id)
        assert row is not None and row.status == "failed"
        assert row.error == "the import stopped on an unexpected error (RuntimeError)"
    await _age(runtime, job.id, 600)
    assert await resume_stopped_uploads(runtime) == []
