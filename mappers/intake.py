"""Intake submissions -> FHIR Patient and QuestionnaireResponse.

The submission contract (``POST /v1/intake-submissions``) is :class:`IntakeSubmission`.
:func:`parse_intake_submission` validates and normalizes it against the form's profile,
collecting every problem (structure, phone, state, dates, answers, conditional
requirements, consents) into one :class:`~mappers.errors.MappingErrors`; the mappers below
then build R4 JSON. Derived resources (Observations, Flags, Consents) are built by
:mod:`mappers.derived` from the same :class:`ParsedIntake`.

Answer normalization (per item type, https://hl7.org/fhir/R4/valueset-item-type.html):

=============  ==========================================================================
type           accepted answers -> QuestionnaireResponse ``answer.value[x]``
=============  ==========================================================================
string, text   non-empty text (trimmed; ``max_length``) -> ``valueString``
boolean        JSON true/false or the profile's spellings (``Y``, ``yes``...) -> ``valueBoolean``
integer        whole number (JSON or text; ``min_value``/``max_value``) -> ``valueInteger``
decimal        number -> ``valueDecimal``
date           a date with one reading, or in the form's ``date_order`` (US month first by
               default) -> ``valueDate`` (``YYYY-MM-DD``); a time of day is dropped (a note)
dateTime       ISO 8601 with offset -> ``valueDateTime``
choice         option code, display or alias (any case), a synonym from the item's
               concept map, or ``{"system", "code"}`` -> ``valueCoding``; ``repeats``: a list
open_choice    as choice; other text -> ``valueString``
quantity       a number in ``unit`` or ``{"value", "unit"}`` in one of ``units``
               (UCUM code or display), converted to ``convert_to`` -> ``valueQuantity``
group          children's answers (a list of objects when ``repeats``) -> nested ``item``
=============  ==========================================================================

An "unknown" or "prefer not to say" spelling (``answer_values``) of an optional question
becomes an item with the data-absent-reason extension (``asked-unknown`` /
``asked-declined``, https://hl7.org/fhir/R4/extension-data-absent-reason.html) and no
answer; of a required question, an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from mappers import normalize, ucum
from mappers.conceptmap import CompiledConceptMap
from mappers.errors import MappingError, MappingErrors, Problem, ProblemCollector
from mappers.identifiers import IdentifierSystems
from mappers.patient import phone_contact_point
from mappers.profiles import Condition, IntakeItem, IntakeProfile
from mappers.profiles.intake import ALL_PATIENT_FIELDS, fold
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


def refuse_numeric_zip(value: Any) -> Any:
    """Refuse a ZIP code sent as a JSON number with a message that says why: ``02134``
    arrives as ``2134``, and which digits were lost cannot be known. Anything else is
    returned unchanged (a pydantic ``BeforeValidator``).

    Raises:
        PydanticCustomError: ``postal_code_not_text`` for an int or float.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise PydanticCustomError(
            "postal_code_not_text",
            'Expected the ZIP code as a JSON string ("02134"); a JSON number loses leading zeros.',
        )
    return value


Phone = Annotated[str, AfterValidator(_normalizer(normalize.normalize_phone))]
State = Annotated[str, AfterValidator(_normalizer(normalize.normalize_state))]
PostalCode = Annotated[
    str,
    BeforeValidator(refuse_numeric_zip),
    AfterValidator(_normalizer(normalize.normalize_postal_code)),
]
#: The note (warning) of a date-time accepted as a date: its time of day was dropped.
TIME_DROPPED = (
    "time_dropped",
    "A time of day was given with the date: the date is kept as written and the time is "
    "dropped, as a FHIR date has no time.",
)


def _birth_date(value: str, info: ValidationInfo) -> str:
    """``patient.birth_date`` -> ``YYYY-MM-DD`` with the form's ``date_order`` (validation
    context key ``date_order``); a dropped time of day is appended to the context's
    ``notes`` list as a :class:`~mappers.errors.Problem` at ``patient.birth_date``."""
    context = info.context if isinstance(info.context, dict) else {}
    try:
        parsed = normalize.parse_birth_date(value, date_order=context.get("date_order"))
    except MappingError as exc:
        raise PydanticCustomError(exc.code, str(exc)) from None
    notes = context.get("notes")
    if parsed.time_dropped and isinstance(notes, list):
        notes.append(Problem("patient.birth_date", *TIME_DROPPED))
    return parsed.value.isoformat()


