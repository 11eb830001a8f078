"""Intake submissions -> FHIR Patient and QuestionnaireResponse.

The submission contract (``POST /v1/intake-submissions``) is :class:`IntakeSubmission`.
:func:`parse_intake_submission` validates and normalizes it, collecting every problem
(structure, phone, state, dates, answers against the form's profile) into one
:class:`~mappers.errors.MappingErrors`; the mappers below then build R4 JSON.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from mappers import normalize
from mappers.errors import MappingError, MappingErrors, Problem, ProblemCollector
from mappers.identifiers import IdentifierSystems
from mappers.profiles import IntakeItem, IntakeProfile
from mappers.validation import CONTROL_CHARACTERS

US_CORE_PATIENT = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"
US_CORE_QR = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-questionnaireresponse"
US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
UCUM = "http://unitsofmeasure.org"

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"


def _normalizer(func: Callable[[str], str]) -> Callable[[str], str]:
    """Wrap a normalizer so its MappingError becomes a pydantic error with our code."""

    def run(value: str) -> str:
        try:
            return func(value)
        except MappingError as exc:
            raise PydanticCustomError(exc.code, str(exc)) from None

    return run


Phone = Annotated[str, AfterValidator(_normalizer(normalize.normalize_phone))]
State = Annotated[str, AfterValidator(_normalizer(normalize.normalize_state))]
PostalCode = Annotated[str, AfterValidator(_normalizer(normalize.normalize_postal_code))]
BirthDate = Annotated[str, AfterValidator(_normalizer(normalize.normalize_birth_date))]
Email = Annotated[str, AfterValidator(_normalizer(normalize.normalize_email))]
Name = Annotated[str, AfterValidator(_normalizer(normalize.normalize_name))]
#: Free text, trimmed before its length is checked (so blank text is too short).
OptionalText = Annotated[str, StringConstraints(strip_whitespace=True)]


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=4096)


class FormRef(_Contract):
    """Which intake form (profile) the answers belong to."""

    id: str = Field(pattern=r"^[A-Za-z0-9\-\.]{1,64}$", examples=["glp1-weight-management"])
    version: str = Field(min_length=1, max_length=32, examples=["1"])


class Address(_Contract):
    """A US postal address; ``state`` accepts names or abbreviations in any case."""

    line1: OptionalText = Field(min_length=1, max_length=200)
    line2: OptionalText | None = Field(default=None, max_length=200)
    city: OptionalText = Field(min_length=1, max_length=100)
    state: State
    postal_code: PostalCode


class IntakePatient(_Contract):
    """The patient's demographics as the intake app collected them."""

    external_id: str | None = Field(default=None, pattern=ID_PATTERN)
    first_name: Name
    last_name: Name
    birth_date: BirthDate = Field(description="ISO 8601 or US MM/DD/YYYY.")
    sex_at_birth: Literal["female", "male", "other", "unknown"] = Field(
        description="Sex assigned at birth as the patient reported it."
    )
    email: Email
    phone: Phone = Field(description="Any common format; US numbers need no country code.")
    address: Address


class Consent(_Contract):
    """A consent the patient accepted (terms, telehealth, privacy notice...)."""

    type: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=32)
    accepted_at: AwareDatetime


class Attribution(_Contract):
    """Marketing attribution. Stored with the message; not sent to EHRs."""

    utm_source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None
    gclid: str | None = None
    fbclid: str | None = None


class IntakeSubmission(_Contract):
    """An intake submission: demographics, answers and consents for one form version."""

    submission_id: str = Field(
        pattern=ID_PATTERN, description="Unique per submission; the idempotency key."
    )
    form: FormRef
    submitted_at: AwareDatetime = Field(description="ISO 8601 with offset.")
    patient: IntakePatient
    answers: dict[str, Any] = Field(description="Question key -> answer, per the form's profile.")
    consents: list[Consent] = Field(default_factory=list)
    attribution: Attribution | None = None


# --------------------------------------------------------------------------- parsing


