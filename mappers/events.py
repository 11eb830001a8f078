"""Canonical clinical events (``POST /v1/events``) and the parsed :class:`ClinicalEvent`.

Every inbound channel (canonical JSON, partner webhooks, HL7 v2, FHIR Subscription
notifications) is mapped to the same :class:`ClinicalEvent`, which the workflow engine
applies to a case. A :class:`PatientRef` says how to find the patient without carrying
anything but the identifier itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from mappers.errors import MappingErrors, Problem
from mappers.intake import ID_PATTERN, pydantic_problems


class PatientIdentifier(BaseModel):
    """A patient identifier as FHIR writes it: ``system`` + ``value``."""

    model_config = ConfigDict(extra="forbid")

    system: str = Field(min_length=1, max_length=256)
    value: str = Field(min_length=1, max_length=256)


def _date_time_text(value: Any) -> Any:
    """Refuse a number where the contract says an ISO 8601 date-time: pydantic would read
    it as Unix time, and the OpenAPI document (``format: date-time``) says text."""
    if isinstance(value, int | float):
        raise ValueError("expected an ISO 8601 date-time with a UTC offset, not a number")
    return value


class CanonicalEvent(BaseModel):
    """A clinical event in the gateway's own JSON form.

    ``type`` names a workflow event (``provider_assigned``, ``decision``,
    ``prescription_sent``, ``dispensed``, ``shipped``, ``refill_requested``...); a
    ``decision`` carries its ``status`` (``approved | denied | more_info_needed``; the key
    ``decision`` is accepted too). ``source`` is the sender kind of the ownership matrix
    (``ehr``, ``provider_network``, ``pharmacy``...).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    event_id: str = Field(
        pattern=ID_PATTERN, description="The sender's id; dedupe key with source."
    )
    source: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", examples=["ehr"])
    type: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", examples=["decision"])
    status: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]{0,63}$",
        validation_alias=AliasChoices("status", "decision"),
        examples=["approved"],
    )
    occurred_at: Annotated[AwareDatetime, BeforeValidator(_date_time_text)]
    patient: PatientIdentifier
    case_id: str | None = Field(default=None, max_length=64)
    note: str | None = Field(default=None, max_length=1000, description="Not stored in logs.")


def parse_canonical_event(data: Any) -> CanonicalEvent:
    """Validate a canonical event.

    Raises:
        MappingErrors: every problem, located by field.
    """
    try:
        return CanonicalEvent.model_validate(data)
    except ValidationError as exc:
        raise MappingErrors(pydantic_problems(exc)) from exc


@dataclass(frozen=True, slots=True)
class PatientRef:
    """One way to find a patient, tried in the order given (events and intake alike).

    ``kind="identifier"``: ``system|value`` against the patient keys (canonical ids, EHR
    MRNs and partner ids learned earlier); ``kind="remote_id"``: ``value`` is the Patient id
    that EHR ``target`` assigned to one of our patients (``remote_ids``);
    ``kind="submission"``: an intake ``submission_id``; ``kind="email"``: a normalized
    email address (intake and checkout only).
    """

    kind: Literal["identifier", "remote_id", "submission", "email"]
    value: str
    system: str | None = None
    target: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """The patient-key form: ``("identifier", "system|value")``, ``("submission",
        id)`` or ``("email", address)`` (a ``remote_id`` has none: it is looked up in
        ``remote_ids``)."""
        if self.kind == "identifier":
            return ("identifier", f"{self.system}|{self.value}")
        return (self.kind, self.value)

    def describe(self) -> str:
        """What was tried, without the value (for the exceptions queue)."""
        if self.kind == "identifier":
            return f"identifier {self.system}"
        if self.kind == "remote_id":
            return f"Patient id in EHR {self.target}"
        return "intake submission id" if self.kind == "submission" else "email"


@dataclass(frozen=True, slots=True)
class ClinicalEvent:
    """A clinical event from any channel, ready for the workflow engine.

    Attributes:
        source: the sender's role in the ownership matrix (``ehr``, ``pharmacy``...).
        sender: the specific sender (partner or EHR target name, ``ehr`` for canonical
            events); the event id is unique per sender.
        event_id: the sender's id for the event (MSH-10, partner event id, FHIR
            ``Type/id/_history/version``...).
        type: a workflow event type; ``detail`` its detail (``decision`` + ``approved``).
        occurred_at: when it happened at the sender (aware).
        patient: the ways to find the patient, in order.
        case_id: the case, when the sender knows it.
        program: the program, for events that open cases.
        reference: the sender's business reference (order number, focus resource...).
    """

    source: str
    sender: str
    event_id: str
    type: str
    detail: str | None
    occurred_at: datetime
    patient: tuple[PatientRef, ...]
    case_id: str | None = None
    program: str | None = None
    reference: str | None = None


def split_event_ref(ref: str) -> tuple[str, str | None]:
    """``decision:approved`` -> ``("decision", "approved")``; ``dispensed`` ->
    ``("dispensed", None)``."""
    event_type, _, detail = ref.partition(":")
    return event_type, detail or None


def canonical_to_clinical_event(event: CanonicalEvent) -> ClinicalEvent:
    """A validated canonical event (``POST /v1/events``) as a :class:`ClinicalEvent`.

    The sender is the declared ``source``; the patient is the one identifier given.
    """
    return ClinicalEvent(
        source=event.source,
        sender=event.source,
        event_id=event.event_id,
        type=event.type,
        detail=event.status,
        occurred_at=event.occurred_at,
        patient=(PatientRef("identifier", event.patient.value, system=event.patient.system),),
        case_id=event.case_id,
    )


#: How far ahead of its receipt an event's time may be, unless the sender's profile says
#: otherwise (``max_future``): clocks of two systems differ by seconds, not by hours.
DEFAULT_MAX_FUTURE = timedelta(minutes=5)


def future_time_problem(
    occurred_at: datetime,
    *,
    received_at: datetime,
    max_future: timedelta,
    location: str = "occurred_at",
) -> Problem | None:
    """The ``future_timestamp`` problem when ``occurred_at`` is more than ``max_future``
    after ``received_at``, else None.

    An event from the future is almost always a time read in the wrong zone (an HL7
    ``MSH-7`` without an offset and a wrong ``hl7.timezone``; a local time sent as UTC).
    Applied, it would make every correct later event of the case count as late, so it is
    refused instead (the caller keeps it in the exceptions queue). Both times are aware;
    a naive ``received_at`` (SQLite) is UTC. The message names the excess, not the time.
    """
    received = received_at if received_at.tzinfo else received_at.replace(tzinfo=UTC)
    ahead = occurred_at - received
    if ahead <= max_future:
        return None
    minutes = int(ahead.total_seconds() // 60)
    return Problem(
        location,
        "future_timestamp",
        f"the event's time is {minutes} minute(s) after it was received (at most "
        f"{int(max_future.total_seconds())} s allowed): a time without an offset read in "
        "the wrong zone? check the sender's clock and its profile's timezone",
    )
