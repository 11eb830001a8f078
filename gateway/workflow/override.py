"""A manual override of a case's state, by a person, with a reason.

The override is checked against the workflow (``profiles/workflow.yaml``): a move some
transition allows is recorded as ``override``; any other (a state the table never moves
the case to from here) is allowed too but marked ``outside_workflow``, so history shows
it was a person's decision against the table. Either way it is a row of the case's
history (``source`` ``ops``, ``type`` ``override``, the reason as ``note``, the person as
``principal``), an audit entry (``override``), a fresh SLA timer for the new state, and
the ``case.state_changed`` webhook (``notify``).

Errors: :class:`~gateway.errors.UnprocessableError` (an unknown state; the case is
already in it; no reason).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.db.models import Case, CaseEvent, CaseEventOutcome
from gateway.errors import UnprocessableError
from gateway.workflow.service import ChangeSink, event_summary
from gateway.workflow.sla import refresh_sla
from mappers.errors import Problem
from mappers.profiles import WorkflowProfile
from mappers.workflow import transition_exists

#: ``case_events.source`` and ``type`` of an override.
OVERRIDE_SOURCE = "ops"
OVERRIDE_TYPE = "override"


@dataclass(frozen=True)
class OverrideResult:
    """What an override did: the states, and whether the workflow allows that move."""

    case_id: str
    from_state: str
    to_state: str
    within_workflow: bool


async def override_state(
    session: AsyncSession,
    workflow: WorkflowProfile,
    case: Case,
    *,
    to_state: str,
    reason: str,
    by: str,
    now: datetime,
    notify: ChangeSink,
) -> OverrideResult:
    """Move ``case`` to ``to_state`` by hand (see the module docstring); flushes.

    Args:
        by: who decided (``staff:<username>`` or ``client:<name>``), kept as the history
            row's principal.
        reason: why (required; kept in the history; no PHI please).

    Raises:
        UnprocessableError: unknown state, same state, or an empty reason.
    """
    problems = []
    if to_state not in workflow.states:
        problems.append(Problem("state", "unknown_state", "not a state of the workflow"))
    elif to_state == case.state:
        problems.append(Problem("state", "same_state", f"the case is already {case.state}"))
    if not reason.strip():
        problems.append(Problem("reason", "required", "say why the state is overridden"))
    if problems:
        raise UnprocessableError("the override is not valid", problems)
    from_state = case.state
    within = transition_exists(workflow, from_state=from_state, to_state=to_state)
    row = CaseEvent(
        case_id=case.id,
        inbound_message_id=None,
        source=OVERRIDE_SOURCE,
        sender=by[:128],
        channel="ops",
        reference=None,
        event_id=f"override-{uuid.uuid4().hex}",
        type=OVERRIDE_TYPE,
        detail=None if within else "outside_workflow",
        occurred_at=now,
        received_at=now,
        from_state=from_state,
        to_state=to_state,
        outcome=CaseEventOutcome.APPLIED,
        note=reason.strip(),
        principal=by[:256],
    )
    session.add(row)
    case.state = to_state
    case.state_entered_at = now
    case.updated_at = now
    case.overdue_at = None
    case.last_occurred_at = max(case.last_occurred_at or now, now)
    await refresh_sla(session, workflow, case, now)
    audit.record(
        session,
        action="override",
        entity_type="Case",
        entity_id=case.id,
        patient_id=case.patient_id,
        detail={"from": from_state, "to": to_state, "within_workflow": within},
    )
    await session.flush()
    await notify(
        session, case, "case.state_changed", from_state=from_state, event=event_summary(row)
    )
    return OverrideResult(case.id, from_state, to_state, within)
