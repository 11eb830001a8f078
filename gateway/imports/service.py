"""Bulk backfill (issue 16): import history through the live channels.

Each record of an import file goes through the same channel code as live traffic
(:func:`gateway.ingest.intake.submit_intake`, :func:`gateway.ingest.checkout.submit_checkout`,
:func:`gateway.ingest.stripe.receive_stripe_event`; FHIR Bulk Data export lines through
:func:`gateway.imports.fhir_bulk.import_resource`, which stores with the same
:func:`gateway.ingest.storage.store_mapped`): the same profiles, normalizers,
patient matching and merge, storage with Provenance, outbox rows per EHR target, case
events and audit entries. What differs is carried by
:class:`gateway.ingest.storage.Migration` in the context:

* the inbox row's principal is ``import:<job id>`` (the job's records are found by it);
* the Provenance says the record was migrated, from which source, and when it happened
  (``occurredDateTime``);
* case changes are recorded, their ops webhooks stored ``suppressed`` (never sent)
  unless the job asks to ``notify``.

Idempotent on the business id: the inbox's dedupe key (``submission_id``, processor +
``checkout_id``, Stripe event id) answers a record seen before with its stored answer,
counted ``duplicate``; nothing is written twice. Records are committed in batches
(``batch_size`` records per transaction, each in a savepoint, so a refused record leaves
nothing behind and does not undo its batch); the file's cursor (byte offset) is
committed with its batch, so an import stopped by a crash resumes at the first record
not committed.

Error tree: a record that does not validate or map is *refused* (kept whole in
``import_refusals`` with its problems), never an exception; :class:`ImportFileError`
(a file that cannot be opened, an unknown CSV profile) stops the job, which is left
``failed`` with the reason.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import ImportFile, ImportJob, ImportRefusal, ImportStatus
from gateway.db.types import utcnow
from gateway.errors import GatewayError
from gateway.http import Outcome
from gateway.imports import fhir_bulk
from gateway.imports import repository as repo
from gateway.imports.readers import Record, file_sha256, read_csv, read_ndjson, split_ndjson
from gateway.ingest import checkout, intake, stripe
from gateway.ingest.storage import IngestContext, Migration
from gateway.logging import get_logger
from gateway.runtime import Runtime
from mappers.errors import MappingErrors, Problem
from mappers.profiles.imports import CsvImportProfile

log = get_logger(__name__)

#: Records per transaction.
DEFAULT_BATCH_SIZE = 200

#: A file smaller than this is not split into parts (``--workers``): a part's process
#: start-up (about 2 s) would cost more than it saves.
MIN_PART_BYTES = 256 * 1024

#: A batch whose transaction PostgreSQL aborted as a deadlock (SQLSTATE 40P01: two
#: processes' batches claimed the same patient keys in opposite orders) or a
#: serialization failure (40001) is run again, whole, up to this many times.
BATCH_ATTEMPTS = 5
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})

#: A running job with no batch committed for this long (seconds) is taken as stopped
#: (its process died): the API's resume and a restarted gateway may take it over.
STALE_AFTER_S = 120.0

#: ``on_progress(file row, counts)`` after each batch: the row (a file or a part of
#: one) has its new ``cursor``.
ProgressCallback = Callable[[ImportFile, dict[str, int]], None]


class ImportFileError(ValueError):
    """A file that cannot be imported at all (missing, unreadable, unknown CSV profile)."""


class ImportTakenOver(Exception):
    """Another run took the job over (:func:`claim_job`): this run stops, its batch in
    progress rolled back."""


async def claim_job(
    session: AsyncSession, job_id: str, *, force: bool = False, stale_after_s: float = STALE_AFTER_S
) -> str | None:
    """Make a new run the owner of job ``job_id``: sets its ``runner`` token (the run's
    batches commit only while the job names it) and its status ``running``. Flushes; the
    caller commits.

    Args:
        session: a write session.
        job_id: the job.
        force: take it over even from a run that made progress lately (a new
            ``fhir-gateway import`` of the same files: the latest run wins).
        stale_after_s: without ``force``, the job must have failed, or have committed
            no batch for this long (its run stopped).

    Returns:
        The new run's token, or None: the job completed, or (without ``force``) another
        run is making progress.
    """
    token, now = uuid.uuid4().hex, utcnow()
    conditions = [ImportJob.id == job_id, ImportJob.status != ImportStatus.COMPLETED]
    if not force:
        conditions.append(
            or_(
                ImportJob.status == ImportStatus.FAILED,
                ImportJob.updated_at < now - timedelta(seconds=stale_after_s),
            )
        )
    result = await session.execute(
        update(ImportJob)
        .where(*conditions)
        .values(runner=token, status=ImportStatus.RUNNING, error=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return token if _rowcount(result) == 1 else None


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class ImportSource:
    """One input of a job: a path (CLI), or a name and bytes (an upload, kept in the
    job's row so it can be resumed).

    ``sha256``: the file's SHA-256 (hex) when the caller has just computed it (the CLI
    hashes each file once to find a job to resume); None: computed where needed. A file
    of several GB takes seconds to hash, so it is read for its digest once per run.
    """

    name: str
    path: Path
    sha256: str | None = None

    def digest(self) -> str:
        """The file's SHA-256 (hex): :attr:`sha256`, or read now.

        Raises:
            OSError: the file cannot be read.
        """
        return self.sha256 or file_sha256(self.path)

    @property
    def is_csv(self) -> bool:
        """A CSV file (by extension)."""
        return self.path.suffix.lower() == ".csv"


def csv_profile_or_raise(runtime: Runtime, name: str | None) -> CsvImportProfile | None:
    """The CSV import profile ``name`` of the current profiles (None when not asked).

    Raises:
        ImportFileError: no such profile.
    """
    if name is None:
        return None
    found = runtime.profiles.current.by_kind.get("import", {}).get(name)
    if not isinstance(found, CsvImportProfile):
        raise ImportFileError(f"no CSV import profile {name!r} (profiles/imports/*.yaml)")
    return found


async def create_job(
    session: AsyncSession,
    *,
    source: str,
    notify: bool,
    actor: str,
    csv_profile: str | None,
    files: list[ImportSource],
    parts: int = 1,
) -> ImportJob:
    """A new job with one file row per input, each cursor at 0 (flushes). FHIR Bulk Data
    Patient files come first (:func:`gateway.imports.fhir_bulk.file_rank`), the others
    in the order given: the resources that refer to a Patient find it imported.

    With ``parts`` > 1 (``--workers``), an NDJSON file of at least
    :data:`MIN_PART_BYTES` gets a row per part instead (:func:`split_ndjson`), for
    several processes to import side by side; a CSV file stays whole (a quoted cell may
    span lines, so a line start is not a record start).

    Raises:
        ImportFileError: an input cannot be read.
    """
    now = utcnow()
    job = ImportJob(
        id=str(uuid.uuid4()),
        source=source,
        notify=notify,
        status=ImportStatus.RUNNING,
        actor=actor,
        csv_profile=csv_profile,
        read=0,
        mapped=0,
        refused=0,
        duplicate=0,
        suppressed_webhooks=0,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    await session.flush()  # before its files (no ORM relationship orders them)
    ranked = sorted(files, key=lambda f: 1 if f.is_csv else fhir_bulk.file_rank(f.path))
    for source_file in ranked:
        try:
            digest, size = source_file.digest(), source_file.path.stat().st_size
        except OSError as exc:
            raise ImportFileError(f"cannot read {source_file.name} ({exc.strerror})") from exc
        cuts = [(0, 1)]
        if parts > 1 and not source_file.is_csv and size >= MIN_PART_BYTES:
            cuts = split_ndjson(source_file.path, parts)
        stops: list[int | None] = [start for start, _ in cuts[1:]]
        for (start, line), stop in zip(cuts, [*stops, None], strict=True):
            session.add(
                ImportFile(
                    job_id=job.id,
                    name=source_file.name,
                    sha256=digest,
                    size_bytes=size,
                    start_offset=start,
                    stop_offset=stop,
                    cursor=start,
                    line=line,
                    status=ImportStatus.RUNNING,
                )
            )
    await session.flush()
    return job


async def _import_record(session: AsyncSession, ctx: IngestContext, record: Record) -> Outcome:
    """Run one record through its live channel (flushes)."""
    actor = f"import:{ctx.migration.job_id}" if ctx.migration else "import"
    if record.kind == "intake":
        return await intake.submit_intake(
            session, ctx, raw=record.raw, content_type="application/json", actor=actor
        )
    if record.kind == "checkout":
        return await checkout.submit_checkout(
            session, ctx, raw=record.raw, content_type="application/json", actor=actor
        )
    if record.kind == "fhir":
        return await fhir_bulk.import_resource(session, ctx, raw=record.raw, actor=actor)
    return await stripe.receive_stripe_event(
        session, ctx, raw=record.raw, content_type="application/json", refuse_unmappable=True
    )


def _records(
    source: ImportSource, row: ImportFile, profile: CsvImportProfile | None, job_source: str
) -> Iterator[Record]:
    start, line = row.cursor, max(1, row.line)
    if source.is_csv:
        if profile is None:
            raise ImportFileError(f"{source.name}: a CSV file needs --csv-profile")
        return read_csv(source.path, profile, start=start, first_line=line)
    return read_ndjson(
        source.path, start=start, first_line=line, source=job_source, stop=row.stop_offset
    )


async def run_job(
    runtime: Runtime,
    job_id: str,
    files: list[ImportSource],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
    only: Collection[int] | None = None,
    finish: bool = True,
    runner: str | None = None,
) -> dict[str, Any]:
    """Import (or resume) the files of job ``job_id``. Owns its transactions: one per
    batch of ``batch_size`` records, committed with the files' cursors and the counts.

    Args:
        runtime: the wired runtime (database, profiles, settings).
        job_id: a job made by :func:`create_job` (its files in the same order).
        files: where each file of the job is read from.
        batch_size: records per transaction.
        on_progress: told after each batch.
        only: the ids of the file rows (parts) to import, None for all: one process
            of several (:mod:`gateway.imports.parallel`).
        finish: mark the job ``completed`` at the end (the process that started the
            others does, once they all ended).
        runner: the token of a run that claimed the job already (:func:`claim_job`);
            None: this run takes the job over (``force``).

    Returns:
        The job's counts (:func:`gateway.imports.repository.job_counts`).

    Raises:
        ImportFileError: a file cannot be read or needs a CSV profile; the job is left
            ``failed`` with the reason.
        ImportTakenOver: another run took the job over; this one stopped, its batch in
            progress rolled back (the other run goes on).
    """
    if runner is None:
        async with runtime.write_session() as session:
            runner = await claim_job(session, job_id, force=True)
            await session.commit()
    async with runtime.sessionmaker() as session:
        job = await repo.get_job_or_raise(session, job_id)
        rows = await repo.job_files(session, job_id)
        notify, source_name, csv_name = job.notify, job.source, job.csv_profile
    ctx = replace(
        IngestContext.of(runtime),  # one profile snapshot for the whole job
        migration=Migration(job_id=job_id, source=source_name, notify=notify),
    )
    try:
        profile = csv_profile_or_raise(runtime, csv_name)
        by_name = {f.name: f for f in files}
        checked: set[str] = set()
        for row in rows:
            if row.status == ImportStatus.COMPLETED or (only is not None and row.id not in only):
                continue
            source = by_name.get(row.name)
            if source is None:
                raise ImportFileError(f"{row.name}: not given to resume the job")
            if row.name not in checked:
                if source.digest() != row.sha256:
                    raise ImportFileError(f"{row.name}: the file changed since the job started")
                checked.add(row.name)
            await _import_file(
                runtime, ctx, row, source, profile, batch_size, on_progress, runner or ""
            )
    except ImportTakenOver:
        log.info("import.taken_over", job_id=job_id)
        raise
    except (ImportFileError, OSError) as exc:
        reason = str(exc) if isinstance(exc, ImportFileError) else f"cannot read a file ({exc})"
        async with runtime.write_session() as session:
            await session.execute(
                update(ImportJob)
                .where(ImportJob.id == job_id, ImportJob.runner == runner)
                .values(status=ImportStatus.FAILED, error=reason, updated_at=utcnow())
            )
            await session.commit()
        log.warning("import.failed", job_id=job_id)
        raise ImportFileError(reason) from exc
    if not finish or runner is None:  # runner None: the job had completed already
        async with runtime.sessionmaker() as session:
            return await repo.job_counts(session, job_id, with_delivered=False)
    return await finish_job(runtime, job_id, runner)


async def finish_job(runtime: Runtime, job_id: str, runner: str) -> dict[str, Any]:
    """Mark job ``job_id`` ``completed`` (every file row done) if run ``runner`` still
    owns it, and return its counts (:func:`gateway.imports.repository.job_counts`).

    Raises:
        ImportTakenOver: another run owns the job now.
    """
    async with runtime.write_session() as session:
        now = utcnow()
        owned = await session.execute(
            update(ImportJob)
            .where(ImportJob.id == job_id, ImportJob.runner == runner)
            .values(status=ImportStatus.COMPLETED, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(owned) != 1:
            raise ImportTakenOver(job_id)
        await session.commit()
        counts = await repo.job_counts(session, job_id)
    log.info("import.completed", job_id=job_id, **counts)
    return counts


async def _import_file(
    runtime: Runtime,
    ctx: IngestContext,
    row: ImportFile,
    source: ImportSource,
    profile: CsvImportProfile | None,
    batch_size: int,
    on_progress: ProgressCallback | None,
    runner: str,
) -> None:
    assert ctx.migration is not None
    records = _records(source, row, profile, ctx.migration.source)
    done = False
    while not done:
        batch: list[Record] = []
        for record in records:
            batch.append(record)
            if len(batch) >= batch_size:
                break
        else:
            done = True
        counts = await _store_batch(runtime, ctx, row, batch, finished=done, runner=runner)
        if on_progress is not None:
            on_progress(row, counts)


async def _store_batch(
    runtime: Runtime,
    ctx: IngestContext,
    row: ImportFile,
    batch: list[Record],
    *,
    finished: bool,
    runner: str,
) -> dict[str, int]:
    """One transaction: the batch's records (each in a savepoint), its refusals, the
    job's counts and the file's cursor, committed only while run ``runner`` owns the job
    (else :class:`ImportTakenOver`). Run again whole when PostgreSQL aborts it as a
    deadlock (:data:`BATCH_ATTEMPTS`): nothing of it was committed."""
    for attempt in range(1, BATCH_ATTEMPTS + 1):
        try:
            return await _store_batch_once(
                runtime, ctx, row, batch, finished=finished, runner=runner
            )
        except DBAPIError as exc:
            sqlstate = getattr(exc.orig, "sqlstate", None)
            if sqlstate not in _RETRYABLE_SQLSTATES or attempt == BATCH_ATTEMPTS:
                raise
            assert ctx.migration is not None
            log.warning("import.batch_retried", job_id=ctx.migration.job_id, sqlstate=sqlstate)
            await asyncio.sleep(random.uniform(0.05, 0.5) * attempt)  # noqa: S311 (jitter)
    raise AssertionError("unreachable")


async def _store_batch_once(
    runtime: Runtime,
    ctx: IngestContext,
    row: ImportFile,
    batch: list[Record],
    *,
    finished: bool,
    runner: str,
) -> dict[str, int]:
    assert ctx.migration is not None
    job_id, tally = ctx.migration.job_id, ctx.migration.tally
    mapped = duplicate = 0
    refusals: list[ImportRefusal] = []
    suppressed_before = tally.suppressed_webhooks
    try:
        async with runtime.write_session() as session:
            if session.get_bind().dialect.name == "sqlite":
                # pysqlite opens a transaction at the first INSERT/UPDATE, not at a
                # SAVEPOINT: the first record's savepoint would be the transaction, and
                # its RELEASE a COMMIT of that record alone. A write first makes the
                # batch one transaction. (Not on PostgreSQL: it would hold the job row's
                # lock for the whole batch, and parallel parts would wait on it.)
                await session.execute(
                    update(ImportJob).where(ImportJob.id == job_id).values(updated_at=utcnow())
                )
            for record in batch:
                problems = record.problems
                if not problems:
                    record_before = tally.suppressed_webhooks
                    try:
                        async with session.begin_nested():
                            outcome = await _import_record(session, ctx, record)
                    except GatewayError as exc:
                        problems = exc.problems or [Problem("", exc.slug, exc.detail)]
                    except MappingErrors as exc:
                        problems = exc.problems
                    else:
                        if outcome.body.get("replayed"):
                            duplicate += 1
                        else:
                            mapped += 1
                    if problems:  # its rows were rolled back with its savepoint
                        tally.suppressed_webhooks = record_before
                if problems:
                    refusals.append(
                        ImportRefusal(
                            job_id=job_id,
                            file=row.name,
                            line=record.line,
                            kind=record.kind,
                            business_id=record.business_id,
                            problems=[p.as_dict() for p in problems],
                            record=record.raw,
                        )
                    )
            session.add_all(refusals)
            suppressed = tally.suppressed_webhooks - suppressed_before
            cursor, line = row.cursor, row.line
            if batch:
                cursor, line = batch[-1].end, batch[-1].line + 1
            values: dict[str, Any] = {"cursor": cursor, "line": line}
            if finished:
                values["status"] = ImportStatus.COMPLETED
            await session.execute(
                update(ImportFile).where(ImportFile.id == row.id).values(**values)
            )
            owned = await session.execute(
                update(ImportJob)
                .where(ImportJob.id == job_id, ImportJob.runner == runner)
                .values(
                    read=ImportJob.read + len(batch),
                    mapped=ImportJob.mapped + mapped,
                    duplicate=ImportJob.duplicate + duplicate,
                    refused=ImportJob.refused + len(refusals),
                    suppressed_webhooks=ImportJob.suppressed_webhooks + suppressed,
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            if _rowcount(owned) != 1:
                raise ImportTakenOver(job_id)  # the batch is rolled back with the session
            await session.commit()
    except BaseException:
        tally.suppressed_webhooks = suppressed_before  # nothing of the batch was committed
        raise
    row.cursor, row.line = cursor, line
    if finished:
        row.status = ImportStatus.COMPLETED
    log.info(
        "import.batch",
        job_id=job_id,
        records=len(batch),
        mapped=mapped,
        duplicate=duplicate,
        refused=len(refusals),
    )
    async with runtime.sessionmaker() as session:
        return await repo.job_counts(session, job_id, with_delivered=False)


async def find_resumable(session: AsyncSession, sha256s: list[str]) -> ImportJob | None:
    """The latest unfinished job whose files are exactly these (by content), to resume."""
    if not sha256s:
        return None
    candidates = (
        await session.scalars(
            select(ImportJob)
            .where(ImportJob.status.in_([ImportStatus.RUNNING, ImportStatus.FAILED]))
            .order_by(ImportJob.created_at.desc())
            .limit(20)
        )
    ).all()
    for job in candidates:
        files = await repo.job_files(session, job.id)
        if any(f.body is not None for f in files):
            continue  # an upload job (POST /v1/imports): its own runs resume it
        # a file in parts has a row per part: one entry per (name, file) pair
        if sorted(sha for _, sha in {(f.name, f.sha256) for f in files}) == sorted(sha256s):
            return job
    return None
