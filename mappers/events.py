"""Canonical clinical events (``POST /v1/events``) and the parsed :class:`ClinicalEvent`."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from mappers.errors import MappingErrors
from mappers.intake import ID_PATTERN, pydantic_problems


class PatientIdentifier(BaseModel):
    """A patient identifier as FHIR writes it: ``system`` + ``value``."""

    model_config = ConfigDict(extra="forbid")

    system: str = Field(min_length=1, max_length=256)
    value: str = Field(min_length=1, max_length=256)


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
    occurred_at: AwareDatetime
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
