"""Reading a profiles directory into a validated :class:`ProfileSet`.

Layout (each kind registered once in :data:`PROFILE_KINDS`)::

    profiles/
      intake/*.yaml          IntakeProfile      (+ <stem>.examples/ golden cases)
      checkout/*.yaml        CheckoutProfile    (processor field paths, plan tables)
      ehr/*.yaml             EhrTargetProfile
      workflow.yaml          WorkflowProfile
      events/*.yaml          PartnerProfile     (event senders: webhooks, HL7 v2 feeds)
      imports/*.yaml         CsvImportProfile   (column mappings of legacy CSV exports)
      concept-maps/*.json|*.csv   FHIR ConceptMaps (code tables)
      schema/*.schema.json   generated JSON Schemas (``fhir-gateway profiles schema``)

A new kind is one line in :data:`PROFILE_KINDS` (model, folder or file, key); its
profiles are then loaded, linted for schema errors, hashed and given a JSON Schema like
the others, and reachable as ``profile_set.by_kind[kind][key]``.

Loading is all-or-nothing: :func:`load_profiles` either returns a complete set or raises
:class:`ProfileLoadError` naming ``file:line: path: message`` for every problem (YAML
syntax, schema, duplicates, lint errors), so the gateway never runs half-configured.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mappers.conceptmap import CompiledConceptMap, parse_concept_map
from mappers.errors import Problem
from mappers.profiles.checkout import CheckoutProfile, Plan, Processor
from mappers.profiles.ehr import EhrTargetProfile
from mappers.profiles.events import PartnerProfile, check_event_profiles
from mappers.profiles.imports import CsvImportProfile
from mappers.profiles.intake import IntakeProfile
from mappers.profiles.workflow import WorkflowProfile
from mappers.profiles.yamlsource import YamlSyntaxError, format_path, load_yaml_with_lines


@dataclass(frozen=True)
class ProfileKind:
    """One kind of profile: its model, where its files are, and its key in the set.

    Attributes:
        name: the ``kind:`` value and the ``by_kind`` key.
        model: the pydantic model (its JSON Schema goes to ``schema/<name>.schema.json``).
        location: a folder (``"intake/"``, every ``*.yaml`` in it) or one file
            (``"workflow.yaml"``).
        key: the profile's key within its kind (unique; duplicates are load errors).
        required: a set without one is refused.
    """

    name: str
    model: type[BaseModel]
    location: str
    key: Callable[[Any], str]
    required: bool = False

    @property
    def is_folder(self) -> bool:
        """True when the kind is a folder of files."""
        return self.location.endswith("/")


#: Every profile kind. Extend with one line per new kind.
PROFILE_KINDS: dict[str, ProfileKind] = {
    k.name: k
    for k in [
        ProfileKind("intake", IntakeProfile, "intake/", lambda p: f"{p.id}/{p.version}"),
        ProfileKind("checkout", CheckoutProfile, "checkout/", lambda p: p.id),
        ProfileKind("ehr", EhrTargetProfile, "ehr/", lambda p: p.name),
        ProfileKind("workflow", WorkflowProfile, "workflow.yaml", lambda p: "workflow", True),
        ProfileKind("partner", PartnerProfile, "events/", lambda p: p.name),
        ProfileKind("import", CsvImportProfile, "imports/", lambda p: p.name),
    ]
}

CONCEPT_MAPS_DIR = "concept-maps"


class ProfileLoadError(ValueError):
    """The profiles have problems; ``problems`` names ``file:line: path`` of each."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p.location}: {p.message} [{p.code}]" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the profiles:\n{lines}")


@dataclass(frozen=True)
class LoadedProfile:
    """A profile's origin: file (relative to the root), SHA-256 of its bytes, kind, key,
    and the line of each path in the file (for problems found after loading)."""

    path: str
    content_hash: str
    kind: str = ""
    key: str = ""
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, path: Iterable[Any]) -> str:
        """``file:line: a.b[0]`` for a path inside this profile."""
        p = tuple(path)
        line = None
        q = p
        while q:
            if q in self.lines:
                line = self.lines[q]
                break
            q = q[:-1]
        prefix = f"{self.path}:{line}" if line else self.path
        return f"{prefix}: {format_path(p)}" if p else prefix


