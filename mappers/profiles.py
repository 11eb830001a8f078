"""Mapping profiles: the YAML data that clinical informatics teams own.

Profile kinds (each a pydantic model; unknown keys are errors so typos surface):

* :class:`IntakeProfile` (``profiles/intake/*.yaml``): one version of one intake form:
  its Questionnaire canonical URL, the questions (answer keys, linkIds, types, codes)
  and the required consents.
* :class:`CheckoutProfile` (``profiles/checkout/*.yaml``): plan id -> requested
  medication (RxNorm coding, dosage instruction, quantity, refills).
* :class:`EhrTargetProfile` (``profiles/ehr/*.yaml``): one EHR's FHIR base URL, OAuth
  client and which resource types it receives.
* :class:`WorkflowProfile` (``profiles/workflow.yaml``): case states, transitions and the
  ownership matrix (which sender may emit which event).

:func:`load_profiles` reads a profiles directory into a :class:`ProfileSet`, or raises
:class:`ProfileLoadError` naming the file and path of every problem, so the gateway never
starts half-configured.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mappers.errors import Problem

# --------------------------------------------------------------------------- shared

FHIR_ID = r"^[A-Za-z0-9\-\.]{1,64}$"
KEY = r"^[a-z][a-z0-9_]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Coding(_Strict):
    """A FHIR Coding (https://hl7.org/fhir/R4/datatypes.html#Coding)."""

    system: str
    code: str
    display: str | None = None

    def to_fhir(self) -> dict[str, str]:
        """The Coding as FHIR JSON."""
        out = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


class Quantity(_Strict):
    """A UCUM quantity (https://hl7.org/fhir/R4/datatypes.html#Quantity)."""

    value: float
    unit: str
    code: str
    system: str = "http://unitsofmeasure.org"

    def to_fhir(self) -> dict[str, Any]:
        """The Quantity as FHIR JSON (integral values as integers)."""
        value: float | int = int(self.value) if float(self.value).is_integer() else self.value
        return {"value": value, "unit": self.unit, "system": self.system, "code": self.code}


# --------------------------------------------------------------------------- intake

ItemType = Literal[
    "string", "text", "boolean", "integer", "decimal", "date", "choice", "multi_choice", "quantity"
]


class AnswerOption(_Strict):
    """One allowed answer of a choice question, as a coding plus accepted spellings."""

    code: str
    system: str
    display: str
    aliases: list[str] = Field(default_factory=list)

    def to_coding(self) -> dict[str, str]:
        """The option as a FHIR Coding."""
        return {"system": self.system, "code": self.code, "display": self.display}


class UnitSpec(_Strict):
    """The UCUM unit a quantity answer is given in (``[lb_av]``, ``[in_i]``, ``kg``)."""

    code: str
    display: str


class IntakeItem(_Strict):
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


class IntakeProfile(_Strict):
    """One version of one intake form (``form.id`` + ``form.version`` of a submission)."""

    kind: Literal["intake"] = "intake"
    id: Annotated[str, Field(pattern=FHIR_ID)]
    version: str
    title: str
    status: Literal["draft", "active", "retired"] = "active"
    program: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
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


# --------------------------------------------------------------------------- checkout


class DosageSpec(_Strict):
    """A dosage instruction (https://hl7.org/fhir/R4/dosage.html)."""

    text: str
    route: Coding | None = None
    dose: Quantity | None = None
    frequency: int | None = None
    period: float | None = None
    period_unit: Literal["s", "min", "h", "d", "wk", "mo", "a"] | None = None

    def to_fhir(self) -> dict[str, Any]:
        """The Dosage as FHIR JSON."""
        out: dict[str, Any] = {"text": self.text}
        if self.frequency and self.period and self.period_unit:
            period: float | int = int(self.period) if self.period.is_integer() else self.period
            out["timing"] = {
                "repeat": {
                    "frequency": self.frequency,
                    "period": period,
                    "periodUnit": self.period_unit,
                }
            }
        if self.route:
            out["route"] = {"coding": [self.route.to_fhir()], "text": self.route.display}
        if self.dose:
            out["doseAndRate"] = [{"doseQuantity": self.dose.to_fhir()}]
        return out


class Plan(_Strict):
    """One purchasable plan and the treatment it requests (awaiting provider review)."""

    program: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    medication: Coding
    medication_text: str | None = None
    dosage: DosageSpec | None = None
    quantity: Quantity | None = None
    refills: int | None = Field(default=None, ge=0)
    supply_days: int | None = Field(default=None, gt=0)


class CheckoutProfile(_Strict):
    """Plan ids (Stripe ``metadata.plan`` or canonical ``plan``) to requested treatment."""

    kind: Literal["checkout"] = "checkout"
    id: Annotated[str, Field(pattern=FHIR_ID)]
    version: str
    plans: dict[str, Plan]


# --------------------------------------------------------------------------- EHR targets

ResourceType = Literal[
    "Patient", "QuestionnaireResponse", "MedicationRequest", "Provenance", "Observation",
    "Flag", "Consent", "Questionnaire",
]


class EhrAuth(_Strict):
    """OAuth 2.0 client credentials for one EHR (RFC 6749 section 4.4)."""

    method: Literal["client_secret_basic", "client_secret_post", "none"] = "client_secret_basic"
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = Field(
        default=None, description="Name of the environment variable holding the secret."
    )
    scopes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> EhrAuth:
        if self.method != "none":
            missing = [
                name
                for name in ("token_url", "client_id", "client_secret_env")
                if getattr(self, name) in (None, "")
            ]
            if missing:
                raise ValueError(f"auth method {self.method} needs {', '.join(missing)}")
        return self


class RetryPolicy(_Strict):
    """Exponential backoff with full jitter (delays in seconds)."""

    base_delay_s: float = Field(default=2.0, gt=0)
    max_delay_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=12, ge=1)
    max_age_s: float = Field(default=72 * 3600.0, gt=0)


