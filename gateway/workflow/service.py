"""Applying clinical events to cases with the workflow profile.

Every event ends in the case's history (``case_events``) or, when no case can take it, in
the exceptions queue; a transition the profile does not allow goes to the exceptions
queue too, never to the floor. Duplicates (same case, sender and event id) are no-ops.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Case, CaseEvent, CaseEventOutcome
from gateway.db.types import utcnow
from gateway.inbox.repository import new_exception
from gateway.logging import get_logger
from mappers.errors import Problem
from mappers.profiles import WorkflowProfile
from mappers.workflow import decide

log = get_logger(__name__)


@dataclass(frozen=True)
class EventInput:
    """One clinical event, already parsed and matched to a patient."""

    source: str
    event_id: str
    type: str
    detail: str | None
    occurred_at: datetime
    patient_id: str
    program: str | None = None
    case_id: str | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class ApplyResult:
    """What applying an event did."""

    outcome: str  # applied | recorded | late | rejected | duplicate | no_case
    case_id: str | None
    from_state: str | None = None
    to_state: str | None = None
    reason: str | None = None


async def _find_case(
    session: AsyncSession, workflow: WorkflowProfile, event: EventInput
) -> Case | None:
    lock = session.bind.dialect.name == "postgresql" if session.bind else False
    if event.case_id:
        stmt = select(Case).where(Case.id == event.case_id, Case.patient_id == event.patient_id)
    else:
        stmt = select(Case).where(
            Case.patient_id == event.patient_id,
            Case.state.not_in(workflow.terminal or ["__none__"]),
        )
        if event.program:
            stmt = stmt.where(Case.program == event.program)
        stmt = stmt.order_by(Case.opened_at.desc()).limit(1)
    if lock:
        stmt = stmt.with_for_update()
    return await session.scalar(stmt)


async def apply_event(
    session: AsyncSession,
    workflow: WorkflowProfile,
    event: EventInput,
    *,
    new_patient: bool = False,
) -> ApplyResult:
    """Apply one event to its case (opening one if the event opens cases).

    The case row is locked (``FOR UPDATE`` on PostgreSQL) so concurrent events of one case
    apply one after the other. Flushes; the caller commits.

    Args:
        new_patient: the patient was created in this transaction, so has no case yet
            (saves a query on the ingest path).
    """
    case = None if new_patient else await _find_case(session, workflow, event)
    if case is not None:
        duplicate = await session.scalar(
            select(CaseEvent.id).where(
                CaseEvent.case_id == case.id,
                CaseEvent.source == event.source,
                CaseEvent.event_id == event.event_id,
            )
        )
        if duplicate is not None:
            return ApplyResult("duplicate", case.id, case.state, case.state)
    if case is None and event.case_id:
        return await _reject_without_case(
            session, event, "unknown_case", "no case with this id for this patient"
        )

    decision = decide(
        workflow,
        state=case.state if case else None,
        event_type=event.type,
        detail=event.detail,
        source=event.source,
        occurred_at=event.occurred_at,
        last_occurred_at=case.last_occurred_at if case else None,
    )
    now = utcnow()
    if case is None:
        if decision.outcome != "applied" or decision.to_state is None:
            return await _reject_without_case(
                session, event, decision.reason or "no_case", decision.message or "no open case"
            )
        if not event.program:
            return await _reject_without_case(
                session, event, "no_case", "no open case for this patient"
            )
        case = Case(
            id=str(uuid.uuid4()),
            patient_id=event.patient_id,
            program=event.program,
            state=decision.to_state,
            opened_at=now,
            updated_at=now,
            state_entered_at=now,
            last_occurred_at=event.occurred_at,
        )
        session.add(case)  # the unit of work inserts it before its case_events (FK order)
        _history(session, case, event, None, decision.to_state, CaseEventOutcome.APPLIED, None)
        log.info(
            "case.opened",
            case_id=case.id,
            state=case.state,
            event_type=event.type,
            source=event.source,
        )
        return ApplyResult("applied", case.id, None, case.state)

    from_state = case.state
    if decision.outcome == "applied" and decision.to_state:
        case.state = decision.to_state
        case.state_entered_at = now
        case.updated_at = now
        case.version += 1
    if decision.outcome in ("applied", "recorded") and (
        case.last_occurred_at is None or event.occurred_at > case.last_occurred_at
    ):
        case.last_occurred_at = event.occurred_at
    outcome = CaseEventOutcome(decision.outcome)
    _history(session, case, event, from_state, case.state, outcome, decision.message)
    if outcome == CaseEventOutcome.REJECTED:
        session.add(
            new_exception(
                kind=decision.reason or "rejected_event",
                channel="events",
                sender=event.source,
                message_id=event.message_id,
                case_id=case.id,
                problems=[Problem("type", decision.reason or "rejected", decision.message or "")],
            )
        )
    await session.flush()
    log.info(
        "case.event",
        case_id=case.id,
        outcome=str(outcome),
        from_state=from_state,
        to_state=case.state,
        event_type=event.type,
        source=event.source,
    )
    return ApplyResult(str(outcome), case.id, from_state, case.state, decision.reason)


def _history(
    session: AsyncSession,
    case: Case,
    event: EventInput,
    from_state: str | None,
    to_state: str | None,
    outcome: CaseEventOutcome,
    note: str | None,
) -> None:
    session.add(
        CaseEvent(
            case_id=case.id,
            inbound_message_id=event.message_id,
            source=event.source,
            event_id=event.event_id,
            type=event.type,
            detail=event.detail,
            occurred_at=event.occurred_at,
            from_state=from_state,
            to_state=to_state,
            outcome=outcome,
            note=note,
        )
    )


async def _reject_without_case(
    session: AsyncSession, event: EventInput, reason: str, message: str
) -> ApplyResult:
    session.add(
        new_exception(
            kind=reason,
            channel="events",
            sender=event.source,
            message_id=event.message_id,
            problems=[Problem("patient", reason, message)],
        )
    )
    await session.flush()
    log.info("case.event_without_case", reason=reason, event_type=event.type, source=event.source)
    return ApplyResult("no_case", None, reason=reason)