BirthDate = Annotated[str, AfterValidator(_birth_date)]
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
    """The patient's demographics as the intake app collected them.

    Which fields are required is the form profile's choice (``patient.required``, all by
    default); an empty string or an "unknown" / "prefer not to say" spelling of an
    optional field becomes a data-absent-reason (see :func:`intake_to_patient`).
    """

    external_id: str | None = Field(default=None, pattern=ID_PATTERN)
    first_name: Name | None = None
    last_name: Name | None = None
    birth_date: BirthDate | None = Field(
        default=None,
        description="ISO 8601 (YYYY-MM-DD), numeric day/month/year forms with one reading or "
        "in the form's date_order (US MM/DD/YYYY by default), or an English month name; a "
        "time of day is dropped (with a warning).",
    )
    sex_at_birth: Literal["female", "male", "other", "unknown"] | None = Field(
        default=None, description="Sex assigned at birth as the patient reported it."
    )
    email: Email | None = None
    phone: Phone | None = Field(
        default=None,
        description="Any format libphonenumber reads (an extension, a tel: URI, vanity "
        "letters); US numbers need no country code.",
    )
    address: Address | None = None


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
    answers: dict[str, Any] = Field(
        description="Question key -> answer, per the form's profile (a repeating group: a "
        "list of objects keyed by its questions' keys)."
    )
    consents: list[Consent] = Field(default_factory=list)
    attribution: Attribution | None = None


# --------------------------------------------------------------------------- parsing

DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


def data_absent(reason: str) -> dict[str, str]:
    """The data-absent-reason extension (``asked-unknown``, ``asked-declined``, ``unknown``...)."""
    return {"url": DATA_ABSENT_REASON, "valueCode": reason}


@dataclass
class Answer:
    """One question's normalized answer(s).

    ``values``: ``(QR answer element, normalized value)`` pairs, one per answer (several
    for a multi-select). The normalized value is a ``bool`` (boolean), ``int``/``Decimal``
    (integer, decimal), ``str`` (text, date, dateTime, an open-choice's free text), a
    Coding dict (choice), or ``(Decimal, ucum_code)`` (quantity, in the unit stored in the
    QuestionnaireResponse).
    ``absent``: a data-absent-reason code when the patient said "unknown"/"declined".
    """

    values: list[Any] = field(default_factory=list)
    absent: str | None = None


@dataclass
class ParsedIntake:
    """A validated, normalized submission and what the mappers need from it.

    Attributes:
        submission: the normalized contract object.
        profile: the form version's profile.
        items: the QuestionnaireResponse ``item`` list.
        answers: normalized answers by question key (top level and non-repeating groups).
        patient_absent: ``patient`` field -> data-absent-reason code, for optional fields
            the patient left empty or answered "unknown" / "prefer not to say".
        notes: warnings about values accepted with a change (``time_dropped``: a date-time
            given for a date), located like problems; the gateway answers them and names
            them in the Provenance.
    """

    submission: IntakeSubmission
    profile: IntakeProfile
    items: list[dict[str, Any]]
    answers: dict[str, Answer]
    patient_absent: dict[str, str] = field(default_factory=dict)
    notes: list[Problem] = field(default_factory=list)


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


_fold = fold


@lru_cache(maxsize=256)
def _spellings(words: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_fold(w) for w in words)


def _absent_reason(value: Any, profile: IntakeProfile) -> str | None:
    """``asked-unknown`` / ``asked-declined`` for the profile's spellings, else None."""
    if not isinstance(value, str):
        return None
    return profile.answer_values.absent_reasons.get(_fold(value))


