"""``/v1/cases``: the ops layer's view of each patient's journey."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlalchemy import select

from gateway.clients.service import Principal
from gateway.db.models import Case, CaseEvent
from gateway.deps import SessionDep, require_scope
from gateway.errors import NotFoundError, UnprocessableError
from gateway.fhir import repository as fhir_repo
from mappers.errors import Problem

router = APIRouter(prefix="/v1", tags=["cases"])


class CaseEventOut(BaseModel):
    """One event in a case's history."""

    source: str
    event_id: str
    type: str
    detail: str | None
    occurred_at: datetime
    received_at: datetime
    from_state: str | None
    to_state: str | None
    outcome: str
    message_id: str | None


class CaseOut(BaseModel):
    """A case: its state and full history (oldest first)."""

    id: str
    patient_id: str
    patient_reference: str
    program: str
    state: str
    opened_at: datetime
    updated_at: datetime
    state_entered_at: datetime
    history: list[CaseEventOut]


async def _case_out(session: SessionDep, case: Case) -> CaseOut:
    events = (
        await session.scalars(
            select(CaseEvent)
            .where(CaseEvent.case_id == case.id)
            .order_by(CaseEvent.occurred_at, CaseEvent.id)
        )
    ).all()
    return CaseOut(
        id=case.id,
        patient_id=case.patient_id,
        patient_reference=f"Patient/{case.patient_id}",
        program=case.program,
        state=case.state,
        opened_at=case.opened_at,
        updated_at=case.updated_at,
        state_entered_at=case.state_entered_at,
        history=[
            CaseEventOut(
                source=e.source,
                event_id=e.event_id,
                type=e.type,
                detail=e.detail,
                occurred_at=e.occurred_at,
                received_at=e.received_at,
                from_state=e.from_state,
                to_state=e.to_state,
                outcome=e.outcome,
                message_id=e.inbound_message_id,
            )
            for e in events
        ],
    )


@router.get("/cases/{case_id}", response_model=CaseOut, summary="A case with its history")
async def get_case(
    case_id: str,
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("cases:read"))],
) -> CaseOut:
    """The case's state and every event that reached it."""
    case = await session.get(Case, case_id)
    if case is None:
        raise NotFoundError("no such case")
    return await _case_out(session, case)


@router.get("/cases", response_model=list[CaseOut], summary="Cases of a patient")
async def list_cases(
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("cases:read"))],
    patient: Annotated[str, Query(description="A patient identifier as system|value")],
) -> list[CaseOut]:
    """The cases of the patient with identifier ``system|value``, newest first."""
    if "|" not in patient:
        raise UnprocessableError(
            "patient must be system|value",
            [Problem("patient", "invalid_identifier", "expected system|value")],
        )
    found = await fhir_repo.patients_for_keys(session, [("identifier", patient)])
    patient_id = found.get(("identifier", patient))
    if patient_id is None:
        return []
    cases = (
        await session.scalars(
            select(Case).where(Case.patient_id == patient_id).order_by(Case.opened_at.desc())
        )
    ).all()
    return [await _case_out(session, c) for c in cases]
