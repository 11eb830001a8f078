"""Applying clinical events to cases with the workflow profile.

Every event ends in the case's history (``case_events``) or, when no case can take it, in
the exceptions queue; a transition the profile does not allow goes to the exceptions
queue too, never to the floor. Duplicates (same case, sender and event id) are no-ops.

Order: events are applied in order of occurrence. An event that the current state does
not allow, and that is not late, is held (``pending``) for the workflow's
``reorder_window``: an earlier event may still be on its way (a pharmacy's "dispensed"
overtaking the EHR's "prescription sent"). Whenever the case moves, held events are tried
again in occurrence order; those still not allowed when the window closes go to the
exceptions queue (:mod:`gateway.workflow.timers`). A late event (occurred before the latest one
applied) is recorded but never moves the case backward unless its transition says
``backward``.

Every change of a case (opened, moved) is handed to the caller's ``notify``
(:class:`ChangeSink`) in the same transaction: the channel or loop that applies the event
passes the subscribers' outbox (:func:`gateway.subscribers.service.enqueue_case_webhook`),
so the workflow does not know who listens. Every state change also recomputes the case's
SLA deadline (``profiles/workflow.yaml`` ``sla``; :mod:`gateway.workflow.sla`). The
time-driven side (held events whose window closed, overdue cases) is
:mod:`gateway.workflow.timers`. Everything here flushes at most; the caller commits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.db.bulk import BulkInserts, row_values
from gateway.db.models import Case, CaseEvent, CaseEventOutcome
from gateway.db.types import utcnow
from gateway.inbox.repository import new_exception
from gateway.logging import get_logger
from gateway.workflow.sla import refresh_sla, stops_a_timer
from mappers.errors import Problem
from mappers.normalize import to_fhir_instant
from mappers.profiles import WorkflowProfile
from mappers.workflow import Decision, decide

log = get_logger(__name__)


class ChangeSink(Protocol):
    """Told of each change of a case, in the transaction that made it (after a flush, so
    ``case.version`` is the new one): ``webhook_type`` is ``case.opened``,
    ``case.state_changed`` or ``case.overdue``; ``event`` the event that caused it
    (:func:`event_summary`), None for a timer. Flushes at most; returns how many
    notifications it queued."""

    async def __call__(
        self,
        session: AsyncSession,
        case: Case,
        webhook_type: str,
        *,
        from_state: str | None,
        event: dict[str, Any] | None,
    ) -> int: ...


@dataclass(frozen=True)
class EventInput:
    """One clinical event, already parsed and matched to a patient.

    ``source`` is the sender's role (ownership matrix); ``sender`` the specific sender
    (defaults to ``source``); ``channel`` where it came in; ``principal`` who
    authenticated it (recorded in the case history).
    """

    source: str
    event_id: str
    type: str
    detail: str | None
    occurred_at: datetime
    patient_id: str
    program: str | None = None
    case_id: str | None = None
    message_id: str | None = None
    sender: str | None = None
    channel: str = "events"
    reference: str | None = None
    principal: str | None = None

    @property
    def sender_name(self) -> str:
        """The specific sender (``source`` when none was given)."""
        return self.sender or self.source


@dataclass(frozen=True)
class ApplyResult:
    """What applying an event did."""

    outcome: str  # applied | recorded | late | rejected | duplicate | no_case | pending
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


def event_summary(row: CaseEvent) -> dict[str, Any]:
    """What a notification says of the event that changed a case (ids, codes, times)."""
    return {
        "type": row.type,
        "detail": row.detail,
        "source": row.source,
        "sender": row.sender,
        "event_id": row.event_id,
        "occurred_at": to_fhir_instant(row.occurred_at),
        "received_at": to_fhir_instant(row.received_at or utcnow()),
        "reference": row.reference,
    }


async def apply_event(
    session: AsyncSession,
    workflow: WorkflowProfile,
    event: EventInput,
    *,
    notify: ChangeSink,
    new_patient: bool = False,
    bulk: BulkInserts | None = None,
    timers: bool = True,
) -> ApplyResult:
    """Apply one event to its case (opening one if the event opens cases).

    The case row is locked (``FOR UPDATE`` on PostgreSQL; on SQLite a concurrent change
    makes the flush fail with ``StaleDataError``: the caller's transaction fails and the
    message goes back to its queue), so events of one case apply one after the other.
    Flushes; the caller commits.

    Args:
        notify: told of each change of a case (the subscribers' outbox).
        new_patient: the patient was created in this transaction, so has no case yet
            (saves a query on the ingest path).
        bulk: the caller's queued INSERTs (the ingest path): a new case, its first
            history row and their audit entry are queued there, for the caller to flush
            with its other rows (one round trip), instead of flushed here.
        timers: a case this event opens runs its SLA timers (False: a historical case
            brought in by a bulk import, which must not be flagged overdue later; its next
            live event starts them).

    Returns:
        The :class:`ApplyResult`. ``pending``: held for the reorder window;
        ``duplicate``: already in the history (a rejected event is decided again: a retry).
    """
    case = None if new_patient else await _find_case(session, workflow, event)
    existing: CaseEvent | None = None
    if case is not None:
        existing = await session.scalar(
            select(CaseEvent).where(
                CaseEvent.case_id == case.id,
                CaseEvent.sender == event.sender_name,
                CaseEvent.event_id == event.event_id,
            )
        )
        if existing is not None and existing.outcome != CaseEventOutcome.REJECTED:
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
        return await _open_case(
            session, workflow, event, decision, now, notify, bulk, timers=timers
        )

    from_state = case.state
    if (
        decision.outcome == "rejected"
        and decision.reason == "transition_not_allowed"
        and workflow.reorder_window.total_seconds() > 0
        and existing is None
    ):
        row = history_row(session, case, event, from_state, None, CaseEventOutcome.PENDING, None)
        row.hold_until = now + workflow.reorder_window
        row.note = f"{decision.message}; waiting for earlier events"
        await session.flush()
        log.info(
            "case.event_pending",
            case_id=case.id,
            event_type=event.type,
            source=event.source,
            state=from_state,
        )
        return ApplyResult("pending", case.id, from_state, from_state, decision.reason)

    outcome = CaseEventOutcome(decision.outcome)
    if existing is not None:
        row = existing
        row.outcome = outcome
        row.from_state = from_state
        row.note = "decided again on retry" + (f": {decision.message}" if decision.message else "")
    else:
        row = history_row(session, case, event, from_state, None, outcome, decision.message)
    changed = await _settle(session, workflow, case, row, decision, now, notify)
    if outcome == CaseEventOutcome.REJECTED:
        _reject_exception(session, row, event.channel, decision)
    if changed:
        await drain_held(session, workflow, case, now, notify=notify)
    elif stops_a_timer(workflow, case.state, event.type):
        await refresh_sla(session, workflow, case, now)
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
    return ApplyResult(str(outcome), case.id, from_state, row.to_state, decision.reason)


async def _open_case(
    session: AsyncSession,
    workflow: WorkflowProfile,
    event: EventInput,
    decision: Decision,
    now: datetime,
    notify: ChangeSink,
    bulk: BulkInserts | None = None,
    *,
    timers: bool = True,
) -> ApplyResult:
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
        version=1,
    )
    if bulk is None:
        session.add(case)  # the unit of work inserts it before its case_events (FK order)
    row = history_row(
        session, case, event, None, decision.to_state, CaseEventOutcome.APPLIED, None, bulk=bulk
    )
    if timers:
        await refresh_sla(session, workflow, case, now, history=[row])
    if bulk is None:
        await session.flush()
    else:  # the case before its history row (FK order); both stay out of the session
        bulk.add(Case, **row_values(case))
        bulk.add(CaseEvent, **row_values(row))
    await notify(session, case, "case.opened", from_state=None, event=event_summary(row))
    log.info(
        "case.opened",
        case_id=case.id,
        state=case.state,
        event_type=event.type,
        source=event.source,
    )
    return ApplyResult("applied", case.id, None, case.state)


async def _settle(
    session: AsyncSession,
    workflow: WorkflowProfile,
    case: Case,
    row: CaseEvent,
    decision: Decision,
    now: datetime,
    notify: ChangeSink,
) -> bool:
    """Apply a decision to the case and its history row; True when the state changed."""
    from_state = case.state
    changed = decision.outcome == "applied" and bool(decision.to_state)
    if changed:
        assert decision.to_state is not None
        case.state = decision.to_state
        case.state_entered_at = now
        case.updated_at = now
        case.overdue_at = None
    if decision.outcome in ("applied", "recorded") and (
        case.last_occurred_at is None or row.occurred_at > case.last_occurred_at
    ):
        case.last_occurred_at = row.occurred_at
    row.to_state = case.state
    row.hold_until = None
    if changed:
        await refresh_sla(session, workflow, case, now)
        await session.flush()
        await notify(
            session, case, "case.state_changed", from_state=from_state, event=event_summary(row)
        )
    return changed


async def drain_held(
    session: AsyncSession,
    workflow: WorkflowProfile,
    case: Case,
    now: datetime,
    *,
    notify: ChangeSink,
) -> None:
    """Try the case's held (``pending``) events again, in occurrence order, until none
    applies. Flushes."""
    await session.flush()
    for _ in range(100):
        held = (
            await session.scalars(
                select(CaseEvent)
                .where(CaseEvent.case_id == case.id, CaseEvent.outcome == CaseEventOutcome.PENDING)
                .order_by(CaseEvent.occurred_at, CaseEvent.id)
            )
        ).all()
        moved = False
        for row in held:
            decision = decide(
                workflow,
                state=case.state,
                event_type=row.type,
                detail=row.detail,
                source=row.source,
                occurred_at=row.occurred_at,
                last_occurred_at=case.last_occurred_at,
            )
            if decision.outcome == "rejected" and decision.reason == "transition_not_allowed":
                continue
            row.from_state = case.state
            row.outcome = CaseEventOutcome(decision.outcome)
            row.note = "applied in occurrence order after an earlier event arrived"
            moved = await _settle(session, workflow, case, row, decision, now, notify)
            if row.outcome == CaseEventOutcome.REJECTED:
                _reject_exception(session, row, row.channel or "events", decision)
            log.info(
                "case.event_released",
                case_id=case.id,
                outcome=str(row.outcome),
                event_type=row.type,
                to_state=case.state,
            )
            if moved:
                break
        if not moved:
            return


def history_row(
    session: AsyncSession,
    case: Case,
    event: EventInput,
    from_state: str | None,
    to_state: str | None,
    outcome: CaseEventOutcome,
    note: str | None,
    *,
    bulk: BulkInserts | None = None,
) -> CaseEvent:
    """The case's new history row, added to the session (with ``bulk``: built only, the
    caller queues it), and its audit entry."""
    row = CaseEvent(
        case_id=case.id,
        inbound_message_id=event.message_id,
        source=event.source,
        sender=event.sender_name,
        channel=event.channel,
        reference=event.reference,
        event_id=event.event_id,
        type=event.type,
        detail=event.detail,
        occurred_at=event.occurred_at,
        received_at=utcnow(),
        from_state=from_state,
        to_state=to_state,
        outcome=outcome,
        note=note,
        principal=event.principal,
    )
    entry: dict[str, Any] = {
        "action": "event",
        "entity_type": "Case",
        "entity_id": case.id,
        "patient_id": case.patient_id,
        "outcome": "4" if outcome == CaseEventOutcome.REJECTED else "0",
        "detail": {"event": event.type, "outcome": str(outcome), "message_id": event.message_id},
    }
    if bulk is None:
        session.add(row)
        audit.record(session, **entry)
    else:
        audit.record(session, bulk=bulk, **entry)
    return row


def _reject_exception(
    session: AsyncSession, row: CaseEvent, channel: str, decision: Decision
) -> None:
    session.add(
        new_exception(
            kind=decision.reason or "rejected_event",
            channel=channel,
            sender=row.sender,
            message_id=row.inbound_message_id,
            case_id=row.case_id,
            problems=[Problem("type", decision.reason or "rejected", decision.message or "")],
        )
    )


async def _reject_without_case(
    session: AsyncSession, event: EventInput, reason: str, message: str
) -> ApplyResult:
    session.add(
        new_exception(
            kind=reason,
            channel=event.channel,
            sender=event.sender_name,
            message_id=event.message_id,
            problems=[Problem("patient", reason, message)],
        )
    )
    audit.record(  # the event reached the gateway but no case: refused, in the trail too
        session,
        action="event",
        entity_type="InboundMessage",
        entity_id=event.message_id or event.event_id,
        outcome="4",
        detail={"event": event.type, "outcome": reason},
    )
    await session.flush()
    log.info("case.event_without_case", reason=reason, event_type=event.type, source=event.source)
    return ApplyResult("no_case", None, reason=reason)