def parse_intake_submission(
    data: Any,
    find_profile: Callable[[str, str], IntakeProfile | None],
    concept_maps: dict[str, CompiledConceptMap] | None = None,
) -> ParsedIntake:
    """Validate and normalize a submission against the contract and its form's profile.

    Args:
        data: the decoded JSON body.
        find_profile: ``(form_id, version) -> IntakeProfile | None``.
        concept_maps: the profile set's concept maps (answer synonyms), by name.

    Returns:
        The :class:`ParsedIntake`.

    Raises:
        MappingErrors: every problem at once (contract, normalization, unknown or retired
        form version, unknown question keys, missing or disabled answers, bad answer values,
        missing consents, required patient fields the form lacks).
    """
    problems = ProblemCollector()
    form = data.get("form") if isinstance(data, dict) else None
    profile: IntakeProfile | None = None
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

    patient_absent: dict[str, str] = {}
    body = data
    if profile is not None and isinstance(data, dict) and isinstance(data.get("patient"), dict):
        body = dict(data)
        patient = dict(data["patient"])
        for name in ALL_PATIENT_FIELDS:
            if name not in patient:
                continue
            value = patient[name]
            if value is None or (isinstance(value, str) and not value.strip()):
                reason: str | None = "unknown"
            else:
                reason = _absent_reason(value, profile)
            if reason is not None:
                del patient[name]
                patient_absent[name] = reason
        body["patient"] = patient

    submission: IntakeSubmission | None = None
    context: dict[str, Any] = {
        "date_order": profile.date_order if profile is not None else None,
        "notes": problems.notes,
    }
    try:
        submission = IntakeSubmission.model_validate(body, context=context)
    except ValidationError as exc:
        problems.problems.extend(pydantic_problems(exc))

    items: list[dict[str, Any]] = []
    answers_out: dict[str, Answer] = {}
    if profile is not None and profile.status != "retired":
        if submission is not None:
            for name in profile.patient.required:
                if getattr(submission.patient, name) is None:
                    if name in patient_absent and patient_absent[name] != "unknown":
                        problems.add(
                            f"patient.{name}",
                            "unknown_not_allowed",
                            "this form requires this field; unknown or declined is not accepted",
                        )
                    else:
                        problems.add(
                            f"patient.{name}", "missing_field", "this form requires this field"
                        )
                    patient_absent.pop(name, None)
        answers = data.get("answers") if isinstance(data, dict) else None
        if isinstance(answers, dict):
            items, answers_out = answers_to_items(answers, profile, problems, concept_maps or {})
        consents = data.get("consents") if isinstance(data, dict) else None
        accepted = (
            # a type that is not a string is a contract problem already (and unhashable)
            {c["type"] for c in consents if isinstance(c, dict) and isinstance(c.get("type"), str)}
            if isinstance(consents, list)
            else set()
        )
        # consents that are not a list are a contract problem already: say it once.
        for required in (
            profile.required_consents if consents is None or isinstance(consents, list) else []
        ):
            if required not in accepted:
                problems.add(
                    "consents", "missing_consent", f"consent {required!r} is required by this form"
                )
    problems.raise_if_any()
    if submission is None or profile is None:  # unreachable: either would be a problem
        raise MappingErrors([Problem("", "invalid", "the submission could not be read")])
    return ParsedIntake(
        submission, profile, items, answers_out, patient_absent, notes=list(problems.notes)
    )


# --------------------------------------------------------------------------- answers


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


_INT32 = (-(2**31), 2**31 - 1)


def _option(
    item: IntakeItem, value: Any, concept_maps: dict[str, CompiledConceptMap]
) -> dict[str, str] | None:
    """The coding of the option ``value`` names, or None."""
    if isinstance(value, dict):
        for option in item.options:
            if value.get("system") == option.system and value.get("code") == option.code:
                return option.to_coding()
        return None
    if not isinstance(value, str):
        return None
    chosen = item.option_by_spelling.get(_fold(value))
    if chosen is not None:
        return chosen.to_coding()
    cmap = concept_maps.get(item.synonyms) if item.synonyms else None
    if cmap is not None:
        for target in cmap.lookup_text(value):
            for option in item.options:
                if (option.system, option.code) == (target.system, target.code):
                    return option.to_coding()
    return None


