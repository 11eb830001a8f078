"""``/v1/imports``: bulk backfill over the API (``ops:admin``).

``POST /v1/imports`` takes one file as the body (``application/x-ndjson``: intake
submissions, canonical checkouts, Stripe events, or one file of a FHIR Bulk Data export,
also as ``application/fhir+ndjson``; ``text/csv`` with ``csv_profile``),
answers 202 with the job resource at once and imports in the background;
``GET /v1/imports/{id}`` is the job with its counts; ``GET /v1/imports/{id}/refusals``
the refused records with their problems as NDJSON, to fix and import again;
``POST /v1/imports/{id}/resume`` resumes a job stopped by a restart at its cursor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.audit import service as audit
from gateway.clients.actor import current_actor
from gateway.clients.service import Principal
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.errors import (
    BadRequestError,
    ConflictError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from gateway.imports import repository as repo
from gateway.imports.schemas import ImportCounts, ImportFileOut, ImportJobOut, refusal_line
from gateway.imports.service import ImportFileError, claim_job, csv_profile_or_raise
from gateway.imports.uploads import create_upload_job, start_upload_job
from gateway.runtime import Runtime
from mappers.errors import Problem

router = APIRouter(prefix="/v1/imports", tags=["imports"])

CSV_TYPES = ("text/csv", "application/csv")
#: NDJSON only: a JSON document (``application/json``) is not a file of records, and every
#: JSON body of the API is refused whole when it holds a NUL or a huge integer; an NDJSON
#: upload's records are each refused on their own.
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/fhir+ndjson")


async def _job_out(runtime: Runtime, session: SessionDep, job_id: str) -> ImportJobOut:
    job = await repo.get_job_or_raise(session, job_id)
    counts = await repo.job_counts(session, job_id)
    files = await repo.job_files(session, job_id)
    return ImportJobOut(
        id=job.id,
        source=job.source,
        notify=job.notify,
        status=job.status,
        csv_profile=job.csv_profile,
        counts=ImportCounts(**counts),
        files=[
            ImportFileOut(name=f.name, size_bytes=f.size_bytes, cursor=f.cursor, status=f.status)
            for f in files
        ],
        created_at=job.created_at,
        finished_at=job.finished_at,
        error=job.error,
        refusals_url=f"{runtime.settings.public_base_url}/v1/imports/{job.id}/refusals",
    )


@router.post(
    "",
    status_code=202,
    response_model=ImportJobOut,
    summary="Start a bulk import (NDJSON or CSV body) through the live channels",
    responses={400: {}, 401: {}, 403: {}, 413: {}, 415: {}, 422: {}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "application/fhir+ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        }
    },
)
async def start_import(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
    source: Annotated[str, Query(min_length=1, max_length=128)] = "legacy",
    notify: bool = False,
    csv_profile: Annotated[str | None, Query(max_length=128)] = None,
) -> JSONResponse:
    """Store the file as a job and import it in the background: every record through
    the same profiles, normalizers, patient matching and outbox as live traffic,
    idempotent on its business id. Case changes are recorded; their ops webhooks are
    not sent unless ``notify=true``.

    Raises:
        BadRequestError: an empty body.
        UnsupportedMediaTypeError: not NDJSON or CSV.
        UnprocessableError: CSV without a known ``csv_profile``.
    """
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_csv = media in CSV_TYPES
    if not is_csv and media not in NDJSON_TYPES:
        raise UnsupportedMediaTypeError(
            "send application/x-ndjson or text/csv",
            [Problem("", "unsupported_media_type", "the body must be NDJSON or CSV")],
        )
    if is_csv and csv_profile is None:
        raise UnprocessableError(
            "a CSV import needs csv_profile",
            [Problem("csv_profile", "required", "name a profile of profiles/imports")],
        )
    try:
        csv_profile_or_raise(runtime, csv_profile)
    except ImportFileError as exc:
        raise UnprocessableError(
            "unknown CSV import profile", [Problem("csv_profile", "unknown_profile", str(exc))]
        ) from exc
    body = await request.body()
    if not body.strip():
        raise BadRequestError("the body is empty", [Problem("", "empty", "send the records")])
    job = await create_upload_job(
        session,
        body=body,
        name="upload.csv" if is_csv else "upload.ndjson",
        source=source,
        notify=notify,
        actor=principal.name,
        csv_profile=csv_profile,
    )
    audit.record(session, action="create", entity_type="ImportJob", entity_id=job.id)
    await session.commit()  # before the background job reads it (the dependency's is a no-op)
    start_upload_job(runtime, job.id, actor=current_actor())
    out = await _job_out(runtime, session, job.id)
    return JSONResponse(
        out.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/imports/{job.id}"},
    )


@router.get(
    "/{job_id}",
    response_model=ImportJobOut,
    summary="An import job: status, counts, files and cursors",
    responses={401: {}, 403: {}, 404: {}},
)
async def get_import(
    job_id: str,
    session: SessionDep,
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
) -> ImportJobOut:
    """The job's status and counts (read, mapped, refused, duplicate, delivered)."""
    return await _job_out(runtime, session, job_id)


