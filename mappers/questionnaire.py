"""An intake profile -> the FHIR Questionnaire it publishes (R4 JSON).

Each profile version publishes one Questionnaire (https://hl7.org/fhir/R4/questionnaire.html)
with ``url`` and ``version`` from the profile, so ``QuestionnaireResponse.questionnaire``
(``url|version``) resolves to the exact form the patient answered. Item mapping:

* ``type`` as R4 item-type (``open_choice`` -> ``open-choice``), ``required``,
  ``repeats``, ``code`` (the item's LOINC codes: R4 keeps item codes on the
  Questionnaire, QuestionnaireResponse.item has no ``code``), ``maxLength``;
* choice options -> ``answerOption.valueCoding``;
* ``enable_when`` -> ``enableWhen`` (``question`` is the linkId; the answer typed as the
  question: ``answerBoolean``/``answerCoding``/``answerInteger``/``answerDecimal``/
  ``answerString``/``answerDate``) and ``enableBehavior`` when there are several;
* quantity units -> the ``questionnaire-unitOption`` extension (one per allowed unit);
  ``min_value``/``max_value`` -> the ``minValue``/``maxValue`` extensions.
"""

from __future__ import annotations

import re
from typing import Any

from mappers import ucum
from mappers.profiles import Condition, IntakeItem, IntakeProfile

UNIT_OPTION = "http://hl7.org/fhir/StructureDefinition/questionnaire-unitOption"
MIN_VALUE = "http://hl7.org/fhir/StructureDefinition/minValue"
MAX_VALUE = "http://hl7.org/fhir/StructureDefinition/maxValue"

_ID_SAFE = re.compile(r"[^A-Za-z0-9\-.]")


def questionnaire_id(profile: IntakeProfile) -> str:
    """The Questionnaire's logical id: ``<profile id>-<version>`` (FHIR id rules)."""
    return _ID_SAFE.sub("-", f"{profile.id}-{profile.version}")[:64]


def profile_to_questionnaire(profile: IntakeProfile) -> dict[str, Any]:
    """Generate the Questionnaire of one intake profile version.

    Returns:
        R4 JSON; ``status`` is the profile's (draft | active | retired).
    """
    name = re.sub(r"[^A-Za-z0-9]", "", profile.title.title()) or "Intake"
    q: dict[str, Any] = {
        "resourceType": "Questionnaire",
        "id": questionnaire_id(profile),
        "url": profile.url,
        "version": profile.version,
        "name": name[:1].upper() + name[1:],
        "title": profile.title,
        "status": profile.status,
        "subjectType": ["Patient"],
    }
    if profile.publisher:
        q["publisher"] = profile.publisher
    q["item"] = [_item(i, profile) for i in profile.items]
    return q


def _item(item: IntakeItem, profile: IntakeProfile) -> dict[str, Any]:
    out: dict[str, Any] = {}
    extension: list[dict[str, Any]] = []
    if item.type == "quantity":
        first = item.convert_to or item.unit
        codes = [first, *[u for u in [item.unit, *item.units] if u != first]]
        for code in codes:
            unit = ucum.get_unit(code or "")
            if unit is not None:
                coding = {"system": ucum.UCUM_SYSTEM, "code": unit.code, "display": unit.display}
                extension.append({"url": UNIT_OPTION, "valueCoding": coding})
    if item.type in ("integer", "decimal", "quantity"):
        kind = "valueInteger" if item.type == "integer" else "valueDecimal"
        for url, bound in ((MIN_VALUE, item.min_value), (MAX_VALUE, item.max_value)):
            if bound is not None:
                value = int(bound) if item.type == "integer" else bound
                extension.append({"url": url, kind: value})
    if extension:
        out["extension"] = extension
    out["linkId"] = item.linkid
    if item.codes:
        out["code"] = [c.to_fhir() for c in item.codes]
    out["text"] = item.text
    out["type"] = "open-choice" if item.type == "open_choice" else item.type
    if item.enable_when:
        out["enableWhen"] = [_enable_when(c, profile) for c in item.enable_when]
        if len(item.enable_when) > 1:
            out["enableBehavior"] = item.enable_behavior
    if item.required:
        out["required"] = True
    if item.repeats:
        out["repeats"] = True
    if item.max_length is not None and item.type in ("string", "text", "open_choice"):
        out["maxLength"] = item.max_length
    if item.options:
        out["answerOption"] = [{"valueCoding": o.to_coding()} for o in item.options]
    if item.items:
        out["item"] = [_item(i, profile) for i in item.items]
    return out


def _enable_when(cond: Condition, profile: IntakeProfile) -> dict[str, Any]:
    target = profile.items_by_key.get(cond.question)
    out: dict[str, Any] = {
        "question": target.linkid if target else cond.question,
        "operator": cond.operator,
    }
    answer = cond.answer
    if cond.operator == "exists" or (target is not None and target.type == "boolean"):
        out["answerBoolean"] = bool(answer)
    elif target is not None and target.is_choice:
        option = next((o for o in target.options if o.code == answer), None)
        out["answerCoding"] = option.to_coding() if option else {"code": str(answer)}
    elif target is not None and target.type == "integer" and isinstance(answer, int):
        out["answerInteger"] = answer
    elif target is not None and target.type == "quantity":
        out["answerQuantity"] = {"value": answer, "system": ucum.UCUM_SYSTEM, "code": target.unit}
    elif target is not None and target.type == "decimal":
        out["answerDecimal"] = answer
    elif target is not None and target.type == "date":
        out["answerDate"] = str(answer)
    else:
        out["answerString"] = str(answer)
    return out
