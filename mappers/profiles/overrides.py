"""Per-EHR overrides of outgoing FHIR (the ``overrides:`` block of an EHR target profile).

Production EHRs each want something slightly different: their own identifier namespace
next to ours, an extension saying where the data came from, no Flags, their local code for
a medication. These are data, applied by :func:`mappers.ehr_overrides.target_transform`
to each resource of the transaction Bundle built for that target.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from mappers.profiles.common import Strict

OverridableType = Literal[
    "Patient",
    "QuestionnaireResponse",
    "MedicationRequest",
    "Provenance",
    "Observation",
    "Flag",
    "Consent",
]


class IdentifierOverride(Strict):
    """Also send our identifier of system ``from`` under the EHR's system ``to``.

    Ours stays: the transaction's ``ifNoneExist`` deduplicates on it, so dropping it would
    make a replay create duplicates (https://hl7.org/fhir/R4/http.html#ccreate).
    """

    from_: str = Field(alias="from", description="Our identifier system (full URI).")
    to: str = Field(description="The EHR's identifier system (URI or urn:oid:).")
    resource_types: list[OverridableType] = Field(
        default_factory=list, description="Only these types (default: every type)."
    )


class ExtensionOverride(Strict):
    """An extension added to every resource of ``resource_type``.

    ``extension`` is FHIR JSON (``url`` plus one ``value[x]``), validated at load time.
    """

    resource_type: OverridableType
    extension: dict[str, Any]

    @field_validator("extension")
    @classmethod
    def _shape(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("url"), str):
            raise ValueError("an extension needs a url")
        values = [k for k in value if k.startswith("value")]
        if len(values) != 1:
            raise ValueError("an extension needs exactly one value[x]")
        return value


class CodeTranslation(Strict):
    """Translate codings through a ConceptMap (``concept-maps/<concept_map>.json|csv``).

    Every Coding whose system is a source system of the map, inside ``elements`` (FHIR
    element paths such as ``MedicationRequest.medicationCodeableConcept``; default every
    CodeableConcept of the resource), gets the target coding added (``mode: add``, the
    original kept first) or replacing it (``mode: replace``).
    """

    concept_map: str
    elements: list[str] = Field(default_factory=list)
    mode: Literal["add", "replace"] = "add"


class EhrOverrides(Strict):
    """Everything a target changes in the FHIR it receives."""

    identifier_systems: list[IdentifierOverride] = Field(default_factory=list)
    extensions: list[ExtensionOverride] = Field(default_factory=list)
    skip: list[OverridableType] = Field(
        default_factory=list,
        description="Resource types this EHR never receives, even when listed in send.",
    )
    code_translations: list[CodeTranslation] = Field(default_factory=list)