def pydantic_problems(exc: ValidationError, prefix: str = "") -> list[Problem]:
    """Problems from a pydantic error, without the input values."""
    problems = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        loc = ""
        for part in err["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            else:
                loc += f".{part}" if loc else str(part)
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(Problem(loc, err["type"], msg))
    return problems


def parse_intake_submission(
    data: Any, find_profile: Callable[[str, str], IntakeProfile | None]
) -> tuple[IntakeSubmission, IntakeProfile, list[dict[str, Any]]]:
    """Validate and normalize a submission against the contract and its form's profile.

    Args:
        data: the decoded JSON body.
        find_profile: ``(form_id, version) -> IntakeProfile | None``.

    Returns:
        ``(submission, profile, items)``: the normalized submission, its profile and the
        QuestionnaireResponse items built from the answers.

    Raises:
        MappingErrors: every problem at once (contract, normalization, unknown form or
        version, unknown question keys, missing required answers, bad answer values).
    """
    problems = ProblemCollector()
    submission: IntakeSubmission | None = None
    try:
        submission = IntakeSubmission.model_validate(data)
    except ValidationError as exc:
        problems.problems.extend(pydantic_problems(exc))

    # Check the answers even when other parts failed, so every problem is reported at once.
    form = data.get("form") if isinstance(data, dict) else None
    answers = data.get("answers") if isinstance(data, dict) else None
    profile: IntakeProfile | None = None
    items: list[dict[str, Any]] = []
    if (
        isinstance(form, dict)
        and isinstance(form.get("id"), str)
        and isinstance(form.get("version"), str)
    ):
        profile = find_profile(form["id"], form["version"])
        if profile is None:
            problems.add("form", "unknown_form", "no intake profile for this form id and version")
        elif profile.status == "retired":
            problems.add("form.version", "retired_form", "this form version is retired")
        elif isinstance(answers, dict):
            items = answers_to_items(answers, profile, problems)
            consents = data.get("consents") if isinstance(data, dict) else None
            accepted = (
                {c.get("type") for c in consents or [] if isinstance(c, dict)}
                if isinstance(consents, list)
                else set()
            )
            for required in profile.required_consents:
                if required not in accepted:
                    problems.add(
                        "consents",
                        "missing_consent",
                        f"consent {required!r} is required by this form",
                    )
    problems.raise_if_any()
    assert submission is not None and profile is not None  # guaranteed when no problems
    return submission, profile, items


# --------------------------------------------------------------------------- answers

_TRUE = frozenset({"true", "yes", "y", "1"})
_FALSE = frozenset({"false", "no", "n", "0"})


def _answer_value(item: IntakeItem, value: Any) -> dict[str, Any]:
    """One answer value -> a QuestionnaireResponse ``answer`` element.

    Raises:
        MappingError: with a code naming the type expected.
    """
    t = item.type
    if t in ("string", "text"):
        if not isinstance(value, str) or not value.strip():
            raise MappingError("invalid_answer", f"expected non-empty text for a {t} question")
        text = value.strip()
        if CONTROL_CHARACTERS.search(text):
            raise MappingError("invalid_character", "contains a control character")
        if item.max_length is not None and len(text) > item.max_length:
            raise MappingError("answer_too_long", f"at most {item.max_length} characters")
        return {"valueString": text}
    if t == "boolean":
        if isinstance(value, bool):
            return {"valueBoolean": value}
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return {"valueBoolean": value.strip().lower() in _TRUE}
        raise MappingError("invalid_answer", "expected true/false or yes/no")
    if t == "integer":
        number = _number(value)
        if number is None or number != int(number):
            raise MappingError("invalid_answer", "expected a whole number")
        _check_range(item, number)
        return {"valueInteger": int(number)}
    if t == "decimal":
        number = _number(value)
        if number is None:
            raise MappingError("invalid_answer", "expected a number")
        _check_range(item, number)
        return {"valueDecimal": _json_number(number)}
    if t == "date":
        if not isinstance(value, str):
            raise MappingError("invalid_answer", "expected a date")
        return {"valueDate": normalize.normalize_date(value)}
    if t == "quantity":
        assert item.unit is not None
        number = _number(value)
        if number is None:
            raise MappingError("invalid_answer", f"expected a number in {item.unit.display}")
        _check_range(item, number)
        return {
            "valueQuantity": {
                "value": _json_number(number),
                "unit": item.unit.display,
                "system": UCUM,
                "code": item.unit.code,
            }
        }
    if t in ("choice", "multi_choice"):
        return {"valueCoding": _option(item, value)}
    raise MappingError("unsupported_type", f"item type {t} is not supported")


def _option(item: IntakeItem, value: Any) -> dict[str, str]:
    if isinstance(value, str):
        wanted = value.strip().casefold()
        for option in item.options:
            if wanted in (option.code.casefold(), option.display.casefold()) or wanted in (
                a.casefold() for a in option.aliases
            ):
                return option.to_coding()
    raise MappingError("invalid_choice", "not one of the answer options of this question")


def _number(value: Any) -> Decimal | None:
    """A JSON number or numeric string as a Decimal; None for anything else, including
    the NaN and Infinity that ``json.loads`` lets through (they are not JSON numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            return None
    return None


def _json_number(number: Decimal) -> int | float:
    return int(number) if number == number.to_integral_value() else float(number)


def _check_range(item: IntakeItem, number: Decimal) -> None:
    if item.min_value is not None and number < Decimal(str(item.min_value)):
        raise MappingError("out_of_range", f"must be at least {item.min_value:g}")
    if item.max_value is not None and number > Decimal(str(item.max_value)):
        raise MappingError("out_of_range", f"must be at most {item.max_value:g}")


def answers_to_items(
    answers: dict[str, Any], profile: IntakeProfile, problems: ProblemCollector
) -> list[dict[str, Any]]:
    """Answers -> QuestionnaireResponse.item list, in the form's question order.

    A multi-choice answer is a list and becomes one item with several ``answer`` entries
    (SDC sdcqr-2: a repeating question is one item with several answers). Unanswered
    optional questions are left out; ``null`` counts as unanswered.

    Problems recorded at ``answers.<key>``: ``unknown_question``, ``missing_answer``,
    ``invalid_answer``, ``invalid_choice``, ``out_of_range``, ``invalid_date``,
    ``answer_too_long``, ``invalid_character`` (a control character in text).
    """
    by_key = profile.items_by_key
    for key in answers:
        if key not in by_key:
            problems.add(
                f"answers.{key}", "unknown_question", "this form has no question with this key"
            )
    items: list[dict[str, Any]] = []
    for item in profile.items:
        value = answers.get(item.key)
        if value is None or (isinstance(value, list | str) and not value):
            if item.required:
                problems.add(
                    f"answers.{item.key}", "missing_answer", "this question requires an answer"
                )
            continue
        if item.type == "multi_choice":
            values = value if isinstance(value, list) else [value]
            answer_list = []
            for i, v in enumerate(values):
                a = problems.run(f"answers.{item.key}[{i}]", _answer_value, item, v)
                if a is not None and a not in answer_list:
                    answer_list.append(a)
        else:
            a = problems.run(f"answers.{item.key}", _answer_value, item, value)
            answer_list = [a] if a is not None else []
        if answer_list:
            out: dict[str, Any] = {"linkId": item.linkid, "text": item.text, "answer": answer_list}
            items.append(out)
    return items


# --------------------------------------------------------------------------- FHIR


_BIRTHSEX = {"female": "F", "male": "M", "other": "UNK", "unknown": "UNK"}


def intake_to_patient(
    submission: IntakeSubmission, *, patient_id: str, systems: IdentifierSystems
) -> dict[str, Any]:
    """Intake demographics -> a US Core Patient (R4 JSON).

    Mapping: ``first_name``/``last_name`` -> ``name[0].given``/``family`` (use official);
    ``sex_at_birth`` -> ``gender`` (administrative gender, the closest R4 element) and the
    US Core birthsex extension (F | M | UNK); ``birth_date`` -> ``birthDate``; phone (E.164)
    and email -> ``telecom``; address -> ``address[0]`` with the USPS state code.
    Identifiers: the canonical ``<base>/patient-id|<patient_id>`` and, when given,
    ``<base>/external-patient-id|<external_id>``.
    """
    p = submission.patient
    identifiers = [{"system": systems.patient, "value": patient_id}]
    if p.external_id:
        identifiers.append({"system": systems.external_patient, "value": p.external_id})
    line = [p.address.line1] + ([p.address.line2] if p.address.line2 else [])
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "meta": {"profile": [US_CORE_PATIENT]},
        "extension": [{"url": US_CORE_BIRTHSEX, "valueCode": _BIRTHSEX[p.sex_at_birth]}],
        "identifier": identifiers,
        "name": [{"use": "official", "family": p.last_name, "given": [p.first_name]}],
        "telecom": [
            {"system": "phone", "value": p.phone},
            {"system": "email", "value": p.email},
        ],
        "gender": p.sex_at_birth,
        "birthDate": p.birth_date,
        "address": [
            {
                "use": "home",
                "type": "both",
                "line": line,
                "city": p.address.city,
                "state": p.address.state,
                "postalCode": p.address.postal_code,
                "country": "US",
            }
        ],
    }


def intake_to_questionnaire_response(
    submission: IntakeSubmission,
    profile: IntakeProfile,
    items: list[dict[str, Any]],
    *,
    response_id: str,
    patient_id: str,
    systems: IdentifierSystems,
    status: Literal["completed", "amended"] = "completed",
) -> dict[str, Any]:
    """Intake answers -> a US Core QuestionnaireResponse (R4 JSON).

    ``questionnaire`` is the versioned canonical ``url|version`` of the form's profile
    (a canonical, so transactions never rewrite it); ``identifier`` is
    ``<base>/intake-submission|<submission_id>`` (one Identifier: 0..1 in R4);
    ``authored`` is ``submitted_at`` with its offset; the patient is subject, author and
    source (they answered the form themselves). ``status`` is ``completed``, or
    ``amended`` when a submission is corrected.
    """
    patient_ref = {"reference": f"Patient/{patient_id}"}
    return {
        "resourceType": "QuestionnaireResponse",
        "id": response_id,
        "meta": {"profile": [US_CORE_QR]},
        "identifier": {"system": systems.intake_submission, "value": submission.submission_id},
        "questionnaire": profile.canonical,
        "status": status,
        "subject": patient_ref,
        "authored": normalize.to_fhir_instant(submission.submitted_at),
        "author": patient_ref,
        "source": patient_ref,
        "item": items,
    }


def submitted_at(submission: IntakeSubmission) -> datetime:
    """When the patient submitted the form (timezone-aware)."""
    return submission.submitted_at


__all__ = [
    "IntakeSubmission",
    "MappingErrors",
    "answers_to_items",
    "intake_to_patient",
    "intake_to_questionnaire_response",
    "parse_intake_submission",
]