def _answer_value(
    item: IntakeItem,
    value: Any,
    profile: IntakeProfile,
    concept_maps: dict[str, CompiledConceptMap],
    notes: list[tuple[str, str]] | None = None,
) -> tuple[dict[str, Any], Any]:
    """One answer value -> ``(QR answer element, normalized value)``; a warning about the
    value (``(code, message)``: :data:`TIME_DROPPED`) is appended to ``notes``.

    Raises:
        MappingError: with a code naming what was expected (``invalid_answer``,
            ``invalid_choice``, ``out_of_range``, ``answer_too_long``, ``invalid_unit``,
            ``invalid_date``...).
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
        return {"valueString": text}, text
    if t == "boolean":
        trues = item.true_values or profile.answer_values.true_values
        falses = item.false_values or profile.answer_values.false_values
        if isinstance(value, bool):
            return {"valueBoolean": value}, value
        if isinstance(value, str | int):
            folded = _fold(str(value))
            if folded in _spellings(tuple(trues)):
                return {"valueBoolean": True}, True
            if folded in _spellings(tuple(falses)):
                return {"valueBoolean": False}, False
        raise MappingError("invalid_answer", "expected true/false or one of its spellings")
    if t == "integer":
        number = _number(value)
        if number is None or number != int(number):
            raise MappingError("invalid_answer", "expected a whole number")
        _check_range(item, number)
        if not _INT32[0] <= number <= _INT32[1]:
            raise MappingError("out_of_range", "too large for a FHIR integer")
        return {"valueInteger": int(number)}, int(number)
    if t == "decimal":
        number = _number(value)
        if number is None:
            raise MappingError("invalid_answer", "expected a number")
        _check_range(item, number)
        return {"valueDecimal": _json_number(number)}, number
    if t == "date":
        if not isinstance(value, str):
            raise MappingError("invalid_answer", "expected a date")
        parsed = normalize.parse_date(value, date_order=profile.date_order)
        if parsed.time_dropped and notes is not None:
            notes.append(TIME_DROPPED)
        date = parsed.value.isoformat()
        return {"valueDate": date}, date
    if t == "dateTime":
        if not isinstance(value, str):
            raise MappingError("invalid_answer", "expected a date and time with a UTC offset")
        text = normalize.to_fhir_instant(normalize.parse_datetime(value))
        return {"valueDateTime": text}, text
    if t == "quantity":
        return _quantity(item, value)
    if item.is_choice:
        coding = _option(item, value, concept_maps)
        if coding is not None:
            return {"valueCoding": coding}, coding
        if t == "open_choice" and isinstance(value, str) and value.strip():
            text = value.strip()
            if CONTROL_CHARACTERS.search(text):
                raise MappingError("invalid_character", "contains a control character")
            if item.max_length is not None and len(text) > item.max_length:
                raise MappingError("answer_too_long", f"at most {item.max_length} characters")
            return {"valueString": text}, text
        raise MappingError("invalid_choice", "not one of the answer options of this question")
    raise MappingError("unsupported_type", f"item type {t} takes no direct answer")


def _unit_code(item: IntakeItem, given: Any) -> str:
    """The UCUM code of a unit the app named by code or display."""
    allowed = [u for u in [item.unit, *item.units] if u]
    if isinstance(given, str):
        for code in allowed:
            unit = ucum.get_unit(code)
            if given == code or (unit is not None and _fold(given) == _fold(unit.display)):
                return code
    raise MappingError(
        "invalid_unit", f"unit must be one of {', '.join(_unit_display(u) for u in allowed)}"
    )


def _unit_display(code: str) -> str:
    unit = ucum.get_unit(code)
    return unit.display if unit else code


def _quantity(item: IntakeItem, value: Any) -> tuple[dict[str, Any], Any]:
    base_unit = item.unit or ""
    if isinstance(value, dict):
        unit = _unit_code(item, value.get("unit"))
        number = _number(value.get("value"))
    else:
        unit = base_unit
        number = _number(value)
    if number is None:
        raise MappingError("invalid_answer", f"expected a number in {_unit_display(base_unit)}")
    _check_range(item, ucum.convert(number, unit, base_unit, decimals=6))
    target = item.convert_to or unit
    stored = ucum.convert(number, unit, target) if target != unit else number
    return (
        {
            "valueQuantity": {
                "value": _json_number(stored),
                "unit": _unit_display(target),
                "system": UCUM,
                "code": target,
            }
        },
        (stored, target),
    )


def _is_empty(value: Any) -> bool:
    return value is None or (
        isinstance(value, list | str) and not (value.strip() if isinstance(value, str) else value)
    )


def _condition_true(cond: Condition, answer: Answer | None, item: IntakeItem | None) -> bool:
    """FHIR enableWhen semantics (https://hl7.org/fhir/R4/questionnaire-definitions.html#Questionnaire.item.enableWhen.operator)."""
    answered = answer is not None and bool(answer.values)
    if cond.operator == "exists":
        return answered == bool(cond.answer)
    if not answered or answer is None:
        return False
    wanted = cond.answer
    for _, value in answer.values:
        if isinstance(value, dict):  # coding
            got: Any = value.get("code")
        elif isinstance(value, tuple):  # quantity, compare in the item's unit
            got = (
                ucum.convert(value[0], value[1], item.unit, decimals=6)
                if item is not None and item.unit and value[1] != item.unit
                else value[0]
            )
        else:
            got = value
        if isinstance(got, Decimal | int) and not isinstance(got, bool):
            if isinstance(wanted, bool) or not isinstance(wanted, int | float):
                continue
            target: Any = Decimal(str(wanted))
            got = Decimal(got)
        else:
            target = wanted
        try:
            if (
                (cond.operator == "=" and got == target)
                or (cond.operator == "!=" and got != target)
                or (cond.operator == ">" and got > target)
                or (cond.operator == "<" and got < target)
                or (cond.operator == ">=" and got >= target)
                or (cond.operator == "<=" and got <= target)
            ):
                return True
        except TypeError:
            continue
    return False


def _enabled(item: IntakeItem, scope: dict[str, Answer], profile: IntakeProfile) -> bool:
    if not item.enable_when:
        return True
    results = [
        _condition_true(c, scope.get(c.question), profile.items_by_key.get(c.question))
        for c in item.enable_when
    ]
    return all(results) if item.enable_behavior == "all" else any(results)


def answers_to_items(
    answers: dict[str, Any],
    profile: IntakeProfile,
    problems: ProblemCollector,
    concept_maps: dict[str, CompiledConceptMap] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Answer]]:
    """Answers -> QuestionnaireResponse.item list (form order) and normalized answers.

    A multi-select (``repeats``) answer is a list and becomes one item with several
    ``answer`` entries; a list for any other question is refused
    (``single_answer_expected``); a repeating group is a list of objects and becomes several items
    with the group's linkId (SDC sdcqr-2). Unanswered optional questions are left out;
    ``null`` and ``""`` count as unanswered. A question whose ``enable_when`` is false
    must not be answered (SDC: answers to disabled items are not kept) and is not
    required.

    Problems recorded at ``answers.<key>`` (``answers.<group>[i].<key>`` in repeating
    groups): ``unknown_question``, ``answer_in_group``, ``missing_answer``,
    ``single_answer_expected``, ``answer_not_enabled``, ``unknown_not_allowed``,
    ``invalid_answer``,
    ``invalid_choice``, ``invalid_unit``, ``out_of_range``, ``answer_too_long``,
    ``invalid_date``, ``invalid_datetime``, ``missing_timezone``.
    """
    maps = concept_maps or {}
    top_keys = _flat_keys(profile.items)
    for key in answers:
        if key not in top_keys:
            parent = profile.parent_of.get(key)
            if parent is not None:
                problems.add(
                    f"answers.{key}",
                    "answer_in_group",
                    f"answer this question inside the repeating group {parent.key!r}",
                )
            else:
                problems.add(
                    f"answers.{key}", "unknown_question", "this form has no question with this key"
                )
    scope = _normalize_scope(profile.items, answers, "answers", profile, problems, maps)
    items = _build_items(profile.items, answers, scope, "answers", profile, problems, maps)
    return items, scope