class EhrTargetProfile(_Strict):
    """One EHR the gateway delivers FHIR to."""

    kind: Literal["ehr"] = "ehr"
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    enabled: bool = True
    base_url: str
    auth: EhrAuth = Field(default_factory=lambda: EhrAuth(method="none"))
    send: list[ResourceType] = Field(
        default_factory=lambda: ["Patient", "QuestionnaireResponse", "MedicationRequest", "Provenance"]
    )
    timeout_s: float = Field(default=20.0, gt=0)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)

    @model_validator(mode="after")
    def _base_url(self) -> EhrTargetProfile:
        if not re.match(r"^https?://", self.base_url):
            raise ValueError("base_url must be an http(s) URL")
        return self


# --------------------------------------------------------------------------- workflow


class Transition(_Strict):
    """``event`` (``type`` or ``type:detail``) moves a case ``from`` states ``to`` one
    (``to: "*"`` keeps the state). The key is ``event``, not ``on``: YAML 1.1 reads a bare
    ``on`` as the boolean true."""

    event: str
    from_: list[str] = Field(alias="from")
    to: str
    backward: bool = Field(
        default=False, description="Allowed even though it moves the case back."
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EventType(_Strict):
    """A clinical event type, who may send it, and the details it may carry."""

    owners: list[str]
    details: list[str] = Field(default_factory=list)
    opens_case: bool = False


class WorkflowProfile(_Strict):
    """Case states, transitions and ownership (``profiles/workflow.yaml``).

    ``states`` are listed in journey order: a transition to an earlier state is
    "backward" and is refused for late events unless ``backward: true``.
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
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def rank(self, state: str) -> int:
        """Position of ``state`` in the journey (0-based)."""
        return self.states.index(state)


# --------------------------------------------------------------------------- loading


class ProfileLoadError(ValueError):
    """The profiles directory has problems; ``problems`` names file and path of each."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p.location}: {p.message}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the profiles:\n{lines}")


@dataclass(frozen=True)
class LoadedProfile:
    """A profile with where it came from and the SHA-256 of its file content."""

    path: str
    content_hash: str