@dataclass
class ProfileSet:
    """Every profile the gateway runs with, validated and linted together."""

    root: Path
    intake: dict[tuple[str, str], IntakeProfile] = field(default_factory=dict)
    checkout: dict[str, CheckoutProfile] = field(default_factory=dict)
    ehr: dict[str, EhrTargetProfile] = field(default_factory=dict)
    workflow: WorkflowProfile | None = None
    concept_maps: dict[str, CompiledConceptMap] = field(default_factory=dict)
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[str, LoadedProfile] = field(default_factory=dict)
    warnings: list[Problem] = field(default_factory=list)
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

    def intake_versions(self, url: str | None = None) -> list[IntakeProfile]:
        """Every intake profile (optionally only the form with canonical ``url``)."""
        return [p for p in self.intake.values() if url is None or p.url == url]

    def plan(self, plan_id: str) -> tuple[CheckoutProfile, Plan] | None:
        """The checkout profile and plan for ``plan_id``, or None."""
        for profile in self.checkout.values():
            plan = profile.plans.get(plan_id)
            if plan is not None:
                return profile, plan
        return None

    def processor(self, name: str) -> tuple[CheckoutProfile, Processor] | None:
        """The checkout profile declaring processor ``name`` (``stripe``...), or None."""
        for profile in self.checkout.values():
            proc = profile.processors.get(name)
            if proc is not None:
                return profile, proc
        return None

    def enabled_targets(self) -> list[EhrTargetProfile]:
        """EHR targets that receive deliveries."""
        return [t for t in self.ehr.values() if t.enabled]

    def source_of(self, key: str) -> LoadedProfile | None:
        """Origin of a profile by ``<kind>/<key>`` (``intake/<id>/<version>``,
        ``checkout/<id>``, ``ehr/<name>``, ``workflow``)."""
        return self.sources.get(key)

    def key_of_file(self, path: str) -> str | None:
        """The key (``intake/<id>/<version>``, ``checkout/<id>``...) of the profile loaded
        from ``path`` (relative to the root), or None when no profile came from it."""
        for key, source in self.sources.items():
            if source.path == path and not key.startswith("concept-map/"):
                return key
        return None

    @property
    def content_hash(self) -> str:
        """SHA-256 over every profile's and concept map's hash: changes when any file does."""
        digest = hashlib.sha256()
        for key in sorted(self.sources):
            digest.update(f"{key}={self.sources[key].content_hash}\n".encode())
        return digest.hexdigest()

    @property
    def workflow_or_raise(self) -> WorkflowProfile:
        """The workflow profile; a loaded set always has one."""
        if self.workflow is None:
            raise ProfileLoadError([Problem("workflow.yaml", "missing", "no workflow profile")])
        return self.workflow


def _yaml_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _source_key(kind: str, key: str) -> str:
    return "workflow" if kind == "workflow" else f"{kind}/{key}"


def read_profile_file(
    rel: str, raw: bytes, kind: ProfileKind, problems: list[Problem]
) -> tuple[Any, LoadedProfile] | None:
    """Parse and validate one profile file's bytes; append its problems; None if any.

    Args:
        rel: the file's path relative to the profiles root (for problem locations).
        raw: its content.
        kind: the kind its folder holds.
        problems: where problems are appended.
    """
    try:
        source = load_yaml_with_lines(raw)
    except YamlSyntaxError as exc:
        where = f"{rel}:{exc.line}" if exc.line else rel
        problems.append(Problem(where, "yaml_syntax", str(exc)))
        return None
    if not isinstance(source.data, dict):
        problems.append(Problem(rel, "not_a_mapping", "a profile must be a YAML mapping"))
        return None
    digest = hashlib.sha256(raw).hexdigest()
    loaded = LoadedProfile(rel, digest, kind.name, "", source.lines)
    try:
        obj = kind.model.model_validate(source.data)
    except ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False):
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(Problem(loaded.where(loc), err["type"], msg))
        return None
    key = kind.key(obj)
    return obj, LoadedProfile(rel, digest, kind.name, key, source.lines)