def _flat_keys(items: list[IntakeItem]) -> set[str]:
    """Keys answered at this level: items, and children of non-repeating groups."""
    out: set[str] = set()
    for item in items:
        out.add(item.key)
        if item.type == "group" and not item.repeats:
            out.discard(item.key)
            out |= _flat_keys(item.items)
    return out


def _normalize_scope(
    items: list[IntakeItem],
    raw: dict[str, Any],
    loc: str,
    profile: IntakeProfile,
    problems: ProblemCollector,
    maps: dict[str, CompiledConceptMap],
) -> dict[str, Answer]:
    """Pass 1: normalize every answer at this level (enable_when may look ahead)."""
    scope: dict[str, Answer] = {}
    for item in items:
        if item.type == "group":
            if not item.repeats:
                scope.update(_normalize_scope(item.items, raw, loc, profile, problems, maps))
            continue
        value = raw.get(item.key)
        if _is_empty(value):
            continue
        reason = _absent_reason(value, profile)
        if reason is not None:
            scope[item.key] = Answer(absent=reason)
            continue
        here = f"{loc}.{item.key}"
        answer = Answer()
        if item.repeats:
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                notes: list[tuple[str, str]] = []
                got = problems.run(f"{here}[{i}]", _answer_value, item, v, profile, maps, notes)
                for code, message in notes:
                    problems.note(f"{here}[{i}]", code, message)
                if got is not None and got not in [(a, n) for a, n in answer.values]:
                    answer.values.append(got)
        elif isinstance(value, list):
            # A list (as checkbox widgets send) for a one-answer question: say that, not
            # "not one of the options" about a list whose element may well be one.
            problems.add(
                here, "single_answer_expected", "this question takes one answer, not a list"
            )
            continue
        else:
            notes = []
            got = problems.run(here, _answer_value, item, value, profile, maps, notes)
            for code, message in notes:
                problems.note(here, code, message)
            if got is not None:
                answer.values.append(got)
        if answer.values:
            scope[item.key] = answer
    # keep only normalized values; QR answers are rebuilt from them in pass 2
    return scope