@dataclass
class ProfileSet:
    """Every profile the gateway runs with, validated together."""

    root: Path
    intake: dict[tuple[str, str], IntakeProfile] = field(default_factory=dict)
    checkout: dict[str, CheckoutProfile] = field(default_factory=dict)
    ehr: dict[str, EhrTargetProfile] = field(default_factory=dict)
    workflow: WorkflowProfile | None = None
    sources: dict[str, LoadedProfile] = field(default_factory=dict)

    def intake_profile(self, form_id: str, version: str) -> IntakeProfile | None:
        """The intake profile for a submission's ``form.id`` and ``form.version``."""
        return self.intake.get((form_id, version))

    def plan(self, plan_id: str) -> tuple[CheckoutProfile, Plan] | None:
        """The checkout profile and plan for ``plan_id``, or None."""
        for profile in self.checkout.values():
            plan = profile.plans.get(plan_id)
            if plan is not None:
                return profile, plan
        return None

    def enabled_targets(self) -> list[EhrTargetProfile]:
        """EHR targets that receive deliveries."""
        return [t for t in self.ehr.values() if t.enabled]

    def source_of(self, key: str) -> LoadedProfile | None:
        """Provenance of a profile by key (``intake/<id>/<version>``, ``checkout/<id>``...)."""
        return self.sources.get(key)

    @property
    def workflow_or_raise(self) -> WorkflowProfile:
        """The workflow profile; a loaded set always has one."""
        if self.workflow is None:
            raise ProfileLoadError([Problem("workflow.yaml", "missing", "no workflow profile")])
        return self.workflow


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err.get("loc", ()))


def _yaml_files(folder: Path) -> Iterable[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def load_profiles(root: Path) -> ProfileSet:
    """Read and validate every profile under ``root``.

    Layout: ``intake/*.yaml``, ``checkout/*.yaml``, ``ehr/*.yaml``, ``workflow.yaml``.

    Returns:
        The :class:`ProfileSet`.

    Raises:
        ProfileLoadError: listing every problem as ``<file>: <path>: <message>``
        (YAML syntax errors with their line), duplicate ids, unknown programs.
    """
    problems: list[Problem] = []
    result = ProfileSet(root=root)
    if not root.is_dir():
        raise ProfileLoadError([Problem(str(root), "missing", "profiles directory not found")])

    def read(path: Path, model: type[BaseModel]) -> Any:
        rel = str(path.relative_to(root))
        raw = path.read_bytes()
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{rel}:{mark.line + 1}" if mark is not None else rel
            problems.append(Problem(where, "yaml_syntax", f"invalid YAML ({getattr(exc, 'problem', exc)})"))
            return None
        if not isinstance(data, dict):
            problems.append(Problem(rel, "not_a_mapping", "a profile must be a YAML mapping"))
            return None
        try:
            obj = model.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors(include_input=False, include_url=False):
                problems.append(Problem(f"{rel}: {_loc(err)}", err["type"], err["msg"]))
            return None
        digest = hashlib.sha256(raw).hexdigest()
        return obj, rel, digest

    for path in _yaml_files(root / "intake"):
        loaded = read(path, IntakeProfile)
        if loaded:
            obj, rel, digest = loaded
            key = (obj.id, obj.version)
            if key in result.intake:
                problems.append(Problem(rel, "duplicate", f"intake {obj.id} version {obj.version} defined twice"))
            result.intake[key] = obj
            result.sources[f"intake/{obj.id}/{obj.version}"] = LoadedProfile(rel, digest)
    for path in _yaml_files(root / "checkout"):
        loaded = read(path, CheckoutProfile)
        if loaded:
            obj, rel, digest = loaded
            for other in result.checkout.values():
                for plan_id in set(obj.plans) & set(other.plans):
                    problems.append(Problem(rel, "duplicate", f"plan {plan_id!r} also in checkout profile {other.id}"))
            result.checkout[obj.id] = obj
            result.sources[f"checkout/{obj.id}"] = LoadedProfile(rel, digest)
    for path in _yaml_files(root / "ehr"):
        loaded = read(path, EhrTargetProfile)
        if loaded:
            obj, rel, digest = loaded
            if obj.name in result.ehr:
                problems.append(Problem(rel, "duplicate", f"EHR target {obj.name!r} defined twice"))
            result.ehr[obj.name] = obj
            result.sources[f"ehr/{obj.name}"] = LoadedProfile(rel, digest)
    workflow_path = root / "workflow.yaml"
    if workflow_path.is_file():
        loaded = read(workflow_path, WorkflowProfile)
        if loaded:
            result.workflow, rel, digest = loaded
            result.sources["workflow"] = LoadedProfile(rel, digest)
    else:
        problems.append(Problem("workflow.yaml", "missing", "the workflow profile is required"))

    if problems:
        raise ProfileLoadError(problems)
    return result
