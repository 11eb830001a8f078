"""SLA timers of cases (``profiles/workflow.yaml`` ``sla``): the deadline of the timer
running in a case's state, recomputed when the case moves or a timer's ``until`` event
arrives. Flagging overdue cases is :mod:`gateway.workflow.timers`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Case, CaseEvent, CaseEventOutcome
from mappers.profiles import WorkflowProfile
from mappers.workflow import sla_deadline

#: Outcomes of events that count as having happened (for a timer's ``until``).
SETTLED = (CaseEventOutcome.APPLIED, CaseEventOutcome.RECORDED, CaseEventOutcome.LATE)


def stops_a_timer(workflow: WorkflowProfile, state: str, event_type: str) -> bool:
    """True if an event of this type may stop an SLA timer of ``state`` (its ``until``)."""
    return any(t.state == state and t.until == event_type for t in workflow.sla)


async def refresh_sla(
    session: AsyncSession,
    workflow: WorkflowProfile,
    case: Case,
    now: datetime,
    *,
    history: list[CaseEvent] | None = None,
) -> None:
    """Recompute the case's SLA deadline for its current state (flushes when it must
    read the history).

    Args:
        history: the case's whole history when the caller holds it (a case opened in
            this transaction): read from it instead of querying ``case_events``, which
            also lets the deadline go into the case's INSERT rather than a later UPDATE.
    """
    timers = [t for t in workflow.sla if t.state == case.state]
    if not timers:
        case.sla_due_at, case.sla_timer = None, None
        return
    untils = {t.until for t in timers if t.until}
    recorded: set[str] = set()
    if untils and history is not None:
        recorded = {
            e.type
            for e in history
            if e.type in untils and e.outcome in SETTLED and e.received_at >= case.state_entered_at
        }
    elif untils:
        await session.flush()
        recorded = set(
            (
                await session.scalars(
                    select(CaseEvent.type).where(
                        CaseEvent.case_id == case.id,
                        CaseEvent.type.in_(untils),
                        CaseEvent.outcome.in_(SETTLED),
                        CaseEvent.received_at >= case.state_entered_at,
                    )
                )
            ).all()
        )
    _set_sla(workflow, case, recorded, now)


async def refresh_sla_many(
    session: AsyncSession,
    workflow: WorkflowProfile,
    cases: Sequence[Case],
    now: datetime,
    *,
    settled_now: Mapping[str, set[str]] | None = None,
) -> None:
    """:func:`refresh_sla` for several cases, with one query for the events that stop
    their timers.

    Args:
        settled_now: per case id, the types of the settled events this transaction added
            to its history (received now, so after the case entered its state): a timer
            whose ``until`` is one of them is stopped without reading the history, and
            when every running timer is, nothing is read (the delivery worker's batch of
            ``ehr_delivered`` events: no flush, no query).
    """
    recorded: dict[str, set[str]] = {c.id: set((settled_now or {}).get(c.id, ())) for c in cases}
    untils = {
        t.until
        for c in cases
        for t in workflow.sla
        if t.state == c.state and t.until and t.until not in recorded[c.id]
    }
    if untils:
        await session.flush()
        entered = {c.id: c.state_entered_at for c in cases}
        rows = await session.execute(
            select(CaseEvent.case_id, CaseEvent.type, CaseEvent.received_at).where(
                CaseEvent.case_id.in_(sorted(recorded)),
                CaseEvent.type.in_(sorted(untils)),
                CaseEvent.outcome.in_(SETTLED),
            )
        )
        for case_id, event_type, received_at in rows:
            if received_at >= entered[case_id]:
                recorded[case_id].add(event_type)
    for case in cases:
        _set_sla(workflow, case, recorded[case.id], now)


def _set_sla(workflow: WorkflowProfile, case: Case, recorded: set[str], now: datetime) -> None:
    deadline = sla_deadline(
        workflow, state=case.state, entered_at=case.state_entered_at, recorded=recorded
    )
    due_at, timer = deadline if deadline else (None, None)
    if (due_at, timer) != (case.sla_due_at, case.sla_timer):
        case.sla_due_at, case.sla_timer = due_at, timer
        if due_at is None or due_at > now:
            case.overdue_at = None
