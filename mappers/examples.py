"""Golden example cases kept beside each profile, and unmapped-field coverage.

For a profile ``intake/glp1-weight-management-v1.yaml`` the cases live in
``intake/glp1-weight-management-v1.examples/``:

* ``<case>.input.json``: a sample payload (an intake submission; for checkout profiles a
  Stripe event or a canonical checkout);
* ``<case>.expected.json``: the FHIR the gateway must produce, as a ``collection`` Bundle
  (Provenance left out: it carries the time and the profile's hash); or
* ``<case>.expected-problems.json``: for a payload that must be rejected, the list of
  ``{"location": ..., "code": ...}`` problems.

:func:`run_examples` maps every case with placeholder ids (stable per case), validates the
output with ``fhir.resources.R4B`` plus our checks, compares it with the golden file
(:func:`mappers.fhirdiff.resources_diff`, one line per differing path) and lists the input
fields no rule maps. ``write=True`` (``profiles check --write-expected``) writes missing
golden files, or all of them with ``overwrite=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mappers.checkout import processor_paths
from mappers.errors import MappingErrors, Problem
from mappers.fhirdiff import resources_diff
from mappers.pipeline import (
    EXAMPLE_SYSTEMS,
    checkout_payload,
    map_checkout,
    map_intake,
    payload_kind,
    placeholder_id,
)
from mappers.profiles.intake import IntakeProfile
from mappers.profiles.loader import ProfileSet
from mappers.validation import resource_problems

Status = Literal["pass", "mismatch", "failed", "written"]


@dataclass
class CaseResult:
    """The outcome of one example case."""

    profile: str
    case: str
    status: Status
    diff: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)


def examples_dir(profile_file: Path) -> Path:
    """``<stem>.examples/`` beside a profile file."""
    return profile_file.with_name(f"{profile_file.stem}.examples")


def leaf_paths(node: Any, path: str = "") -> list[str]:
    """Every leaf of a JSON document as a dotted path (lists of scalars are one leaf)."""
    if isinstance(node, dict):
        out: list[str] = []
        for key, value in node.items():
            out.extend(leaf_paths(value, f"{path}.{key}" if path else key))
        return out
    if isinstance(node, list) and any(isinstance(v, dict | list) for v in node):
        out = []
        for i, value in enumerate(node):
            out.extend(leaf_paths(value, f"{path}[{i}]"))
        return out
    return [path]


def _covered(leaf: str, mapped: list[str]) -> bool:
    return any(leaf == p or leaf.startswith(f"{p}.") or leaf.startswith(f"{p}[") for p in mapped)


def intake_mapped_paths(profile: IntakeProfile, data: Any) -> list[str]:
    """Input paths an intake profile maps (or the contract uses) for ``data``."""
    paths = ["submission_id", "form", "submitted_at", "patient", "attribution"]
    paths += [f"answers.{key}" for key in profile.items_by_key]
    consents = data.get("consents") if isinstance(data, dict) else None
    for i, consent in enumerate(consents if isinstance(consents, list) else []):
        if isinstance(consent, dict) and consent.get("type") in profile.derived.consents:
            paths.append(f"consents[{i}]")
    return paths


def unmapped_fields(data: Any, mapped: list[str]) -> list[str]:
    """Leaves of ``data`` that no mapped path covers."""
    return [leaf for leaf in leaf_paths(data) if not _covered(leaf, mapped)]


def run_examples(
    profiles: ProfileSet, *, write: bool = False, overwrite: bool = False
) -> list[CaseResult]:
    """Run every example case of every intake and checkout profile in ``profiles``."""
    results: list[CaseResult] = []
    for key, source in sorted(profiles.sources.items()):
        if source.kind not in ("intake", "checkout"):
            continue
        folder = examples_dir(profiles.root / source.path)
        if not folder.is_dir():
            continue
        for input_file in sorted(folder.glob("*.input.json")):
            case = input_file.name.removesuffix(".input.json")
            results.append(
                _run_case(
                    profiles, key, source.path, folder, case, write=write, overwrite=overwrite
                )
            )
    return results


def _run_case(
    profiles: ProfileSet,
    key: str,
    profile_path: str,
    folder: Path,
    case: str,
    *,
    write: bool,
    overwrite: bool,
) -> CaseResult:
    result = CaseResult(profile_path, case, "pass")
    try:
        data = json.loads((folder / f"{case}.input.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        result.status = "failed"
        result.problems = [Problem(f"{case}.input.json", "invalid_json", str(exc))]
        return result
    scope = f"{folder.name}/{case}"
    resources: list[dict[str, Any]] = []
    problems: list[Problem] = []
    kind = payload_kind(data)
    try:
        if kind == "intake":
            profile = profiles.intake.get(tuple(key.split("/", 2)[1:]))  # type: ignore[arg-type]
            form = data.get("form") if isinstance(data, dict) else None
            if (
                profile is None
                or not isinstance(form, dict)
                or (
                    form.get("id"),
                    form.get("version"),
                )
                != (profile.id, profile.version)
            ):
                raise MappingErrors(
                    [Problem("form", "wrong_form", "the example is not for this form version")]
                )
            result.unmapped = unmapped_fields(data, intake_mapped_paths(profile, data))
            mapped = map_intake(
                data,
                profiles,
                systems=EXAMPLE_SYSTEMS,
                patient_id=placeholder_id(scope, "Patient"),
                response_id=placeholder_id(scope, "QuestionnaireResponse"),
            )
            resources = mapped.resources
        else:
            if kind == "stripe":
                found = profiles.processor("stripe")
                if found is not None:
                    ignore = found[1].ignore
                    result.unmapped = unmapped_fields(data, [*processor_paths(found[1]), *ignore])
            canonical = checkout_payload(data, profiles, kind=kind)
            checkout = map_checkout(
                canonical,
                profiles,
                systems=EXAMPLE_SYSTEMS,
                patient_id=placeholder_id(scope, "Patient"),
                request_id=placeholder_id(scope, "MedicationRequest"),
            )
            resources = checkout.resources
    except MappingErrors as exc:
        problems = list(exc.problems)
    expected_problems = folder / f"{case}.expected-problems.json"
    expected_file = folder / f"{case}.expected.json"
    if expected_problems.is_file():
        result.unmapped = []  # a negative case: its odd fields are the point
        want = json.loads(expected_problems.read_text())
        got = [{"location": p.location, "code": p.code} for p in problems]
        if got != want:
            result.status = "mismatch"
            result.diff = [f"problems: -{json.dumps(want)} +{json.dumps(got)}"]
        return result
    if problems:
        result.status = "failed"
        result.problems = problems
        return result
    for r in resources:
        result.problems.extend(
            Problem(f"{r['resourceType']}/{r['id']}: {p.location}", p.code, p.message)
            for p in resource_problems(r, authoring=True)
        )
    if result.problems:
        result.status = "failed"
        return result
    actual: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }
    if not expected_file.is_file() or overwrite:
        if write:
            expected_file.write_text(json.dumps(actual, indent=2, ensure_ascii=False) + "\n")
            result.status = "written"
        else:
            result.status = "failed"
            result.problems = [
                Problem(
                    f"{case}.expected.json",
                    "missing_expected",
                    "no golden file (run `fhir-gateway profiles check --write-expected`)",
                )
            ]
        return result
    expected: dict[str, Any] = json.loads(expected_file.read_text())
    diff = resources_diff(
        [e["resource"] for e in expected.get("entry", [])],
        [e["resource"] for e in actual["entry"]],
    )
    if diff:
        result.status = "mismatch"
        result.diff = diff
    return result
