"""Intake profiles (``profiles/intake/*.yaml``): one version of one intake form.

A profile says which questions the form has (answer keys, Questionnaire linkIds, item
types, answer options with codes, units), how answers are normalized (boolean spellings,
synonyms, "unknown" spellings), when a question is required, which Patient elements the
intake owns, and which resources are derived from a submission (vital-sign Observations,
risk Flags from FHIRPath, Consents). Item types follow R4 ``Questionnaire.item.type``
(https://hl7.org/fhir/R4/valueset-item-type.html); ``open_choice`` is ``open-choice``.

Structural rules are checked here (pydantic); cross-references (linkIds named by
FHIRPath, UCUM conversions, concept maps) by :mod:`mappers.profiles.lint`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from mappers.normalize import DateOrder
from mappers.profiles.common import FHIR_ID, KEY, SLUG, Coding, Strict

ItemType = Literal[
    "string",
    "text",
    "boolean",
    "integer",
    "decimal",
    "date",
    "dateTime",
    "choice",
    "open_choice",
    "quantity",
    "group",
]

#: Patient elements a source may own (``owns``) when sources disagree.
PatientElement = Literal[
    "name", "gender", "birthDate", "birthsex", "address", "telecom.phone", "telecom.email"
]

#: Submission ``patient`` fields an intake profile may require (all by default).
PatientField = Literal[
    "first_name", "last_name", "birth_date", "sex_at_birth", "email", "phone", "address"
]

ALL_PATIENT_FIELDS: tuple[PatientField, ...] = (
    "first_name",
    "last_name",
    "birth_date",
    "sex_at_birth",
    "email",
    "phone",
    "address",
)
ALL_PATIENT_ELEMENTS: tuple[PatientElement, ...] = (
    "name",
    "gender",
    "birthDate",
    "birthsex",
    "address",
    "telecom.phone",
    "telecom.email",
)

DEFAULT_TRUE = ["true", "yes", "y", "1"]
DEFAULT_FALSE = ["false", "no", "n", "0"]
DEFAULT_UNKNOWN = ["unknown", "don't know", "dont know", "not sure", "unsure"]
DEFAULT_DECLINED = ["prefer not to say", "prefer not to answer", "decline", "declined"]


def fold(text: str) -> str:
    """A spelling as answers are matched: whitespace runs collapsed, case folded."""
    return " ".join(text.split()).casefold()


class AnswerOption(Strict):
    """One allowed answer of a choice question: a coding plus accepted spellings.

    ``system`` and ``code`` are checked by the lint (``choice-without-code``) so the
    analyst gets one clear message instead of a schema error.
    """

    code: str | None = None
    system: str | None = None
    display: str
    aliases: list[str] = Field(default_factory=list)

    def to_coding(self) -> dict[str, str]:
        """The option as a FHIR Coding (lint guarantees system and code)."""
        return {"system": self.system or "", "code": self.code or "", "display": self.display}


class Condition(Strict):
    """``enableWhen`` (https://hl7.org/fhir/R4/questionnaire-definitions.html#Questionnaire.item.enableWhen):
    the item is enabled when the answer to ``question`` (an item key) compares to
    ``answer`` (a boolean, number, date text, or an option code) with ``operator``;
    ``exists`` takes ``answer: true`` (answered) or ``false`` (unanswered)."""

    question: str
    operator: Literal["exists", "=", "!=", ">", "<", ">=", "<="] = "="
    answer: bool | int | float | str


class IntakeItem(Strict):
    """One question (or group) of an intake form.

    ``key`` is the field name in the submission's ``answers`` (unique across the form,
    also inside groups); ``link_id`` the Questionnaire item linkId (defaults to ``key``).
    A non-repeating group's children are answered at the top level of ``answers``; a
    repeating group (``repeats: true``) is answered as a list of objects keyed by its
    children's keys and becomes several QuestionnaireResponse items with the same linkId
    (SDC sdcqr-2).
    """

    key: Annotated[str, Field(pattern=KEY)]
    link_id: str | None = None
    text: str
    type: ItemType
    required: bool = False
    repeats: bool = Field(
        default=False, description="choice/open_choice: multi-select; group: repeating group"
    )
    enable_when: list[Condition] = Field(default_factory=list)
    enable_behavior: Literal["all", "any"] = "all"
    options: list[AnswerOption] = Field(default_factory=list)
    synonyms: str | None = Field(
        default=None,
        description="Concept map (file stem in concept-maps/) from free text to option codes.",
    )
    true_values: list[str] | None = Field(
        default=None, description="Spellings of true for this item (default: the profile's)."
    )
    false_values: list[str] | None = Field(
        default=None, description="Spellings of false for this item (default: the profile's)."
    )
    unit: str | None = Field(default=None, description="UCUM code a bare number is in.")
    units: list[str] = Field(
        default_factory=list, description="Other UCUM units the app may send with the value."
    )
    convert_to: str | None = Field(
        default=None, description="UCUM unit the QuestionnaireResponse answer is stored in."
    )
    codes: list[Coding] = Field(default_factory=list)
    min_value: float | None = None
    max_value: float | None = None
    max_length: int | None = Field(default=None, gt=0)
    items: list[IntakeItem] = Field(default_factory=list)

    @property
    def linkid(self) -> str:
        """The Questionnaire linkId of this item."""
        return self.link_id or self.key

    @property
    def is_choice(self) -> bool:
        """A choice or open-choice question."""
        return self.type in ("choice", "open_choice")

    @cached_property
    def option_by_spelling(self) -> dict[str, AnswerOption]:
        """Folded spelling (code, display, alias) -> the first option, in option order,
        that has it: what a text answer selects (computed once per loaded profile)."""
        out: dict[str, AnswerOption] = {}
        for option in self.options:
            for spelling in (option.code or "", option.display, *option.aliases):
                out.setdefault(fold(spelling), option)
        return out

    @model_validator(mode="after")
    def _check_shape(self) -> IntakeItem:
        problems = []
        if self.type == "choice" and not self.options:
            problems.append("a choice question needs options")
        if not self.is_choice and (self.options or self.synonyms):
            problems.append("only choice questions take options and synonyms")
        if self.type == "quantity" and self.unit is None:
            problems.append("a quantity question needs a unit")
        if self.type != "quantity" and (self.unit or self.units or self.convert_to):
            problems.append("only quantity questions take unit, units and convert_to")
        if self.type == "group" and not self.items:
            problems.append("a group needs items")
        if self.type != "group" and self.items:
            problems.append("only groups take items")
        if self.repeats and not (self.is_choice or self.type == "group"):
            problems.append("repeats is for choice, open_choice and group items")
        if (self.true_values or self.false_values) and self.type != "boolean":
            problems.append("true_values and false_values are for boolean questions")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PatientRules(Strict):
    """Which ``patient`` fields the form requires and which Patient elements it owns."""

    required: list[PatientField] = Field(default_factory=lambda: list(ALL_PATIENT_FIELDS))
    owns: list[PatientElement] = Field(
        default_factory=lambda: list(ALL_PATIENT_ELEMENTS),
        description="Elements this source wins when another source disagrees.",
    )
    phone_use: Literal["home", "work", "mobile"] | None = "mobile"


class ObservationSpec(Strict):
    """A vital-sign Observation derived from the answers (R4 vital signs profile,
    https://hl7.org/fhir/R4/observation-vitalsigns.html): ``from`` one quantity item,
    or ``compute: bmi`` from ``weight`` and ``height`` items."""

    id: Annotated[str, Field(pattern=SLUG)]
    from_: str | None = Field(default=None, alias="from")
    compute: Literal["bmi"] | None = None
    weight: str | None = None
    height: str | None = None
    code: Coding
    unit: str = Field(description="UCUM unit of the value (converted from the answer's).")
    decimals: int = Field(default=2, ge=0, le=6)
    category: Literal["vital-signs", "survey", "exam", "laboratory", "social-history"] = (
        "vital-signs"
    )
    profile: str | None = None

    @model_validator(mode="after")
    def _source(self) -> ObservationSpec:
        if (self.from_ is None) == (self.compute is None):
            raise ValueError("give exactly one of from or compute")
        if self.compute == "bmi" and not (self.weight and self.height):
            raise ValueError("compute: bmi needs weight and height item keys")
        return self


class FlagSpec(Strict):
    """A Flag (https://hl7.org/fhir/R4/flag.html) raised when the FHIRPath ``when``
    (evaluated over the QuestionnaireResponse, http://hl7.org/fhirpath/N1/) is true."""

    id: Annotated[str, Field(pattern=SLUG)]
    when: str
    text: str
    code: Coding | None = None
    category: Literal[
        "diet",
        "drug",
        "lab",
        "admin",
        "contact",
        "clinical",
        "behavioral",
        "research",
        "advance-directive",
        "safety",
    ] = "clinical"
    priority: Literal["PN", "PL", "PM", "PH"] | None = Field(
        default="PH", description="flag-priority-code: none, low, medium, high"
    )
    scope: Literal["named_items", "response"] = Field(
        default="named_items",
        description="named_items: the rule sees a QuestionnaireResponse holding only the "
        "items whose linkIds it names (linkId = '...'), with their groups; response: the "
        "whole QuestionnaireResponse (slower: evaluated for every submission).",
    )


class ConsentSpec(Strict):
    """How one accepted consent type becomes a Consent (https://hl7.org/fhir/R4/consent.html)."""

    scope: Literal["adr", "research", "patient-privacy", "treatment"]
    category: Coding
    policy_uri: str
    title: str | None = None


class Derived(Strict):
    """Resources derived from a submission besides the QuestionnaireResponse."""

    observations: list[ObservationSpec] = Field(default_factory=list)
    flags: list[FlagSpec] = Field(default_factory=list)
    consents: dict[str, ConsentSpec] = Field(default_factory=dict)


class AnswerValues(Strict):
    """Spellings that answers are normalized from (matched case-insensitively).

    The keys are ``true_values``/``false_values``, not ``true``/``false``: YAML 1.1 reads a
    bare ``true:``, ``yes:`` or ``no:`` key as a boolean.
    """

    true_values: list[str] = Field(default_factory=lambda: list(DEFAULT_TRUE))
    false_values: list[str] = Field(default_factory=lambda: list(DEFAULT_FALSE))
    unknown: list[str] = Field(
        default_factory=lambda: list(DEFAULT_UNKNOWN),
        description="Become data-absent-reason asked-unknown (an error where required).",
    )
    declined: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DECLINED),
        description="Become data-absent-reason asked-declined (an error where required).",
    )

    @cached_property
    def absent_reasons(self) -> dict[str, str]:
        """Folded spelling -> ``asked-unknown`` or ``asked-declined`` (unknown first)."""
        out = {fold(w): "asked-unknown" for w in self.unknown}
        for w in self.declined:
            out.setdefault(fold(w), "asked-declined")
        return out


class IntakeProfile(Strict):
    """One version of one intake form (``form.id`` + ``form.version`` of a submission)."""

    kind: Literal["intake"] = "intake"
    id: Annotated[str, Field(pattern=FHIR_ID)]
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9.\-]{1,32}$")]
    title: str
    status: Literal["draft", "active", "retired"] = "active"
    program: Annotated[str, Field(pattern=SLUG)]
    url: str = Field(description="Questionnaire canonical URL (without the version).")
    publisher: str | None = None
    required_consents: list[str] = Field(default_factory=list)
    patient: PatientRules = Field(default_factory=PatientRules)
    answer_values: AnswerValues = Field(default_factory=AnswerValues)
    date_order: DateOrder | None = Field(
        default=None,
        description="How this form's app writes numeric dates whose numbers do not say the "
        "order (01/02/2003): MDY (month first), DMY (day first) or YMD. Unset: dates with / "
        "or - are read month first (US forms) and other forms with two readings, such as "
        "10.09.2003, are refused. A date with one possible reading (25/09/2003) is always "
        "accepted.",
    )
    items: list[IntakeItem]
    derived: Derived = Field(default_factory=Derived)

    @property
    def canonical(self) -> str:
        """``url|version``: the versioned Questionnaire canonical for QR.questionnaire."""
        return f"{self.url}|{self.version}"

    def walk(self) -> Iterator[tuple[tuple[Any, ...], IntakeItem]]:
        """Every item depth-first with its path in the profile (``("items", 3, "items", 0)``)."""

        def rec(
            items: list[IntakeItem], path: tuple[Any, ...]
        ) -> Iterator[tuple[tuple[Any, ...], IntakeItem]]:
            for i, item in enumerate(items):
                here = (*path, "items", i)
                yield here, item
                yield from rec(item.items, here)

        yield from rec(self.items, ())

    @cached_property
    def items_by_key(self) -> dict[str, IntakeItem]:
        """Every item (groups' children included) by its answer key."""
        return {item.key: item for _, item in self.walk()}

    @cached_property
    def parent_of(self) -> dict[str, IntakeItem | None]:
        """Each item key -> its enclosing group (None at the top level)."""
        out: dict[str, IntakeItem | None] = {}

        def rec(items: list[IntakeItem], parent: IntakeItem | None) -> None:
            for item in items:
                out[item.key] = parent
                rec(item.items, item)

        rec(self.items, None)
        return out
