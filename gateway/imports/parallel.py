"""One import job run by several processes (``fhir-gateway import --workers N``, issue 16).

An import is bound by CPU: each record takes the live channel's path (mapping,
validation, patient matching, merge review, storage, case, audit), about 10-15 ms of one
core. One process uses one core; this module uses N, on PostgreSQL (SQLite has a
single writer, so the command refuses ``--workers`` there).

How:

* :func:`gateway.imports.service.create_job` with ``parts=N`` gives each NDJSON file N
  rows (byte ranges cut at line starts), each with its own cursor;
* the parts are dealt round-robin to N processes (``multiprocessing`` *spawn*: a fresh
  interpreter each, with its own runtime and database pool), each running
  :func:`gateway.imports.service.run_job` on its parts only, in its own transactions;
* the job's counts are increments (``read = read + n``), so the processes add to them
  side by side; the parent polls them for the progress bar, and marks the job
  ``completed`` once every process ended well;
* files that must come first (a FHIR Bulk Data ``Patient`` file: the other resources
  refer to its Patients) are a phase of their own: every process works on them, and the
  next phase starts when they are all stored.

Records of one patient in two parts (an intake in one, its checkout in the other) are
settled as concurrent live requests are: the patient key claimed first wins, the other
transaction waits for it and then merges into that patient. Two batches that claim keys
in opposite orders may deadlock; PostgreSQL aborts one and
:func:`gateway.imports.service._store_batch` runs it again.

A process that dies leaves its parts' cursors at their last committed batch: running the
same command again resumes every part where it stopped (the job is found by its files'
SHA-256).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from typing import Any

from gateway.clients.actor import Actor, acting_as
from gateway.db.models import ImportStatus
from gateway.imports import fhir_bulk
from gateway.imports import repository as repo
from gateway.imports.service import (
    ImportFileError,
    ImportSource,
    ImportTakenOver,
    claim_job,
    finish_job,
    run_job,
)
from gateway.logging import configure_logging, get_logger
from gateway.runtime import Runtime
from gateway.settings import Settings

log = get_logger(__name__)

#: ``on_tick(bytes done, counts)``: the job's progress, polled every
#: :data:`POLL_INTERVAL_S` while the processes run.
TickCallback = Callable[[int, dict[str, int]], None]

#: How often the parent reads the job's counts (seconds).
POLL_INTERVAL_S = 0.5

#: A process's exit code when another run took the job over.
TAKEN_OVER_EXIT = 4


def _phase(source: ImportSource) -> int:
    """0 for the files every other must wait for (FHIR Bulk Data Patient files), else 1."""
    return 1 if source.is_csv else fhir_bulk.file_rank(source.path)


def _worker(
    settings: Settings,
    job_id: str,
    files: list[tuple[str, str, str]],
    row_ids: list[int],
    batch_size: int,
    actor: Actor,
    runner: str,
) -> None:
    """A process's work: import the parts ``row_ids`` of job ``job_id`` as run ``runner``
    (exit code 0; 3 when a file cannot be imported: the job is then ``failed`` with the
    reason; :data:`TAKEN_OVER_EXIT` when another run took the job over)."""
    from pathlib import Path

    configure_logging(settings.log_level, json=settings.log_json)

    async def work() -> None:
        runtime = Runtime.create(settings)
        try:
            with acting_as(actor):
                await run_job(
                    runtime,
                    job_id,
                    [
                        ImportSource(name=name, path=Path(path), sha256=sha256)
                        for name, path, sha256 in files
                    ],
                    batch_size=batch_size,
                    only=set(row_ids),
                    finish=False,
                    runner=runner,
                )
        finally:
            await runtime.close()

    try:
        asyncio.run(work())
    except ImportFileError:
        raise SystemExit(3) from None
    except ImportTakenOver:
        raise SystemExit(TAKEN_OVER_EXIT) from None


async def _bytes_done(runtime: Runtime, job_id: str) -> tuple[int, dict[str, int]]:
    async with runtime.sessionmaker() as session:
        rows = await repo.job_files(session, job_id)
        counts = await repo.job_counts(session, job_id, with_delivered=False)
    return sum(row.cursor - row.start_offset for row in rows), counts


async def run_parallel(
    runtime: Runtime,
    job_id: str,
    files: list[ImportSource],
    *,
    workers: int,
    batch_size: int,
    actor: Actor,
    on_tick: TickCallback | None = None,
) -> dict[str, Any]:
    """Import (or resume) job ``job_id`` with ``workers`` processes, phase by phase (see
    the module docstring); returns the job's counts once it is ``completed``.

    Args:
        runtime: this process's runtime (PostgreSQL; its settings go to the processes).
        job_id: a job made by :func:`gateway.imports.service.create_job`, best with
            ``parts=workers``.
        files: where each file of the job is read from.
        workers: processes at most per phase (fewer when there are fewer parts).
        batch_size: records per transaction.
        actor: who runs the import (its audit entries name it).
        on_tick: told the progress while the processes run.

    Raises:
        ImportFileError: a file cannot be imported (the job is ``failed`` with the
            reason), or a process died (the job stays resumable).
        ImportTakenOver: another run took the job over (these processes stopped).
    """
    by_name = {f.name: f for f in files}
    async with runtime.write_session() as session:
        runner = await claim_job(session, job_id, force=True)  # the latest run wins
        await session.commit()
    if runner is None:  # completed already
        async with runtime.sessionmaker() as session:
            return await repo.job_counts(session, job_id)
    async with runtime.sessionmaker() as session:
        rows = [
            r for r in await repo.job_files(session, job_id) if r.status != ImportStatus.COMPLETED
        ]
    missing = sorted({r.name for r in rows} - set(by_name))
    if missing:
        raise ImportFileError(f"{missing[0]}: not given to resume the job")
    # each file hashed once here (not once more in every process), checked against the job
    digests: dict[str, str] = {}
    for row in rows:
        if row.name not in digests:
            try:
                digests[row.name] = by_name[row.name].digest()
            except OSError as exc:
                raise ImportFileError(f"cannot read {row.name} ({exc.strerror})") from exc
            if digests[row.name] != row.sha256:
                raise ImportFileError(f"{row.name}: the file changed since the job started")
    phases: dict[int, list[int]] = {}
    for row in rows:
        phases.setdefault(_phase(by_name[row.name]), []).append(row.id)
    spawn = multiprocessing.get_context("spawn")
    paths = [(f.name, str(f.path), digests[f.name]) for f in files if f.name in digests]
    for phase in sorted(phases):
        ids = phases[phase]
        count = min(workers, len(ids))
        processes = [
            spawn.Process(
                target=_worker,
                args=(runtime.settings, job_id, paths, ids[k::count], batch_size, actor, runner),
                name=f"import-{k + 1}",
            )
            for k in range(count)
        ]
        try:
            for process in processes:
                process.start()
            log.info("import.processes", job_id=job_id, phase=phase, processes=count)
            first_failure = None
            while first_failure is None and any(p.is_alive() for p in processes):
                await asyncio.sleep(POLL_INTERVAL_S)
                if on_tick is not None:
                    on_tick(*await _bytes_done(runtime, job_id))
                first_failure = next(
                    (p.exitcode for p in processes if p.exitcode not in (None, 0)), None
                )
        finally:
            for process in processes:
                # the parent was interrupted, or a process failed: the job cannot complete
                # in this run, so the others stop too (their batches in hand roll back)
                if process.is_alive():
                    process.terminate()
                process.join()
        failed = [p.exitcode for p in processes if p.exitcode != 0]
        if first_failure is not None:
            failed.insert(0, first_failure)  # the cause, before the others' SIGTERM
        if TAKEN_OVER_EXIT in failed:
            raise ImportTakenOver(job_id)
        if failed:
            async with runtime.sessionmaker() as session:
                job = await repo.get_job_or_raise(session, job_id)
            if job.error:
                raise ImportFileError(job.error)
            raise ImportFileError(
                f"an import process ended with exit code {failed[0]}; "
                "run the same command again to resume"
            )
    if on_tick is not None:
        on_tick(*await _bytes_done(runtime, job_id))
    return await finish_job(runtime, job_id, runner)
