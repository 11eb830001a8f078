"""``/v1/ops/exceptions``: the exceptions queue, with resolve and retry.

Everything the gateway acknowledged but could not apply is here with the reason: an
unmatched patient (with what was tried), an event its sender does not own, a transition
the workflow does not allow, an HL7 message refused with AR, a webhook that does not map,
missed FHIR subscription events. Listing needs ``ops:read``; resolving, retrying and
reading a kept payload (it may hold PHI) need ``ops:admin``.

Retry:

* an exception about a stored inbound message (event channels): the message is applied
  again with the current profiles and patient keys, right after the answer; every open
  exception of that message is marked ``retried``; a new one appears if it fails again;
* an HL7 message refused with AR (kept whole): received again, as if just sent (for a
  sending facility added to the profiles since);
* anything else cannot be retried here (409): resend it from its source, replay the
  delivery, or re-query the EHR for missed events.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.db.models import (
    ExceptionRecord,
    InboundMessage,
)
from gateway.db.types import utcnow
from gateway.deps import NO_NUL, RowIdPath, RowIdQuery, RuntimeDep, SessionDep, require_scope
from gateway.errors import NotFoundError
from gateway.events.after_response import apply_after_response, apply_id_after_response
from gateway.hl7.service import CONTENT_TYPE as HL7_CONTENT_TYPE
from gateway.inbox import repository as inbox
from gateway.triage import service as triage

router = APIRouter(prefix="/v1/ops", tags=["ops"])


class ExceptionOut(BaseModel):
    """One exceptions-queue entry (problems name fields and codes, never values;
    ``principal``: who sent a refused HL7 v2 message, docs/SECURITY.md)."""

    id: int
    kind: str
    channel: str
    sender: str | None
    message_id: str | None
    case_id: str | None
    status: str
    problems: list[dict[str, Any]]
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None
    note: str | None
    retries: int
    has_payload: bool
    retryable: bool
    principal: str | None = None
    assigned_to: str | None = None
    assigned_at: datetime | None = None
    occurrences: int = Field(
        default=1,
        description="How many refusals this exception stands for: repeated 400/409/415/422 "
        "of one sender with the same status and problem codes are grouped while the "
        "exception is open; each payload is at /payloads/{seq} (1 to occurrences).",
    )
    last_seen_at: datetime | None = Field(default=None, description="The latest of them.")


class ExceptionPage(BaseModel):
    """A page of exceptions, newest first; pass ``next_before_id`` as ``before_id``."""

    items: list[ExceptionOut]
    next_before_id: int | None


class ResolveIn(BaseModel):
    """Why it is resolved or retried (kept with the entry; no PHI please)."""

    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(default=None, max_length=1000, pattern=NO_NUL)


class AssignIn(BaseModel):
    """Who owns the exception now (a staff username or a client name); null: nobody."""

    model_config = ConfigDict(extra="forbid")

    assignee: str | None = Field(max_length=128, pattern=r"^[^\x00]+$")


def _out(row: ExceptionRecord, message_channel: str | None) -> ExceptionOut:
    return ExceptionOut(
        id=row.id,
        kind=row.kind,
        channel=row.channel,
        sender=row.sender,
        message_id=row.inbound_message_id,
        case_id=row.case_id,
        status=row.status,
        problems=list(row.problems or []),
        created_at=row.created_at,
        resolved_at=row.resolved_at,
        resolved_by=row.resolved_by,
        note=row.note,
        retries=row.retries,
        has_payload=row.payload is not None,
        retryable=triage.retryable(row, message_channel),
        principal=row.principal,
        assigned_to=row.assigned_to,
        assigned_at=row.assigned_at,
        occurrences=row.occurrences or 1,
        last_seen_at=row.last_seen_at,
    )


async def _one_out(session: AsyncSession, row: ExceptionRecord) -> ExceptionOut:
    channels = await triage.message_channels(session, [row])
    return _out(row, channels.get(row.inbound_message_id or ""))


@router.get("/exceptions", response_model=ExceptionPage, summary="The exceptions queue")
async def list_exceptions(
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
    status: Annotated[str | None, Query(description="open | resolved | retried")] = "open",
    kind: str | None = None,
    channel: str | None = None,
    sender: str | None = None,
    case_id: str | None = None,
    assigned_to: Annotated[
        str | None, Query(description="Owner's name; `-` for exceptions nobody owns")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before_id: RowIdQuery = None,
) -> ExceptionPage:
    """Exceptions, newest first, filtered by status (default ``open``), kind, channel,
    sender, case or owner."""
    stmt = select(ExceptionRecord).order_by(ExceptionRecord.id.desc()).limit(limit + 1)
    if status:
        stmt = stmt.where(ExceptionRecord.status == status)
    for column, value in (
        (ExceptionRecord.kind, kind),
        (ExceptionRecord.channel, channel),
        (ExceptionRecord.sender, sender),
        (ExceptionRecord.case_id, case_id),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if assigned_to == "-":
        stmt = stmt.where(ExceptionRecord.assigned_to.is_(None))
    elif assigned_to is not None:
        stmt = stmt.where(ExceptionRecord.assigned_to == assigned_to)
    if before_id is not None:
        stmt = stmt.where(ExceptionRecord.id < before_id)
    rows = list((await session.scalars(stmt)).all())
    page, more = rows[:limit], len(rows) > limit
    channels = await triage.message_channels(session, page)
    return ExceptionPage(
        items=[_out(r, channels.get(r.inbound_message_id or "")) for r in page],
        next_before_id=page[-1].id if more and page else None,
    )


@router.get("/exceptions/{exception_id}", response_model=ExceptionOut, summary="One exception")
async def get_exception(
    exception_id: RowIdPath,
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
) -> ExceptionOut:
    """One exceptions-queue entry."""
    return await _one_out(session, await triage.get_exception_or_raise(session, exception_id))


@router.get(
    "/exceptions/{exception_id}/payload",
    summary="The payload kept with an exception (may hold PHI)",
    response_class=Response,
    responses={
        200: {
            "description": "The payload as received: JSON, HL7 v2 (ER7), or other bytes",
            "content": {
                "application/json": {"schema": {}},
                HL7_CONTENT_TYPE: {"schema": {"type": "string"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        404: {},
    },
)
async def get_exception_payload(
    exception_id: RowIdPath,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> Response:
    """The raw input kept for review (the exception's own, else its inbound message's;
    for grouped refusals, the first: the others are at ``/payloads/{seq}``). Every read is
    in the audit log."""
    row = await triage.get_exception_or_raise(session, exception_id)
    payload, content_type = row.payload, row.content_type
    if payload is None and row.inbound_message_id:
        message = await session.get(InboundMessage, row.inbound_message_id)
        if message is not None:
            payload, content_type = message.body, message.content_type
    if payload is None:
        raise NotFoundError("no payload is kept for this exception")
    return await _payload_response(session, row, payload, content_type, seq=None)


@router.get(
    "/exceptions/{exception_id}/payloads/{seq}",
    summary="One payload of a grouped refusal (may hold PHI)",
    response_class=Response,
    responses={
        200: {
            "description": "The payload as received",
            "content": {
                "application/json": {"schema": {}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        404: {},
    },
)
async def get_exception_payload_by_seq(
    exception_id: RowIdPath,
    seq: Annotated[int, Path(ge=1, le=2**31 - 1)],
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> Response:
    """Refusal ``seq`` (1 to ``occurrences``) of a grouped ``rejected_input`` exception,
    as received. Every read is in the audit log."""
    row = await triage.get_exception_or_raise(session, exception_id)
    found = await inbox.refused_payload(session, row, seq)
    if found is None:
        raise NotFoundError("no such payload for this exception")
    return await _payload_response(session, row, found[0], found[1], seq=seq)


async def _payload_response(
    session: AsyncSession,
    row: ExceptionRecord,
    payload: bytes,
    content_type: str | None,
    *,
    seq: int | None,
) -> Response:
    detail: dict[str, Any] = {}
    if row.inbound_message_id:
        detail["message_id"] = row.inbound_message_id
    if seq is not None:
        detail["seq"] = seq
    audit.record(
        session,
        action="read",
        entity_type="ExceptionPayload",
        entity_id=str(row.id),
        patient_id=await triage.patient_of(session, row),
        detail=detail or None,
    )
    return Response(
        payload,
        media_type=payload_media_type(payload, content_type),
        headers={"X-Content-Type-Options": "nosniff"},
    )


def payload_media_type(payload: bytes, declared: str | None) -> str:
    """The media type a kept payload is served with: what its sender declared when that
    is JSON (``application/json``, ``+json``) and the bytes are JSON, or HL7 v2 ER7
    (``application/hl7-v2``, ``x-application/hl7-v2+er7``, ``text/plain`` starting with
    ``MSH``); anything else (a refused body whose declared type is wrong or unknown) as
    ``application/octet-stream``, so no client renders or parses it as what it is not."""
    media = (declared or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            json.loads(payload)
        except ValueError:
            return "application/octet-stream"
        return "application/json"
    if media in ("application/hl7-v2", "x-application/hl7-v2+er7", "application/edi-hl7") or (
        media == "text/plain" and payload.lstrip().startswith(b"MSH")
    ):
        return HL7_CONTENT_TYPE
    return "application/octet-stream"


@router.post(
    "/exceptions/{exception_id}/resolve",
    response_model=ExceptionOut,
    summary="Mark an exception resolved",
    responses={404: {}, 409: {}},
)
async def resolve_exception(
    exception_id: RowIdPath,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
    body: ResolveIn | None = None,
) -> ExceptionOut:
    """A person dealt with it (409 when it is not open)."""
    row = await triage.get_exception_or_raise(session, exception_id)
    await triage.resolve_exception(
        session, row, by=principal.name, note=body.note if body else None, now=utcnow()
    )
    return await _one_out(session, row)


@router.post(
    "/exceptions/{exception_id}/assign",
    response_model=ExceptionOut,
    summary="Give an exception an owner (or none)",
    responses={404: {}, 409: {}},
)
async def assign_exception(
    exception_id: RowIdPath,
    body: AssignIn,
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> ExceptionOut:
    """Set who owns an open exception (a staff username or a client name); ``assignee:
    null`` leaves it unowned (409 when it is not open). Recorded in the audit trail."""
    row = await triage.get_exception_or_raise(session, exception_id)
    await triage.assign_exception(session, row, assignee=body.assignee, now=utcnow())
    return await _one_out(session, row)


@router.post(
    "/exceptions/{exception_id}/retry",
    status_code=202,
    summary="Apply the input of an exception again",
    responses={202: {}, 404: {}, 409: {}},
)
async def retry_exception(
    exception_id: RowIdPath,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
    body: ResolveIn | None = None,
) -> JSONResponse:
    """Retry with the current profiles and patient keys (see the module docstring);
    202 with what was done; 409 when this kind of exception cannot be retried."""
    row = await triage.get_exception_or_raise(session, exception_id)
    result = await triage.retry_exception(
        session, runtime, row, by=principal.name, note=body.note if body else None, now=utcnow()
    )
    if result.message_id is not None and result.reply is None:
        background.add_task(apply_id_after_response, request, runtime, result.message_id)
    elif result.reply is not None:
        background.add_task(apply_after_response, request, runtime, result.reply)
    return JSONResponse(result.body, status_code=202)