def load_profiles(
    root: Path,
    *,
    kinds: dict[str, ProfileKind] | None = None,
    drafts: dict[str, bytes] | None = None,
) -> ProfileSet:
    """Read, validate and lint every profile and concept map under ``root``.

    Args:
        root: the profiles directory.
        kinds: the kinds to load (default :data:`PROFILE_KINDS`).
        drafts: files that are not (or not yet) on disk, by path relative to ``root``
            (``intake/my-form-v2.yaml``): added to the set, or replacing the file with that
            path or the profile with the same key. Nothing is written (``profiles preview``).

    Returns:
        The :class:`ProfileSet` (lint warnings in ``warnings``).

    Raises:
        ProfileLoadError: every problem as ``<file>:<line>: <path>: <message> [<code>]``:
            YAML syntax, schema errors, duplicate keys or plan ids, invalid concept maps,
            and lint errors (:mod:`mappers.profiles.lint`).
    """
    from mappers.profiles.lint import lint_profile_set

    problems: list[Problem] = []
    if not root.is_dir():
        raise ProfileLoadError([Problem(str(root), "missing", "profiles directory not found")])
    result = ProfileSet(root=root)
    drafts = dict(drafts or {})
    for kind in (kinds or PROFILE_KINDS).values():
        bucket: dict[str, Any] = result.by_kind.setdefault(kind.name, {})
        files: dict[str, bytes | None] = {}
        if kind.is_folder:
            for path in _yaml_files(root / kind.location.rstrip("/")):
                files[path.relative_to(root).as_posix()] = None
            for rel in drafts:
                if rel.startswith(kind.location) and rel.endswith((".yaml", ".yml")):
                    files[rel] = None
        else:
            if (root / kind.location).is_file() or kind.location in drafts:
                files[kind.location] = None
            elif kind.required:
                problems.append(
                    Problem(kind.location, "missing", f"the {kind.name} profile is required")
                )
        # Drafts last, so that a draft replaces the profile with the same key.
        for rel in sorted(files, key=lambda r: (r in drafts, r)):
            raw = drafts[rel] if rel in drafts else (root / rel).read_bytes()
            loaded = read_profile_file(rel, raw, kind, problems)
            if loaded is None:
                continue
            obj, source = loaded
            if source.key in bucket and rel in drafts:
                bucket.pop(source.key)
            if source.key in bucket:
                other = result.sources[_source_key(kind.name, source.key)].path
                problems.append(
                    Problem(
                        source.path,
                        "duplicate",
                        f"{kind.name} profile {source.key!r} is also defined in {other}",
                    )
                )
                continue
            bucket[source.key] = obj
            result.sources[_source_key(kind.name, source.key)] = source

    cm_dir = root / CONCEPT_MAPS_DIR
    if cm_dir.is_dir():
        for path in sorted(cm_dir.iterdir()):
            if path.suffix not in (".json", ".csv") or not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            if path.stem in result.concept_maps:
                problems.append(
                    Problem(rel, "duplicate", f"concept map {path.stem!r} is defined twice")
                )
                continue
            raw = path.read_bytes()
            compiled, cm_problems = parse_concept_map(path.stem, path.name, raw)
            for p in cm_problems:
                problems.append(
                    Problem(f"{rel}: {p.location}" if p.location else rel, p.code, p.message)
                )
            if compiled is not None:
                result.concept_maps[path.stem] = compiled
                result.sources[f"concept-map/{path.stem}"] = LoadedProfile(
                    rel, hashlib.sha256(raw).hexdigest(), "concept-map", path.stem
                )

    _place(result)
    problems.extend(_check_partners(result))
    errors, warnings = lint_profile_set(result)
    problems.extend(errors)
    result.warnings = warnings
    if problems:
        raise ProfileLoadError(problems)
    return result


def _place(result: ProfileSet) -> None:
    """Fill the typed views of the kinds the gateway itself uses."""
    for obj in result.by_kind.get("intake", {}).values():
        result.intake[(obj.id, obj.version)] = obj
    result.checkout.update(result.by_kind.get("checkout", {}))
    result.ehr.update(result.by_kind.get("ehr", {}))
    result.workflow = result.by_kind.get("workflow", {}).get("workflow")
    result.partners.update(result.by_kind.get("partner", {}))


def _check_partners(result: ProfileSet) -> list[Problem]:
    """Partners and EHR ``events`` blocks against the workflow (issue 5)."""
    if result.workflow is None:
        return []

    def where(kind: str, key: str) -> Callable[[tuple[Any, ...]], str]:
        source = result.sources.get(_source_key(kind, key))
        return source.where if source is not None else (lambda path: f"{kind}/{key}")

    partners = {name: (where("partner", name), p) for name, p in result.partners.items()}
    targets = {name: (where("ehr", name), t.events) for name, t in result.ehr.items()}
    return check_event_profiles(result.workflow, partners, targets)
