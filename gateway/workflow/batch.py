"""Recording a batch of events in one transaction (:func:`record_events`): the batch form
of :func:`gateway.workflow.service.apply_event`, for the delivery worker's
``ehr_delivered`` events and the inbox worker's claimed messages."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.bulk import BulkInserts, row_values
from gateway.db.models import Case, CaseEvent, CaseEventOutcome
from gateway.db.types import utcnow
from gateway.logging import get_logger
from gateway.workflow.service import (
    ApplyResult,
    ChangeSink,
    EventInput,
    apply_event,
    history_row,
)
from gateway.workflow.sla import refresh_sla_many, stops_a_timer
from mappers.profiles import WorkflowProfile
from mappers.workflow import decide

log = get_logger(__name__)


async def record_events(
    session: AsyncSession,
    workflow: WorkflowProfile,
    events: Sequence[EventInput],
    *,
    notify: ChangeSink,
) -> list[ApplyResult]:
    """Apply several events in one transaction, in the given order: the batch form of
    :func:`~gateway.workflow.service.apply_event` with the same rules and results (the
    delivery worker records a batch of ``ehr_delivered`` events this way, and the inbox
    worker the events of a claimed batch of messages).

    The open cases of the events' patients are found and locked in one query (in id
    order, so two batches never wait on each other crosswise) and their duplicates in
    another; an event that only adds to a case's history (``recorded`` or ``late``, not
    seen before) is written without further queries, and the SLA deadlines of those cases
    are recomputed together. Every other event (one that opens, moves or is refused by a
    case, names a case or a program, a retry of a rejected event), and every later event
    of the same patient, goes through ``apply_event``, so events of one case still
    apply one after the other in order. Flushes; the caller commits.

    Returns:
        One :class:`ApplyResult` per event, in order.
    """
    if not events:
        return []
    simple = [e for e in events if not e.case_id and not e.program]
    cases = await _open_cases(session, workflow, sorted({e.patient_id for e in simple}))
    seen = await _seen_events(
        session, [(cases[e.patient_id], e) for e in simple if e.patient_id in cases]
    )
    results: list[ApplyResult] = []
    slow_patients: set[str] = set()
    refresh: dict[str, Case] = {}
    settled_now: dict[str, set[str]] = {}
    # the history rows that only add to a case, and their audit entries: one round trip
    bulk = BulkInserts()
    now = utcnow()

    async def slow(event: EventInput, case: Case | None) -> ApplyResult:
        """Through :func:`apply_event`, after the rows queued so far (it reads the
        history); the case's later SLA refresh then reads its history too (a state it
        may enter now starts after the events recorded before)."""
        slow_patients.add(event.patient_id)
        if case is not None:
            settled_now.pop(case.id, None)
        await bulk.flush(session)
        return await apply_event(session, workflow, event, notify=notify)

    for event in events:
        case = cases.get(event.patient_id)
        if case is None or event.case_id or event.program or event.patient_id in slow_patients:
            results.append(await slow(event, case))
            continue
        key = (case.id, event.sender_name, event.event_id)
        existing = seen.get(key)
        if existing is not None and existing != CaseEventOutcome.REJECTED:
            results.append(ApplyResult("duplicate", case.id, case.state, case.state))
            continue
        decision = decide(
            workflow,
            state=case.state,
            event_type=event.type,
            detail=event.detail,
            source=event.source,
            occurred_at=event.occurred_at,
            last_occurred_at=case.last_occurred_at,
        )
        if existing is not None or decision.outcome not in ("recorded", "late"):
            results.append(await slow(event, case))
            continue
        outcome = CaseEventOutcome(decision.outcome)
        seen[key] = outcome
        from_state = case.state
        row = history_row(
            session, case, event, from_state, from_state, outcome, decision.message, bulk=bulk
        )
        bulk.add(CaseEvent, **row_values(row))
        if outcome == CaseEventOutcome.RECORDED and (
            case.last_occurred_at is None or row.occurred_at > case.last_occurred_at
        ):
            case.last_occurred_at = row.occurred_at
        if stops_a_timer(workflow, case.state, event.type):
            refresh[case.id] = case
            settled_now.setdefault(case.id, set()).add(event.type)
        log.info(
            "case.event",
            case_id=case.id,
            outcome=str(outcome),
            from_state=from_state,
            to_state=from_state,
            event_type=event.type,
            source=event.source,
        )
        results.append(ApplyResult(str(outcome), case.id, from_state, from_state))
    if refresh:
        await refresh_sla_many(
            session, workflow, list(refresh.values()), now, settled_now=settled_now
        )
    await session.flush()
    await bulk.flush(session)
    return results


async def _open_cases(
    session: AsyncSession, workflow: WorkflowProfile, patient_ids: Sequence[str]
) -> dict[str, Case]:
    """The case ``apply_event`` would find for each patient (no case id, no program: its
    latest open case), locked ``FOR UPDATE`` on PostgreSQL, in one query."""
    if not patient_ids:
        return {}
    stmt = (
        select(Case)
        .where(
            Case.patient_id.in_(list(patient_ids)),
            Case.state.not_in(workflow.terminal or ["__none__"]),
        )
        .order_by(Case.id)
    )
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    picked: dict[str, Case] = {}
    for case in (await session.scalars(stmt)).all():
        best = picked.get(case.patient_id)
        if best is None or case.opened_at > best.opened_at:
            picked[case.patient_id] = case
    return picked


async def _seen_events(
    session: AsyncSession, pairs: Sequence[tuple[Case, EventInput]]
) -> dict[tuple[str, str, str], CaseEventOutcome]:
    """``(case id, sender, event id) -> outcome`` of these events already in these cases'
    histories (one query)."""
    if not pairs:
        return {}
    rows = await session.execute(
        select(CaseEvent.case_id, CaseEvent.sender, CaseEvent.event_id, CaseEvent.outcome).where(
            CaseEvent.case_id.in_(sorted({c.id for c, _ in pairs})),
            CaseEvent.event_id.in_(sorted({e.event_id for _, e in pairs})),
        )
    )
    return {
        (case_id, sender, event_id): CaseEventOutcome(outcome)
        for case_id, sender, event_id, outcome in rows
    }
