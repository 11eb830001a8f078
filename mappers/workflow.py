"""The case state machine as a pure function over the workflow profile.

:func:`decide` says what one clinical event does to a case; the service applies it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from mappers.profiles import Transition, WorkflowProfile

Outcome = Literal["applied", "recorded", "late", "rejected"]


@dataclass(frozen=True)
class Decision:
    """What to do with one event.

    ``applied``: the case moves to ``to_state`` (or opens in it when it had none);
    ``recorded``: history only, the state stays (an allowed self-transition);
    ``late``: the event occurred before the latest applied one and would move the case
    backward: history only; ``rejected``: not allowed (``reason`` says why): it goes to
    the exceptions queue.
    """

    outcome: Outcome
    to_state: str | None = None
    reason: str | None = None
    message: str | None = None


def event_key(event_type: str, detail: str | None) -> str:
    """``decision`` + ``approved`` -> ``decision:approved``; no detail -> the type."""
    return f"{event_type}:{detail}" if detail else event_type


def _transition(workflow: WorkflowProfile, key: str, base: str, state: str) -> Transition | None:
    for t in workflow.transitions:
        if t.event in (key, base) and (state in t.from_ or "*" in t.from_):
            return t
    return None


def transition_exists(workflow: WorkflowProfile, *, from_state: str, to_state: str) -> bool:
    """True if some transition of ``workflow`` moves a case from ``from_state`` (or ``*``)
    to ``to_state`` (a manual override inside the workflow); False means an override
    outside it.

    """
    return any(
        t.to == to_state and (from_state in t.from_ or "*" in t.from_) for t in workflow.transitions
    )


def decide(
    workflow: WorkflowProfile,
    *,
    state: str | None,
    event_type: str,
    detail: str | None,
    source: str,
    occurred_at: datetime,
    last_occurred_at: datetime | None,
) -> Decision:
    """Decide what a clinical event does to a case in ``state`` (None: no open case).

    Rules, in order: the event type must exist in the profile; ``source`` must own it
    (ownership matrix); a ``detail`` must be one the type declares (and is required when
    it declares any); a case opens only on an event listed in ``initial``; a transition
    from the current state (or ``*``) must exist, except that a *late* event (occurred
    before ``last_occurred_at``) that has none is recorded, not rejected; a late event
    never moves the case to an earlier state unless its transition says ``backward``.
    """
    spec = workflow.events.get(event_type)
    if spec is None:
        return Decision(
            "rejected",
            reason="unknown_event",
            message=f"event type {event_type!r} is not in the workflow",
        )
    if source not in spec.owners:
        return Decision(
            "rejected",
            reason="not_owner",
            message=f"sender {source!r} does not own event {event_type!r} "
            f"(owners: {', '.join(spec.owners)})",
        )
    if spec.details and detail not in spec.details:
        return Decision(
            "rejected",
            reason="invalid_detail",
            message=f"event {event_type!r} needs one of: {', '.join(spec.details)}",
        )
    if not spec.details and detail:
        return Decision(
            "rejected", reason="invalid_detail", message=f"event {event_type!r} takes no detail"
        )
    key = event_key(event_type, detail)
    if state is None:
        initial = workflow.initial.get(key) or workflow.initial.get(event_type)
        if initial is None:
            return Decision(
                "rejected",
                reason="no_case",
                message="no open case and this event does not open one",
            )
        return Decision("applied", to_state=initial)
    late = last_occurred_at is not None and occurred_at < last_occurred_at
    transition = _transition(workflow, key, event_type, state)
    if transition is None:
        if late:
            return Decision(
                "late", message="occurred before the case's latest event; no transition from here"
            )
        return Decision(
            "rejected",
            reason="transition_not_allowed",
            message=f"{key!r} is not allowed in state {state!r}",
        )
    to_state = state if transition.to == "*" else transition.to
    if to_state == state:
        return Decision("recorded", to_state=state)
    if late and workflow.rank(to_state) < workflow.rank(state) and not transition.backward:
        return Decision("late", message="late event would move the case backward")
    return Decision("applied", to_state=to_state)


def sla_deadline(
    workflow: WorkflowProfile,
    *,
    state: str,
    entered_at: datetime,
    recorded: Collection[str] = (),
) -> tuple[datetime, str] | None:
    """When a case in ``state`` since ``entered_at`` becomes overdue, and by which timer.

    A timer of the state runs unless it has ``until`` and an event of that type is in
    ``recorded`` (the event types recorded since the case entered the state). The earliest
    running timer wins.

    Returns:
        ``(due_at, timer name)``, or None when no timer runs.
    """
    running = [
        (entered_at + t.within, t.name)
        for t in workflow.sla
        if t.state == state and (t.until is None or t.until not in recorded)
    ]
    return min(running) if running else None


def exception_due_at(
    workflow: WorkflowProfile, *, kind: str, created_at: datetime
) -> datetime | None:
    """When an exception of ``kind`` created at ``created_at`` is due: ``created_at`` plus
    the workflow's ``exception_sla`` for the kind (or for ``*``); None without one."""
    within = workflow.exception_sla.get(kind) or workflow.exception_sla.get("*")
    return created_at + within if within is not None else None
