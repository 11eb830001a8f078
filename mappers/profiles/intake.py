"""Intake profiles (``profiles/intake/*.yaml``): one version of one intake form."""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

from pydantic import Field, model_validator

from mappers.profiles.common import FHIR_ID, KEY, SLUG, Coding, Strict

ItemType = Literal[
    "string", "text", "boolean", "integer", "decimal", "date", "choice", "multi_choice", "quantity"
]


class AnswerOption(Strict):
    """One allowed answer of a choice question, as a coding plus accepted spellings."""

    code: str
    system: str
    display: str
    aliases: list[str] = Field(default_factory=list)

    def to_coding(self) -> dict[str, str]:
        """The option as a FHIR Coding."""
        return {"system": self.system, "code": self.code, "display": self.display}


class UnitSpec(Strict):
    """The UCUM unit a quantity answer is given in (``[lb_av]``, ``[in_i]``, ``kg``)."""

    code: str
    display: str


class IntakeItem(Strict):
    """One question of an intake form.

    ``key`` is the field name in the submission's ``answers``; ``link_id`` the
    Questionnaire item linkId (defaults to ``key``).
    """

    key: Annotated[str, Field(pattern=KEY)]
    link_id: str | None = None
    text: str
    type: ItemType
    required: bool = False
    options: list[AnswerOption] = Field(default_factory=list)
    unit: UnitSpec | None = None
    codes: list[Coding] = Field(default_factory=list)
    min_value: float | None = None
    max_value: float | None = None
    max_length: int | None = None

    @property
    def linkid(self) -> str:
        """The Questionnaire linkId of this item."""
        return self.link_id or self.key

    @model_validator(mode="after")
    def _check_shape(self) -> IntakeItem:
        if self.type in ("choice", "multi_choice") and not self.options:
            raise ValueError(f"item {self.key!r}: a {self.type} question needs options")
        if self.type not in ("choice", "multi_choice") and self.options:
            raise ValueError(f"item {self.key!r}: only choice questions take options")
        if self.type == "quantity" and self.unit is None:
            raise ValueError(f"item {self.key!r}: a quantity question needs a unit")
        return self


class IntakeProfile(Strict):
    """One version of one intake form (``form.id`` + ``form.version`` of a submission)."""

    kind: Literal["intake"] = "intake"
    id: Annotated[str, Field(pattern=FHIR_ID)]
    version: str
    title: str
    status: Literal["draft", "active", "retired"] = "active"
    program: Annotated[str, Field(pattern=SLUG)]
    url: str = Field(description="Questionnaire canonical URL (without the version).")
    required_consents: list[str] = Field(default_factory=list)
    items: list[IntakeItem]

    @model_validator(mode="after")
    def _unique(self) -> IntakeProfile:
        seen_keys: set[str] = set()
        seen_links: set[str] = set()
        for item in self.items:
            if item.key in seen_keys:
                raise ValueError(f"duplicate item key {item.key!r}")
            if item.linkid in seen_links:
                raise ValueError(f"duplicate linkId {item.linkid!r}")
            seen_keys.add(item.key)
            seen_links.add(item.linkid)
        return self

    @property
    def canonical(self) -> str:
        """``url|version``: the versioned Questionnaire canonical for QR.questionnaire."""
        return f"{self.url}|{self.version}"

    @cached_property
    def items_by_key(self) -> dict[str, IntakeItem]:
        """Items by their answer key."""
        return {i.key: i for i in self.items}
