"""Workflow timers: the time-driven side of the workflow, one of the worker's loops.

* Events held longer than the reorder window (:mod:`gateway.workflow.service`): tried
  once more, then refused into the exceptions queue (``transition_not_allowed``), their
  message marked ``failed``.
* Cases past their SLA deadline and not flagged yet: flagged (``overdue_at``) and a
  ``case.overdue`` notification is handed to ``notify`` (the subscribers' outbox).
* Open exceptions past their kind's SLA (``exception_sla``) and not escalated yet:
  marked (``escalated_at``) and handed to ``escalate`` (an ``exception.overdue`` webhook).

Each case is changed in its own transaction (the loop's: :class:`WorkflowTimers`), locked
``FOR UPDATE SKIP LOCKED`` on PostgreSQL so two workers never take the same case; on
SQLite a case changed meanwhile by another process fails the transaction
(``StaleDataError``) and is taken again at the next step. The time is the loop's clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from sqlalchemy import and_, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.sql.elements import ColumnElement

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.db.models import (
    Case,
    CaseEvent,
    CaseEventOutcome,
    ExceptionRecord,
    ExceptionStatus,
    InboundMessage,
    MessageStatus,
)
from gateway.db.uow import SessionFactory, unit_of_work
from gateway.inbox.repository import new_exception
from gateway.logging import get_logger
from gateway.queue.repository import is_postgres
from gateway.workflow.service import ChangeSink, drain_held
from mappers.errors import Problem
from mappers.profiles import WorkflowProfile
from mappers.workflow import exception_due_at

log = get_logger(__name__)


async def held_cases_due(session: AsyncSession, *, now: datetime, limit: int) -> list[str]:
    """Ids of cases with a held event whose reorder window closed by ``now`` (oldest
    first, at most ``limit``)."""
    rows = await session.scalars(
        select(CaseEvent.case_id)
        .where(CaseEvent.outcome == CaseEventOutcome.PENDING, CaseEvent.hold_until <= now)
        .order_by(CaseEvent.hold_until)
        .limit(limit)
    )
    return list(dict.fromkeys(rows.all()))


async def expire_held(
    session: AsyncSession,
    workflow: WorkflowProfile,
    *,
    case_id: str,
    now: datetime,
    notify: ChangeSink,
) -> int:
    """Try a case's held events once more; refuse those whose window closed by ``now``.
    Flushes.

    Returns:
        1 when the case was taken (0: gone, or another worker has it locked).
    """
    stmt = select(Case).where(Case.id == case_id)
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    case = await session.scalar(stmt)
    if case is None:
        return 0
    await drain_held(session, workflow, case, now, notify=notify)
    expired = (
        await session.scalars(
            select(CaseEvent)
            .where(
                CaseEvent.case_id == case_id,
                CaseEvent.outcome == CaseEventOutcome.PENDING,
                CaseEvent.hold_until <= now,
            )
            .order_by(CaseEvent.occurred_at, CaseEvent.id)
        )
    ).all()
    for row in expired:
        row.outcome = CaseEventOutcome.REJECTED
        row.hold_until = None
        row.to_state = case.state
        message = (
            f"{row.type!r} is not allowed in state {case.state!r}, and no earlier event "
            f"arrived within the reorder window ({workflow.reorder_window})"
        )
        row.note = message
        session.add(
            new_exception(
                kind="transition_not_allowed",
                channel=row.channel or "events",
                sender=row.sender,
                message_id=row.inbound_message_id,
                case_id=case_id,
                problems=[Problem("type", "transition_not_allowed", message)],
            )
        )
        if row.inbound_message_id:
            await session.execute(
                update(InboundMessage)
                .where(InboundMessage.id == row.inbound_message_id)
                .values(status=MessageStatus.FAILED)
                .execution_options(synchronize_session=False)
            )
        log.info("case.event_refused_after_wait", case_id=case_id, event_type=row.type)
    await session.flush()
    return 1


async def flag_overdue(
    session: AsyncSession, *, now: datetime, limit: int, notify: ChangeSink
) -> int:
    """Flag cases past their SLA deadline at ``now`` (at most ``limit``) and notify
    ``case.overdue`` once each. Flushes; returns how many were flagged."""
    stmt = (
        select(Case)
        .where(Case.sla_due_at <= now, Case.overdue_at.is_(None))
        .order_by(Case.sla_due_at)
        .limit(limit)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    cases = (await session.scalars(stmt)).all()
    for case in cases:
        case.overdue_at = now
        await session.flush()
        await notify(session, case, "case.overdue", from_state=case.state, event=None)
        log.info("case.overdue", case_id=case.id, state=case.state, timer=case.sla_timer)
    return len(cases)


class ExceptionSink(Protocol):
    """Told of each open exception past its SLA, in the transaction that marks it
    (flushes at most; returns how many notifications it queued)."""

    async def __call__(
        self, session: AsyncSession, row: ExceptionRecord, *, due_at: datetime
    ) -> int: ...


def exceptions_past_sla(workflow: WorkflowProfile, *, now: datetime) -> ColumnElement[bool] | None:
    """The SQL condition of exceptions past their kind's SLA at ``now`` (whatever their
    status); None when the workflow sets no exception SLA."""
    sla = workflow.exception_sla
    if not sla:
        return None
    named = [k for k in sla if k != "*"]
    late = [
        and_(ExceptionRecord.kind == kind, ExceptionRecord.created_at <= now - within)
        for kind, within in sla.items()
        if kind != "*"
    ]
    if "*" in sla:
        late.append(
            and_(
                ExceptionRecord.kind.not_in(named) if named else true(),
                ExceptionRecord.created_at <= now - sla["*"],
            )
        )
    return or_(*late)


async def escalate_overdue_exceptions(
    session: AsyncSession,
    workflow: WorkflowProfile,
    *,
    now: datetime,
    limit: int,
    escalate: ExceptionSink,
) -> int:
    """Mark open exceptions past their kind's SLA at ``now`` (at most ``limit``, oldest
    first) as escalated and hand each to ``escalate`` once. Flushes; returns how many."""
    late = exceptions_past_sla(workflow, now=now)
    if late is None:
        return 0
    stmt = (
        select(ExceptionRecord)
        .where(
            ExceptionRecord.status == ExceptionStatus.OPEN,
            ExceptionRecord.escalated_at.is_(None),
            late,
        )
        .order_by(ExceptionRecord.id)
        .limit(limit)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    rows = (await session.scalars(stmt)).all()
    for row in rows:
        due_at = exception_due_at(workflow, kind=row.kind, created_at=row.created_at)
        row.escalated_at = now
        await escalate(session, row, due_at=due_at or now)
        log.info("exception.overdue", exception_id=row.id, kind=row.kind)
    await session.flush()
    return len(rows)


class WorkflowTimers:
    """The workflow timers loop's step (run by a :class:`~gateway.queue.loop.PollingLoop`).

    Args:
        sessions: write sessions; each case is one transaction.
        workflow: the current workflow profile (None: no workflow, nothing to do).
        notify: told of each overdue case (the subscribers' outbox).
        escalate: told of each exception past its SLA (None: none are escalated).
        clock: the loop's clock.
        limit: at most this many cases of each kind per step.
    """

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        workflow: Callable[[], WorkflowProfile | None],
        notify: ChangeSink,
        clock: Clock = SYSTEM_CLOCK,
        limit: int = 100,
        escalate: ExceptionSink | None = None,
    ) -> None:
        self._sessions = sessions
        self._workflow = workflow
        self._notify = notify
        self._escalate = escalate
        self._clock = clock
        self._limit = limit

    async def step(self, *, now: datetime | None = None) -> int:
        """Expire held events and flag overdue cases due at ``now`` (default: the clock).

        Returns:
            How many cases were changed.
        """
        workflow = self._workflow()
        if workflow is None:
            return 0
        now = now or self._clock.now()
        done = 0
        async with self._sessions() as session:
            case_ids = await held_cases_due(session, now=now, limit=self._limit)
        for case_id in case_ids:
            try:
                async with unit_of_work(self._sessions) as session:
                    done += await expire_held(
                        session, workflow, case_id=case_id, now=now, notify=self._notify
                    )
            except StaleDataError:
                log.info("case.changed_meanwhile", case_id=case_id)  # taken again next step
        try:
            async with unit_of_work(self._sessions) as session:
                done += await flag_overdue(session, now=now, limit=self._limit, notify=self._notify)
        except StaleDataError:
            log.info("case.changed_meanwhile")
        if self._escalate is not None:
            async with unit_of_work(self._sessions) as session:
                done += await escalate_overdue_exceptions(
                    session, workflow, now=now, limit=self._limit, escalate=self._escalate
                )
        return done
