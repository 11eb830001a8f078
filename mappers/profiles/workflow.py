"""The workflow profile (``profiles/workflow.yaml``): case states, transitions, ownership."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from mappers.profiles.common import KEY, Strict


class Transition(Strict):
    """``event`` (``type`` or ``type:detail``) moves a case ``from`` states ``to`` one
    (``to: "*"`` keeps the state). The key is ``event``, not ``on``: YAML 1.1 reads a bare
    ``on`` as the boolean true."""

    event: str
    from_: list[str] = Field(alias="from")
    to: str
    backward: bool = Field(default=False, description="Allowed even though it moves the case back.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EventType(Strict):
    """A clinical event type, who may send it, and the details it may carry."""

    owners: list[str]
    details: list[str] = Field(default_factory=list)
    opens_case: bool = False


class SlaTimer(Strict):
    """A case is overdue when it stays in ``state`` longer than ``within`` (ISO 8601
    duration, e.g. ``PT24H``); with ``until``, only while no event of that type has been
    recorded since the case entered the state (``paid`` without ``ehr_delivered``)."""

    name: Annotated[str, Field(pattern=KEY)]
    state: str
    within: timedelta
    until: str | None = None


class WorkflowProfile(Strict):
    """Case states, transitions and ownership (``profiles/workflow.yaml``).

    ``states`` are listed in journey order: a transition to an earlier state is
    "backward" and is refused for late events unless ``backward: true``.

    ``reorder_window``: an event the current state does not allow, and that is not late,
    waits this long for earlier events still on their way (events are applied in order of
    occurrence); then it goes to the exceptions queue. Zero refuses it at once.
    ``sla``: the timers that flag overdue cases. ``exception_sla``: how long an open
    exception of each kind may wait for a person (its due time on the console; past it,
    an ``exception.overdue`` webhook escalates it).
    """

    kind: Literal["workflow"] = "workflow"
    version: str
    initial: dict[str, str] = Field(
        default_factory=dict, description="event -> the state a new case opens in"
    )
    states: list[str]
    terminal: list[str] = Field(default_factory=list)
    events: dict[str, EventType]
    transitions: list[Transition]
    reorder_window: timedelta = timedelta(0)
    sla: list[SlaTimer] = Field(default_factory=list)
    exception_sla: dict[str, timedelta] = Field(
        default_factory=dict,
        description="exception kind -> how long it may stay open before it is escalated "
        "to ops subscribers (exception.overdue); '*' for every other kind",
    )

    @model_validator(mode="after")
    def _consistent(self) -> WorkflowProfile:
        states = set(self.states)
        problems = []
        for t in self.transitions:
            base = t.event.split(":", 1)[0]
            if base not in self.events:
                problems.append(f"transition on unknown event {t.event!r}")
            elif ":" in t.event and t.event.split(":", 1)[1] not in self.events[base].details:
                problems.append(f"transition on unknown detail {t.event!r}")
            for s in [*t.from_, t.to]:
                if s not in states and s != "*":
                    problems.append(f"transition {t.event!r} names unknown state {s!r}")
        for event, state in self.initial.items():
            if event.split(":", 1)[0] not in self.events:
                problems.append(f"initial names unknown event {event!r}")
            if state not in states:
                problems.append(f"initial names unknown state {state!r}")
        for s in self.terminal:
            if s not in states:
                problems.append(f"terminal names unknown state {s!r}")
        if self.reorder_window < timedelta(0):
            problems.append("reorder_window must not be negative")
        names = set()
        for timer in self.sla:
            if timer.name in names:
                problems.append(f"SLA timer {timer.name!r} defined twice")
            names.add(timer.name)
            if timer.state not in states:
                problems.append(f"SLA timer {timer.name!r} names unknown state {timer.state!r}")
            if timer.until is not None and timer.until not in self.events:
                problems.append(f"SLA timer {timer.name!r} names unknown event {timer.until!r}")
            if timer.within <= timedelta(0):
                problems.append(f"SLA timer {timer.name!r} needs a positive duration")
        for kind, within in self.exception_sla.items():
            if within <= timedelta(0):
                problems.append(f"exception SLA {kind!r} needs a positive duration")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def rank(self, state: str) -> int:
        """Position of ``state`` in the journey (0-based)."""
        return self.states.index(state)