def _build_items(
    items: list[IntakeItem],
    raw: dict[str, Any],
    scope: dict[str, Answer],
    loc: str,
    profile: IntakeProfile,
    problems: ProblemCollector,
    maps: dict[str, CompiledConceptMap],
) -> list[dict[str, Any]]:
    """Pass 2: enable_when, requirements and the QR items."""
    out: list[dict[str, Any]] = []
    for item in items:
        here = f"{loc}.{item.key}"
        enabled = _enabled(item, scope, profile)
        if item.type == "group":
            if item.repeats:
                out.extend(
                    _repeating_group(item, raw, scope, here, enabled, profile, problems, maps)
                )
                continue
            children = (
                _build_items(item.items, raw, scope, loc, profile, problems, maps)
                if enabled
                else _reject_disabled(item.items, raw, loc, problems)
            )
            if children:
                out.append({"linkId": item.linkid, "text": item.text, "item": children})
            continue
        answer = scope.get(item.key)
        value = raw.get(item.key)
        if not enabled:
            if not _is_empty(value):
                problems.add(
                    here,
                    "answer_not_enabled",
                    "this question does not apply given the other answers",
                )
            continue
        if answer is None:
            if item.required and not _is_empty(value):
                continue  # the value itself was invalid: already a problem
            if item.required:
                problems.add(here, "missing_answer", "this question requires an answer")
            continue
        if answer.absent is not None:
            if item.required:
                problems.add(
                    here,
                    "unknown_not_allowed",
                    "this question requires an answer; unknown or declined is not accepted",
                )
                continue
            out.append(
                {
                    "linkId": item.linkid,
                    "text": item.text,
                    "extension": [data_absent(answer.absent)],
                }
            )
            continue
        out.append(
            {"linkId": item.linkid, "text": item.text, "answer": [a for a, _ in answer.values]}
        )
    return out


def _reject_disabled(
    items: list[IntakeItem], raw: dict[str, Any], loc: str, problems: ProblemCollector
) -> list[dict[str, Any]]:
    for key in _flat_keys(items):
        if not _is_empty(raw.get(key)):
            problems.add(
                f"{loc}.{key}",
                "answer_not_enabled",
                "this question does not apply given the other answers",
            )
    return []


