"""Resources derived from an intake submission, as its profile's ``derived:`` block says.

* **Observations** for vital signs (R4 vital signs profiles,
  https://hl7.org/fhir/R4/observation-vitalsigns.html): body weight (LOINC 29463-7),
  height (8302-2) from quantity answers, converted to the profile's UCUM unit; BMI
  (39156-5) computed as ``kg / m2`` from a weight and a height answer. ``status`` final,
  ``category`` vital-signs, ``effectiveDateTime`` the submission time, ``derivedFrom``
  the QuestionnaireResponse.
* **Flags** (https://hl7.org/fhir/R4/flag.html) for risk rules written in FHIRPath over the
  QuestionnaireResponse, e.g. a personal or family history of medullary thyroid carcinoma
  or MEN2 before GLP-1 therapy. ``status`` active, ``category`` from flag-category, the
  R4 ``flag-priority`` extension (``PH`` high by default) so a provider sees them first,
  and ``flag-detail`` pointing at the QuestionnaireResponse.
* **Consents** (https://hl7.org/fhir/R4/consent.html) for each accepted consent type the
  profile maps: ``status`` active, ``scope``, ``category``, ``policy.uri`` (``{version}`` in
  the profile's URI is replaced by the accepted version), ``dateTime`` when accepted,
  ``sourceReference`` the QuestionnaireResponse, ``provision.type`` permit.

Every derived resource has the business identifier ``<base>/<kind>|<submission id>/<rule
id>`` and an id derived from it (UUID v5), so mapping a submission twice gives the same
ids and an EHR conditional create deduplicates it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from decimal import ROUND_HALF_EVEN, Decimal
from functools import lru_cache
from typing import Any

from mappers import normalize, ucum
from mappers.fhirpath import Evaluator, compile_fhirpath, is_true, linkids_named
from mappers.identifiers import IdentifierSystems
from mappers.intake import ParsedIntake
from mappers.profiles import ConsentSpec, FlagSpec, ObservationSpec

OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
FLAG_PRIORITY = "http://hl7.org/fhir/StructureDefinition/flag-priority"
FLAG_PRIORITY_CODES = "http://hl7.org/fhir/flag-priority-code"
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"

_CATEGORY_DISPLAY = {
    "vital-signs": "Vital Signs",
    "survey": "Survey",
    "exam": "Exam",
    "laboratory": "Laboratory",
    "social-history": "Social History",
}
_PRIORITY_DISPLAY = {
    "PN": "No alarm",
    "PL": "Low priority",
    "PM": "Medium priority",
    "PH": "High priority",
}
_NAMESPACE = uuid.UUID("6f1c1d2e-8a4b-5c3d-9e0f-112233445566")

#: Kinds of derived resources and their identifier-system suffix.
DERIVED_KINDS = {
    "Observation": "intake-observation",
    "Flag": "intake-flag",
    "Consent": "intake-consent",
}


def derived_system(systems: IdentifierSystems, resource_type: str) -> str:
    """The identifier system of derived resources of ``resource_type``."""
    return f"{systems.base}/{DERIVED_KINDS[resource_type]}"


_NAMESPACE_BYTES = _NAMESPACE.bytes


def deterministic_id(system: str, value: str) -> str:
    """A stable resource id for a business identifier (UUID v5 of ``system|value``).

    The ids are persisted, so this must stay ``str(uuid.uuid5(_NAMESPACE, f"{system}|{value}"))``
    byte for byte (RFC 4122 section 4.3: SHA-1 of namespace + UTF-8 name, first 16 bytes,
    version 5, RFC variant); it computes that string without building a ``uuid.UUID``.
    """
    b = bytearray(
        hashlib.sha1(
            _NAMESPACE_BYTES + f"{system}|{value}".encode(), usedforsecurity=False
        ).digest()[:16]
    )
    b[6] = (b[6] & 0x0F) | 0x50  # version 5
    b[8] = (b[8] & 0x3F) | 0x80  # variant RFC 4122
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@lru_cache(maxsize=1024)
def flag_evaluator(expression: str) -> Evaluator:
    """The compiled FHIRPath of a flag rule (compiled once per expression)."""
    return compile_fhirpath(expression)


def prune_items(items: list[dict[str, Any]], link_ids: frozenset[str]) -> list[dict[str, Any]]:
    """The items whose linkId is in ``link_ids`` (whole), and the groups that contain
    them (with only those children), in order."""
    out = []
    for item in items:
        if item.get("linkId") in link_ids:
            out.append(item)
        elif "item" in item:
            children = prune_items(item["item"], link_ids)
            if children:
                out.append({"linkId": item["linkId"], "item": children})
    return out


@lru_cache(maxsize=1024)
def _named(expression: str) -> frozenset[str]:
    """The linkIds a rule names (found once per rule, not per submission)."""
    return frozenset(linkids_named(expression))


@lru_cache(maxsize=8192)
def _evaluate_on_items(expression: str, items_json: str) -> bool:
    resource = {"resourceType": "QuestionnaireResponse", "item": json.loads(items_json)}
    return is_true(flag_evaluator(expression)(resource))


#: QR answer types that hold no free text and no dates (a bare number, a yes/no, a code).
_CLOSED_ANSWERS = frozenset(
    {"valueBoolean", "valueCoding", "valueInteger", "valueDecimal", "valueQuantity"}
)


def closed_item(item: dict[str, Any]) -> bool:
    """A QR item whose answers are booleans, codings or bare numbers (or absent with a
    reason), and whose children are too: no free text, so its rule results may be cached."""
    for answer in item.get("answer", []):
        if set(answer) - _CLOSED_ANSWERS:
            return False
    return all(closed_item(child) for child in item.get("item", []))


def flag_applies(flag: FlagSpec, questionnaire_response: dict[str, Any]) -> bool:
    """Evaluate a flag rule.

    ``scope: named_items`` (the default) evaluates the rule over a QuestionnaireResponse
    that holds only the items whose linkIds the rule names, which makes a rule cost the
    same whatever the size of the form, and lets equal answers share one evaluation (a
    bounded cache keyed by the rule and those items, used only when they hold yes/no,
    coded or numeric answers: free text is never cached). ``scope: response`` (or a rule that
    names no linkId) evaluates over the whole QuestionnaireResponse.
    """
    names = _named(flag.when)
    if flag.scope == "response" or not names:
        return is_true(flag_evaluator(flag.when)(questionnaire_response))
    items = prune_items(questionnaire_response.get("item", []), names)
    if not all(closed_item(item) for item in items):
        # free text or dates: evaluated, never kept in the cache
        resource = {"resourceType": "QuestionnaireResponse", "item": items}
        return is_true(flag_evaluator(flag.when)(resource))
    return _evaluate_on_items(flag.when, json.dumps(items, sort_keys=True))


def intake_to_derived(
    parsed: ParsedIntake,
    questionnaire_response: dict[str, Any],
    *,
    patient_id: str,
    systems: IdentifierSystems,
) -> list[dict[str, Any]]:
    """Observations, Flags and Consents derived from one submission (R4 JSON).

    Args:
        parsed: the parsed submission.
        questionnaire_response: the QuestionnaireResponse built from it (FHIRPath rules
            are evaluated over it; derived resources reference it).
        patient_id: the Patient's local id.
        systems: identifier systems.

    Returns:
        The resources in profile order: observations, then flags, then consents. An
        observation whose question was not answered (or answered "unknown") is left out,
        as is a flag whose rule is false.

    Raises:
        MappingError: ``unknown_unit_conversion`` (prevented by the lint).
    """
    derived = parsed.profile.derived
    sid = parsed.submission.submission_id
    qr_ref = {"reference": f"QuestionnaireResponse/{questionnaire_response['id']}"}
    subject = {"reference": f"Patient/{patient_id}"}
    when = questionnaire_response["authored"]
    out: list[dict[str, Any]] = []
    for spec in derived.observations:
        value = _observation_value(spec, parsed)
        if value is None:
            continue
        system = derived_system(systems, "Observation")
        out.append(_observation(spec, value, system, f"{sid}/{spec.id}", subject, when, qr_ref))
    for flag in derived.flags:
        if not flag_applies(flag, questionnaire_response):
            continue
        system = derived_system(systems, "Flag")
        out.append(_flag(flag, system, f"{sid}/{flag.id}", subject, when, qr_ref))
    for consent in parsed.submission.consents:
        consent_spec = derived.consents.get(consent.type)
        if consent_spec is None:
            continue
        system = derived_system(systems, "Consent")
        out.append(
            _consent(
                consent_spec,
                system,
                f"{sid}/{consent.type}",
                subject,
                normalize.to_fhir_instant(consent.accepted_at),
                consent.version,
                qr_ref,
            )
        )
    return out


def _quantity_answer(parsed: ParsedIntake, key: str | None) -> tuple[Decimal, str] | None:
    answer = parsed.answers.get(key or "")
    if answer is None or not answer.values:
        return None
    value = answer.values[0][1]
    return value if isinstance(value, tuple) else None


def _observation_value(spec: ObservationSpec, parsed: ParsedIntake) -> Decimal | None:
    if spec.compute == "bmi":
        weight = _quantity_answer(parsed, spec.weight)
        height = _quantity_answer(parsed, spec.height)
        if weight is None or height is None:
            return None
        kg = ucum.convert(weight[0], weight[1], "kg", decimals=6)
        m = ucum.convert(height[0], height[1], "m", decimals=6)
        if m <= 0:
            return None
        return (kg / (m * m)).quantize(Decimal(1).scaleb(-spec.decimals), rounding=ROUND_HALF_EVEN)
    answer = _quantity_answer(parsed, spec.from_)
    if answer is None:
        return None
    return ucum.convert(answer[0], answer[1], spec.unit, decimals=spec.decimals)


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _observation(
    spec: ObservationSpec,
    value: Decimal,
    system: str,
    ident: str,
    subject: dict[str, str],
    when: str,
    qr_ref: dict[str, str],
) -> dict[str, Any]:
    unit = ucum.get_unit(spec.unit)
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": deterministic_id(system, ident),
    }
    if spec.profile:
        obs["meta"] = {"profile": [spec.profile]}
    obs.update(
        {
            "identifier": [{"system": system, "value": ident}],
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": OBSERVATION_CATEGORY,
                            "code": spec.category,
                            "display": _CATEGORY_DISPLAY[spec.category],
                        }
                    ]
                }
            ],
            "code": {"coding": [spec.code.to_fhir()], "text": spec.code.display or spec.code.code},
            "subject": subject,
            "effectiveDateTime": when,
            "performer": [subject],
            "valueQuantity": {
                "value": _number(value),
                "unit": unit.display if unit else spec.unit,
                "system": ucum.UCUM_SYSTEM,
                "code": spec.unit,
            },
            "derivedFrom": [qr_ref],
        }
    )
    return obs


def _flag(
    spec: FlagSpec,
    system: str,
    ident: str,
    subject: dict[str, str],
    when: str,
    qr_ref: dict[str, str],
) -> dict[str, Any]:
    extension: list[dict[str, Any]] = []
    if spec.priority:
        extension.append(
            {
                "url": FLAG_PRIORITY,
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": FLAG_PRIORITY_CODES,
                            "code": spec.priority,
                            "display": _PRIORITY_DISPLAY[spec.priority],
                        }
                    ]
                },
            }
        )
    extension.append({"url": FLAG_DETAIL, "valueReference": qr_ref})
    code: dict[str, Any] = {"text": spec.text}
    if spec.code:
        code = {"coding": [spec.code.to_fhir()], "text": spec.text}
    return {
        "resourceType": "Flag",
        "id": deterministic_id(system, ident),
        "extension": extension,
        "identifier": [{"system": system, "value": ident}],
        "status": "active",
        "category": [
            {
                "coding": [
                    {
                        "system": FLAG_CATEGORY,
                        "code": spec.category,
                        "display": spec.category.replace("-", " ").capitalize(),
                    }
                ]
            }
        ],
        "code": code,
        "subject": subject,
        "period": {"start": when},
    }


def _consent(
    spec: ConsentSpec,
    system: str,
    ident: str,
    subject: dict[str, str],
    accepted_at: str,
    version: str,
    qr_ref: dict[str, str],
) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": deterministic_id(system, ident),
        "identifier": [{"system": system, "value": ident}],
        "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": spec.scope}]},
        "category": [{"coding": [spec.category.to_fhir()]}],
        "patient": subject,
        "dateTime": accepted_at,
        "policy": [{"uri": spec.policy_uri.replace("{version}", version)}],
        "sourceReference": qr_ref,
        "provision": {"type": "permit"},
    }


#: What a derived resource becomes when a corrected submission no longer produces it.
RETIRED_STATUS = {"Observation": "entered-in-error", "Flag": "inactive", "Consent": "inactive"}


def retire_derived(resource: dict[str, Any]) -> dict[str, Any]:
    """A copy of a derived resource that a corrected submission no longer produces, with
    the status that says so (Observation ``entered-in-error``; Flag and Consent
    ``inactive``; a Flag's ``period.end`` is not invented)."""
    out = dict(resource)
    out["status"] = RETIRED_STATUS[resource["resourceType"]]
    return out
