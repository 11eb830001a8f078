"""Reading a profiles directory into a validated :class:`ProfileSet`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mappers.errors import Problem
from mappers.profiles.checkout import CheckoutProfile, Plan
from mappers.profiles.ehr import EhrTargetProfile
from mappers.profiles.events import PartnerProfile, check_event_profiles
from mappers.profiles.intake import IntakeProfile
from mappers.profiles.workflow import WorkflowProfile


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
    partners: dict[str, PartnerProfile] = field(default_factory=dict)

    def hl7_sender(self, facility: str) -> PartnerProfile | None:
        """The partner whose HL7 v2 feed uses MSH-4 sending facility ``facility``."""
        for partner in self.partners.values():
            if partner.hl7 is not None and facility in partner.hl7.facilities:
                return partner
        return None

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


def _loc(err: Mapping[str, Any]) -> str:
    return ".".join(str(p) for p in err.get("loc", ()))


def _yaml_files(folder: Path) -> Iterable[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def load_profiles(root: Path) -> ProfileSet:
    """Read and validate every profile under ``root``.

    Layout: ``intake/*.yaml``, ``checkout/*.yaml``, ``ehr/*.yaml``, ``workflow.yaml``,
    ``events/*.yaml`` (partners).

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
            problems.append(
                Problem(where, "yaml_syntax", f"invalid YAML ({getattr(exc, 'problem', exc)})")
            )
            return None
        if not isinstance(data, dict):
            problems.append(Problem(rel, "not_a_mapping", "a profile must be a YAML mapping"))
            return None
        try:
            obj = model.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors(include_input=False, include_url=False):
                where = f"{rel}: {_loc(err)}" if err.get("loc") else rel
                problems.append(Problem(where, err["type"], err["msg"]))
            return None
        digest = hashlib.sha256(raw).hexdigest()
        return obj, rel, digest

    for path in _yaml_files(root / "intake"):
        loaded = read(path, IntakeProfile)
        if loaded:
            obj, rel, digest = loaded
            key = (obj.id, obj.version)
            if key in result.intake:
                problems.append(
                    Problem(
                        rel, "duplicate", f"intake {obj.id} version {obj.version} defined twice"
                    )
                )
            result.intake[key] = obj
            result.sources[f"intake/{obj.id}/{obj.version}"] = LoadedProfile(rel, digest)
    for path in _yaml_files(root / "checkout"):
        loaded = read(path, CheckoutProfile)
        if loaded:
            obj, rel, digest = loaded
            for other in result.checkout.values():
                for plan_id in set(obj.plans) & set(other.plans):
                    problems.append(
                        Problem(
                            rel,
                            "duplicate",
                            f"plan {plan_id!r} also in checkout profile {other.id}",
                        )
                    )
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
    problems += _load_partners(root, result, read)

    if problems:
        raise ProfileLoadError(problems)
    return result


def _load_partners(root: Path, result: ProfileSet, read: Any) -> list[Problem]:
    """Event senders (``events/*.yaml``), cross-checked with the workflow (issue 5)."""
    problems: list[Problem] = []
    files: dict[str, tuple[str, PartnerProfile]] = {}
    for path in _yaml_files(root / "events"):
        loaded = read(path, PartnerProfile)
        if loaded:
            obj, rel, digest = loaded
            if obj.name in result.partners:
                problems.append(Problem(rel, "duplicate", f"partner {obj.name!r} defined twice"))
            result.partners[obj.name] = obj
            files[obj.name] = (rel, obj)
            result.sources[f"events/{obj.name}"] = LoadedProfile(rel, digest)
    if result.workflow is not None:
        targets = {
            name: (result.sources[f"ehr/{name}"].path, target.events)
            for name, target in result.ehr.items()
        }
        problems += check_event_profiles(result.workflow, files, targets)
    return problems