def _repeating_group(
    group: IntakeItem,
    raw: dict[str, Any],
    scope: dict[str, Answer],
    here: str,
    enabled: bool,
    profile: IntakeProfile,
    problems: ProblemCollector,
    maps: dict[str, CompiledConceptMap],
) -> list[dict[str, Any]]:
    value = raw.get(group.key)
    if _is_empty(value):
        if group.required and enabled:
            problems.add(here, "missing_answer", "this group requires at least one entry")
        return []
    if not enabled:
        problems.add(
            here, "answer_not_enabled", "this group does not apply given the other answers"
        )
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        problems.add(here, "invalid_answer", "expected a list of objects, one per entry")
        return []
    keys = _flat_keys(group.items)
    out = []
    for i, instance in enumerate(value):
        loc = f"{here}[{i}]"
        for key in instance:
            if key not in keys:
                problems.add(
                    f"{loc}.{key}", "unknown_question", "this group has no question with this key"
                )
        inner = {**scope, **_normalize_scope(group.items, instance, loc, profile, problems, maps)}
        children = _build_items(group.items, instance, inner, loc, profile, problems, maps)
        if children:
            out.append({"linkId": group.linkid, "text": group.text, "item": children})
    return out


# --------------------------------------------------------------------------- FHIR


_BIRTHSEX = {"female": "F", "male": "M", "other": "UNK", "unknown": "UNK"}


def intake_to_patient(
    submission: IntakeSubmission,
    *,
    patient_id: str,
    systems: IdentifierSystems,
    absent: dict[str, str] | None = None,
    phone_use: str | None = "mobile",
) -> dict[str, Any]:
    """Intake demographics -> a US Core Patient (R4 JSON).

    Mapping: ``first_name``/``last_name`` -> ``name[0].given``/``family`` (use official);
    ``sex_at_birth`` -> ``gender`` (administrative gender, the closest R4 element) and the
    US Core birthsex extension (F | M | UNK); ``birth_date`` -> ``birthDate``; phone (E.164)
    and email -> ``telecom``; address -> ``address[0]`` with the USPS state code.
    Identifiers: the canonical ``<base>/patient-id|<patient_id>`` and, when given,
    ``<base>/external-patient-id|<external_id>``.

    Absent optional fields (``absent``: field -> data-absent-reason code) follow FHIR:
    no name at all -> a name carrying the data-absent-reason extension (US Core
    us-core-6); no birth date -> ``_birthDate`` with the extension; no sex -> ``gender``
    ``unknown`` and birthsex ``UNK``; no phone, email or address -> left out (0..*).
    """
    p = submission.patient
    absent = absent or {}
    identifiers = [{"system": systems.patient, "value": patient_id}]
    if p.external_id:
        identifiers.append({"system": systems.external_patient, "value": p.external_id})
    sex = p.sex_at_birth or "unknown"
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient_id,
        "meta": {"profile": [US_CORE_PATIENT]},
        "extension": [{"url": US_CORE_BIRTHSEX, "valueCode": _BIRTHSEX[sex]}],
        "identifier": identifiers,
    }
    name: dict[str, Any] = {"use": "official"}
    if p.last_name:
        name["family"] = p.last_name
    if p.first_name:
        name["given"] = [p.first_name]
    if not (p.first_name or p.last_name):
        reason = absent.get("last_name") or absent.get("first_name") or "unknown"
        name = {"extension": [data_absent(reason)]}
    patient["name"] = [name]
    telecom: list[dict[str, Any]] = []
    if p.phone:
        telecom.append(phone_contact_point(p.phone, use=phone_use))
    if p.email:
        telecom.append({"system": "email", "value": p.email})
    if telecom:
        patient["telecom"] = telecom
    patient["gender"] = sex
    if p.birth_date:
        patient["birthDate"] = p.birth_date
    elif "birth_date" in absent:
        patient["_birthDate"] = {"extension": [data_absent(absent["birth_date"])]}
    if p.address is not None:
        line = [p.address.line1] + ([p.address.line2] if p.address.line2 else [])
        patient["address"] = [
            {
                "use": "home",
                "type": "both",
                "line": line,
                "city": p.address.city,
                "state": p.address.state,
                "postalCode": p.address.postal_code,
                "country": "US",
            }
        ]
    return patient


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
    (a canonical, so transactions never rewrite it; the Questionnaire itself is served at
    ``GET /fhir/Questionnaire?url=&version=``); ``identifier`` is
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
    "Answer",
    "IntakeSubmission",
    "MappingErrors",
    "ParsedIntake",
    "answers_to_items",
    "intake_to_patient",
    "intake_to_questionnaire_response",
    "parse_intake_submission",
]
