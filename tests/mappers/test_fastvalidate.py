"""Memoized validation gives exactly the reference validation's problems."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from gateway.settings import BUNDLED_PROFILES_DIR
from mappers.errors import MappingErrors
from mappers.fastvalidate import fast_resource_problems, validate_resources_fast
from mappers.validation import resource_problems


def _golden() -> list[dict[str, Any]]:
    out = []
    for path in sorted(BUNDLED_PROFILES_DIR.glob("*/*.examples/*.expected.json")):
        out += [e["resource"] for e in json.loads(path.read_text())["entry"]]
    return out


RESOURCES = _golden()


def _key(problems: list[Any]) -> list[tuple[str, str]]:
    return sorted((p.location, p.code) for p in problems)


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r["resourceType"])
def test_valid_resources_agree(resource: dict[str, Any]) -> None:
    assert fast_resource_problems(resource) == resource_problems(resource) == []
    assert fast_resource_problems(resource) == []  # again, from the memo


def _first(rtype: str) -> dict[str, Any]:
    """The first golden resource of a type (a QuestionnaireResponse without groups)."""
    found = next(
        r
        for r in RESOURCES
        if r["resourceType"] == rtype and "answer" in (r.get("item") or [{"answer": 1}])[0]
    )
    return copy.deepcopy(found)


Breaker = Callable[[dict[str, Any]], None]

BREAKERS: list[tuple[str, Breaker]] = [
    ("Observation", lambda r: r["code"]["coding"][0].update(code="")),
    ("Observation", lambda r: r["category"][0]["coding"][0].update(colour="red")),
    ("Observation", lambda r: r.update(effectiveDateTime="2026-11-23T14:00:00")),
    ("Observation", lambda r: r["valueQuantity"].update(value="heavy")),
    ("Patient", lambda r: r.update(gender="F")),
    ("Patient", lambda r: r["telecom"][0].update(system="mobile")),
    ("QuestionnaireResponse", lambda r: r["item"][5]["answer"][0].update(valueString="x")),
    ("QuestionnaireResponse", lambda r: r["item"][6].update(linkId="")),
    (
        "QuestionnaireResponse",
        lambda r: r["item"][0]["answer"][0]["valueQuantity"].update(value="x"),
    ),
    ("Flag", lambda r: r["extension"][0]["valueCodeableConcept"]["coding"][0].update(system=1)),
    ("Consent", lambda r: r["provision"].update(type="maybe")),
    (
        "MedicationRequest",
        lambda r: r["dosageInstruction"][0]["timing"]["repeat"].update(periodUnit="fortnight"),
    ),
    ("MedicationRequest", lambda r: r["medicationCodeableConcept"]["coding"][0].update(code="")),
]


@pytest.mark.parametrize(("rtype", "breaker"), BREAKERS)
def test_invalid_resources_get_the_same_problems(rtype: str, breaker: Breaker) -> None:
    valid = _first(rtype)
    fast_resource_problems(valid)  # warm the memo with the valid subtrees
    broken = copy.deepcopy(valid)
    breaker(broken)
    reference = resource_problems(broken)
    assert reference, "the breaker must break something"
    assert _key(fast_resource_problems(broken)) == _key(reference)


def test_validate_resources_fast_raises_every_problem() -> None:
    a, b = _first("Observation"), _first("Patient")
    a["effectiveDateTime"] = "yesterday"
    b["gender"] = "F"
    with pytest.raises(MappingErrors) as exc:
        validate_resources_fast([a, b])
    assert [p.location for p in exc.value.problems] == [
        "Observation.effectiveDateTime",
        "Patient.gender",
    ]


@pytest.mark.parametrize(("rtype", "breaker"), BREAKERS)
def test_problems_of_memoized_subtrees_are_reported_again_in_order(
    rtype: str, breaker: Breaker
) -> None:
    """The memo keeps a subtree's own problems: a second run (from the memo) reports the
    same problems, in the same order, as the reference validation."""
    broken = _first(rtype)
    breaker(broken)
    reference = resource_problems(broken)
    assert fast_resource_problems(broken) == reference
    assert fast_resource_problems(copy.deepcopy(broken)) == reference


CONTROL = "dose\x01"

SUBTREE_BREAKERS: list[tuple[str, Breaker]] = [
    # a control character in a memoized Coding, in two places (one memo entry, two paths)
    ("Observation", lambda r: r["code"]["coding"][0].update(display=CONTROL)),
    (
        "Observation",
        lambda r: (
            r["code"]["coding"][0].update(display=CONTROL),
            r["category"].append(copy.deepcopy(r["code"])),
        ),
    ),
    # a required binding inside a memoized Timing (valid for the model, not for us)
    (
        "MedicationRequest",
        lambda r: r["dosageInstruction"][0]["timing"]["repeat"].update(periodUnit="fortnight"),
    ),
    # in a memoized closed QuestionnaireResponse item
    (
        "QuestionnaireResponse",
        lambda r: r["item"][0]["answer"][0]["valueQuantity"].update(unit=CONTROL),
    ),
    # in a memoized Quantity
    ("Observation", lambda r: r["valueQuantity"].update(unit=CONTROL)),
    # in a memoized Extension and a Reference
    ("Flag", lambda r: r["extension"][0]["valueCodeableConcept"]["coding"][0].update(code=CONTROL)),
    ("Flag", lambda r: r["subject"].update(display=CONTROL)),
]


@pytest.mark.parametrize(("rtype", "breaker"), SUBTREE_BREAKERS)
def test_memoized_subtrees_keep_their_problems(rtype: str, breaker: Breaker) -> None:
    broken = _first(rtype)
    breaker(broken)
    reference = resource_problems(broken)
    assert reference, "the breaker must break something"
    for _ in range(3):  # first seen, then from the memo
        assert fast_resource_problems(broken) == reference


def _string_leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, str):
        return [path]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _string_leaves(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _string_leaves(v, (*path, i))]
    return []


def _set(node: Any, path: tuple[Any, ...], value: str) -> None:
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r["resourceType"])
def test_every_string_broken_gives_the_reference_problems(resource: dict[str, Any]) -> None:
    """Each string of each golden resource, in turn, given a control character or replaced
    by a word no value set has: the fast path (first seen, then from the memo) reports
    exactly the reference problems, in order."""
    for path in _string_leaves(resource):
        if path == ("resourceType",):
            continue
        original: Any = resource
        for part in path:
            original = original[part]
        for bad in (original + "\x01", "not-a-code"):
            broken = copy.deepcopy(resource)
            _set(broken, path, bad)
            reference = resource_problems(broken)
            assert fast_resource_problems(broken) == reference, path
            assert fast_resource_problems(copy.deepcopy(broken)) == reference, path


def test_problems_keep_the_reference_order_across_memoized_and_walked_parts() -> None:
    """Binding problems come before character problems, each in document order, whether
    they are found by walking or taken from the memo (a sorted list would differ)."""
    flag = _first("Flag")  # a binding problem, and a control character in a memoized part
    flag["status"] = "bogus"
    flag["extension"][0]["valueCodeableConcept"]["coding"][0]["display"] = CONTROL
    patient = _first("Patient")  # both in walked parts
    patient["telecom"][0]["system"] = "mobile"
    patient["name"][0]["family"] = CONTROL
    for resource in (flag, patient):
        reference = resource_problems(resource)
        assert len(reference) == 2
        assert [p.location for p in reference] != sorted(p.location for p in reference)
        for _ in range(2):
            assert fast_resource_problems(resource) == reference
