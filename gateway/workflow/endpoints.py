"""``/v1/cases``: the ops layer's view of each patient's journey."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.db.models import Case, CaseEvent
from gateway.deps import MAX_ROW_ID, RuntimeDep, SessionDep, require_scope
from gateway.errors import NotFoundError, UnprocessableError
from gateway.patients import repository as patients_repo
from mappers.errors import Problem

router = APIRouter(prefix="/v1", tags=["cases"])


class CaseEventOut(BaseModel):
    """One event in a case's history: who sent it (role and sender) and who authenticated
    it (``principal``: ``client:<name>``, ``cert:<CN>:sha256:<hex>``, ``signature:<partner>``,
    ``ehr-header:<target>``, ``mllp-peer:<address>``, ``gateway``; None for events recorded
    before migration 0012_sec_hl7), its ids, when it occurred at the sender and when the gateway
    received it, and what it did."""

    source: str
    sender: str
    channel: str | None
    event_id: str
    reference: str | None
    type: str
    detail: str | None
    occurred_at: datetime
    received_at: datetime
    from_state: str | None
    to_state: str | None
    outcome: str
    note: str | None
    hold_until: datetime | None
    message_id: str | None
    principal: str | None = None


class SlaOut(BaseModel):
    """The SLA timer running in the case's state."""

    timer: str
    due_at: datetime
    overdue: bool
    flagged_at: datetime | None


class CaseOut(BaseModel):
    """A case: its state, SLA and full history (in order of occurrence)."""

    id: str
    patient_id: str
    patient_reference: str
    program: str
    state: str
    opened_at: datetime
    updated_at: datetime
    state_entered_at: datetime
    overdue: bool
    sla: SlaOut | None
    history: list[CaseEventOut]


def _event_out(e: CaseEvent) -> CaseEventOut:
    return CaseEventOut(
        source=e.source,
        sender=e.sender or e.source,
        channel=e.channel,
        event_id=e.event_id,
        reference=e.reference,
        type=e.type,
        detail=e.detail,
        occurred_at=e.occurred_at,
        received_at=e.received_at,
        from_state=e.from_state,
        to_state=e.to_state,
        outcome=e.outcome,
        note=e.note,
        hold_until=e.hold_until,
        message_id=e.inbound_message_id,
        principal=e.principal,
    )


async def _cases_out(session: AsyncSession, cases: list[Case], now: datetime) -> list[CaseOut]:
    history: dict[str, list[CaseEvent]] = defaultdict(list)
    if cases:
        events = (
            await session.scalars(
                select(CaseEvent)
                .where(CaseEvent.case_id.in_([c.id for c in cases]))
                .order_by(CaseEvent.occurred_at, CaseEvent.id)
            )
        ).all()
        for e in events:
            history[e.case_id].append(e)
    out = []
    for case in cases:
        overdue = case.sla_due_at is not None and case.sla_due_at <= now
        out.append(
            CaseOut(
                id=case.id,
                patient_id=case.patient_id,
                patient_reference=f"Patient/{case.patient_id}",
                program=case.program,
                state=case.state,
                opened_at=case.opened_at,
                updated_at=case.updated_at,
                state_entered_at=case.state_entered_at,
                overdue=overdue,
                sla=SlaOut(
                    timer=case.sla_timer or "",
                    due_at=case.sla_due_at,
                    overdue=overdue,
                    flagged_at=case.overdue_at,
                )
                if case.sla_due_at is not None
                else None,
                history=[_event_out(e) for e in history[case.id]],
            )
        )
    return out


@router.get(
    "/cases/{case_id}",
    response_model=CaseOut,
    summary="A case with its history",
    responses={401: {}, 403: {}, 404: {}},
)
async def get_case(
    case_id: str,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("cases:read"))],
) -> CaseOut:
    """The case's state, SLA timer and every event that reached it (404 for a case of a
    program the caller's client is not limited to)."""
    case = await session.get(Case, case_id)
    if case is None or not principal.sees_program(case.program):
        raise NotFoundError("no such case")
    audit.record(
        session, action="read", entity_type="Case", entity_id=case.id, patient_id=case.patient_id
    )
    return (await _cases_out(session, [case], runtime.clock.now()))[0]


@router.get(
    "/cases",
    response_model=list[CaseOut],
    summary="Cases by patient, state, SLA",
    responses={401: {}, 403: {}},
)
async def list_cases(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("cases:read"))],
    patient: Annotated[
        str | None,
        Query(
            description="A patient identifier as system|value, or Patient/<local id>",
            # documented, checked by the handler (its own problem code)
            json_schema_extra={"pattern": r"^(Patient/[^\x00]+|[^|\x00]*\|[^\x00]*)$"},
        ),
    ] = None,
    state: Annotated[list[str] | None, Query(description="Case state(s)")] = None,
    overdue: Annotated[bool | None, Query(description="Past their SLA deadline (or not)")] = None,
    program: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0,
) -> list[CaseOut]:
    """Cases matching every filter given, newest first (``overdue=true``: the case has
    stayed in its state longer than the workflow's SLA timer allows)."""
    stmt = select(Case).order_by(Case.opened_at.desc(), Case.id).limit(limit).offset(offset)
    if patient is not None:
        if patient.startswith("Patient/"):
            patient_id: str | None = patient.split("/", 1)[1]
        elif "|" in patient:
            found = await patients_repo.patients_for_keys(session, [("identifier", patient)])
            patient_id = found.get(("identifier", patient))
        else:
            raise UnprocessableError(
                "patient must be system|value or Patient/<id>",
                [Problem("patient", "invalid_identifier", "expected system|value or Patient/<id>")],
            )
        if patient_id is None:
            return []
        stmt = stmt.where(Case.patient_id == patient_id)
    if state:
        stmt = stmt.where(Case.state.in_(state))
    if program:
        stmt = stmt.where(Case.program == program)
    if principal.programs is not None:  # a client limited to some programs
        stmt = stmt.where(Case.program.in_(sorted(principal.programs)))
    now = runtime.clock.now()
    if overdue is True:
        stmt = stmt.where(Case.sla_due_at <= now)
    elif overdue is False:
        stmt = stmt.where(or_(Case.sla_due_at.is_(None), Case.sla_due_at > now))
    cases = list((await session.scalars(stmt)).all())
    audit.record_patients(
        session,
        action="search",
        entity_type="Case",
        hits=[(c.id, c.patient_id) for c in cases],
        query=f"cases?{request.url.query}",
    )
    return await _cases_out(session, cases, now)