@router.post(
    "/{job_id}/resume",
    status_code=202,
    response_model=ImportJobOut,
    summary="Resume an import job stopped by a restart, at each file's cursor",
    responses={401: {}, 403: {}, 404: {}, 409: {}},
)
async def resume_import(
    job_id: str,
    session: SessionDep,
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> ImportJobOut:
    """Start the job again from its cursors (records already committed are not read
    again; any that are come back ``duplicate``). A gateway process also takes over a
    stopped upload job by itself within about 3 minutes (:mod:`gateway.imports.uploads`).

    Raises:
        ConflictError: the job completed; its run is still making progress (a batch
            committed in the last 2 minutes): resuming it would run it twice; or it is a
            job of the command line (``fhir-gateway import``), whose files the API does
            not have.
    """
    job = await repo.get_job_or_raise(session, job_id)
    if job.status == "completed":
        raise ConflictError(
            "the import job completed", [Problem("", "completed", "nothing to resume")]
        )
    if all(f.body is None for f in await repo.job_files(session, job_id)):
        raise ConflictError(
            "the import job reads files on the command line's machine",
            [
                Problem(
                    "",
                    "not_an_upload",
                    "resume it with the same fhir-gateway import command",
                )
            ],
        )
    async with runtime.write_session() as write:
        runner = await claim_job(write, job_id)
        await write.commit()
    if runner is None:
        raise ConflictError(
            "the import job is running",
            [
                Problem(
                    "",
                    "running",
                    "a batch was committed in the last 2 minutes: it is not stopped",
                )
            ],
        )
    start_upload_job(runtime, job_id, actor=current_actor(), runner=runner)
    return await _job_out(runtime, session, job_id)


@router.get(
    "/{job_id}/refusals",
    summary="The refused records of an import with their problems (NDJSON)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-ndjson": {}}},
        401: {},
        403: {},
        404: {},
    },
)
async def import_refusals(
    job_id: str,
    session: SessionDep,
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> StreamingResponse:
    """One line per refused record: ``file``, ``line``, ``kind``, ``business_id``,
    ``problems`` and the ``record`` itself, to fix and import again."""
    await repo.get_job_or_raise(session, job_id)
    audit.record(session, action="read", entity_type="ImportRefusals", entity_id=job_id)
    await session.commit()

    async def lines() -> AsyncIterator[bytes]:
        after = 0
        while True:
            async with runtime.sessionmaker() as read:
                page = await repo.refusals(read, job_id, after_id=after)
            if not page:
                return
            for row in page:
                yield (refusal_line(row) + "\n").encode()
            after = page[-1].id

    return StreamingResponse(lines(), media_type="application/x-ndjson")
