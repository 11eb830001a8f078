"""Import jobs of uploaded files (``POST /v1/imports``): kept in the database until they
complete, run in the background of an API process, resumed after a crash.

An upload is stored with its job (``import_files.body``), so a job survives the process
that ran it. A job is owned by one run at a time (:func:`gateway.imports.service.claim_job`,
a fencing token checked by every batch): ``POST /v1/imports/{id}/resume`` takes over a job
whose run stopped, and a gateway process (``serve``) takes over, at start-up and then every
:data:`SWEEP_INTERVAL_S`, every upload job whose run made no progress for
:data:`gateway.imports.service.STALE_AFTER_S` seconds (its process was killed or
restarted). Two processes that try at once: one wins, the other finds it claimed.
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.clients.actor import SYSTEM, Actor, acting_as
from gateway.db.models import ImportFile, ImportJob, ImportStatus
from gateway.db.types import utcnow
from gateway.imports import repository as repo
from gateway.imports.service import (
    STALE_AFTER_S,
    ImportFileError,
    ImportSource,
    ImportTakenOver,
    claim_job,
    create_job,
    run_job,
)
from gateway.logging import get_logger
from gateway.runtime import Runtime

log = get_logger(__name__)

#: How often a server process looks for stopped upload jobs to take over (seconds).
SWEEP_INTERVAL_S = 60.0

#: Jobs of uploads running in this process (kept referenced until they end).
_RUNNING: set[asyncio.Task[Any]] = set()


async def create_upload_job(
    session: AsyncSession,
    *,
    body: bytes,
    name: str,
    source: str,
    notify: bool,
    actor: str,
    csv_profile: str | None,
) -> ImportJob:
    """A job for one uploaded file, kept in its row until the job completes (flushes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(body)
        job = await create_job(
            session,
            source=source,
            notify=notify,
            actor=actor,
            csv_profile=csv_profile,
            files=[ImportSource(name=name, path=path)],
        )
    await session.execute(update(ImportFile).where(ImportFile.job_id == job.id).values(body=body))
    return job


async def run_upload_job(
    runtime: Runtime, job_id: str, *, actor: Actor, runner: str | None = None
) -> dict[str, Any]:
    """Run (or resume) a job of uploaded files: each is written to a temporary file and
    imported like a file of the command line; the uploads are dropped once it completes
    (not when another run took it over: that one still reads them).

    Args:
        runtime: the wired runtime.
        job_id: the job.
        actor: who runs it (its audit entries name it).
        runner: the token of a claim made already (:func:`claim_job`); None: take the
            job (a new upload's first run).

    Raises:
        ImportFileError: as :func:`gateway.imports.service.run_job`.
    """
    with acting_as(actor), tempfile.TemporaryDirectory() as tmp:
        async with runtime.sessionmaker() as session:
            rows = await repo.job_files(session, job_id)
            sources = []
            for row in rows:
                path = Path(tmp) / f"{row.id}{Path(row.name).suffix}"
                path.write_bytes(row.body or b"")
                sources.append(ImportSource(name=row.name, path=path))
        counts = await run_job(runtime, job_id, sources, runner=runner)
    async with runtime.write_session() as session:
        job = await repo.get_job_or_raise(session, job_id)
        if job.status == ImportStatus.COMPLETED:
            await session.execute(
                update(ImportFile).where(ImportFile.job_id == job_id).values(body=None)
            )
            await session.commit()
    return counts


def start_upload_job(
    runtime: Runtime, job_id: str, *, actor: Actor, runner: str | None = None
) -> None:
    """Run :func:`run_upload_job` in the background of this process (the API answers at
    once with the job resource). An unexpected error leaves the job ``failed`` with the
    error's type (resumable by ``POST /v1/imports/{id}/resume``); a killed process leaves
    it ``running``, taken over by a gateway process later."""

    async def work() -> None:
        try:
            await run_upload_job(runtime, job_id, actor=actor, runner=runner)
        except (ImportFileError, ImportTakenOver):
            pass  # recorded on the job / another run goes on with it
        except Exception as exc:
            # Failed, not left running: the sweep would take it over and crash again on
            # the same record every few minutes. POST .../resume retries it by hand.
            log.error("import.crashed", job_id=job_id, error_type=type(exc).__name__)
            await _mark_crashed(runtime, job_id, type(exc).__name__)

    task = asyncio.create_task(work())
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


async def resume_stopped_uploads(
    runtime: Runtime, *, stale_after_s: float = STALE_AFTER_S
) -> list[str]:
    """Take over every upload job whose run stopped (``running``, its upload kept, no
    batch committed for ``stale_after_s`` seconds) and run it in this process.

    Returns:
        The ids of the jobs taken over (a job another process claimed first is not).
    """
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    async with runtime.sessionmaker() as session:
        stopped = (
            await session.scalars(
                select(ImportJob.id)
                .where(
                    ImportJob.status == ImportStatus.RUNNING,
                    ImportJob.updated_at < cutoff,
                    ImportJob.id.in_(select(ImportFile.job_id).where(ImportFile.body.is_not(None))),
                )
                .order_by(ImportJob.created_at)
            )
        ).all()
    resumed = []
    for job_id in stopped:
        async with runtime.write_session() as session:
            runner = await claim_job(session, job_id, stale_after_s=stale_after_s)
            await session.commit()
        if runner is not None:
            log.info("import.resumed", job_id=job_id)
            start_upload_job(runtime, job_id, actor=SYSTEM, runner=runner)
            resumed.append(job_id)
    return resumed


async def sweep_stopped_uploads(runtime: Runtime, stop: asyncio.Event) -> None:
    """:func:`resume_stopped_uploads` at once and every :data:`SWEEP_INTERVAL_S` until
    ``stop`` is set (a server process's background task)."""
    while not stop.is_set():
        try:
            await resume_stopped_uploads(runtime)
        except Exception as exc:  # a database blip: try again at the next sweep
            log.warning("import.sweep_failed", error_type=type(exc).__name__)
        try:
            await asyncio.wait_for(stop.wait(), SWEEP_INTERVAL_S)
        except TimeoutError:
            continue


async def _mark_crashed(runtime: Runtime, job_id: str, error_type: str) -> None:
    try:
        async with runtime.write_session() as session:
            await session.execute(
                update(ImportJob)
                .where(ImportJob.id == job_id, ImportJob.status == ImportStatus.RUNNING)
                .values(
                    status=ImportStatus.FAILED,
                    error=f"the import stopped on an unexpected error ({error_type})",
                    updated_at=utcnow(),
                )
            )
            await session.commit()
    except Exception as exc:  # the database is gone too: the sweep will retry the job
        log.error("import.not_marked_failed", job_id=job_id, error_type=type(exc).__name__)


def running_upload_jobs() -> int:
    """Upload jobs running in this process."""
    return len(_RUNNING)


async def wait_for_uploads() -> None:
    """Wait until the upload jobs of this process end (tests, shutdown)."""
    while _RUNNING:
        await asyncio.gather(*list(_RUNNING), return_exceptions=True)
