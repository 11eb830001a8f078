"""The hot-path validator (the compiled R4 schema, :mod:`mappers.fhirschema`) accepts and
refuses exactly what the reference layers do (the ``fhir.resources.R4B`` model, the
official R4 schema, our binding / character / US Core checks: ``reference_problems``).

The corpus: the public FHIR R4 examples of every resource type we emit (the
``hl7.fhir.r4.examples`` package, see ``fhir_examples/README.md``), every golden output of
the mappers, a MedicationRequest with a contained Medication (the mappers' plan with a
dose form), and systematically mutated copies: each element our mappers emit dropped
(missing required elements), given the wrong JSON type, null, an empty string, a control
character, a word no value set has, a trailing space; each date-like value made
impossible (30 February, 29 February of a common year, 31 April), stripped of its zone or
seconds; an unknown element in every object; a second type beside every choice element.
The golden outputs' mutations are deduplicated by element path (list indexes folded);
the public examples' mutations add only element paths the golden ones do not cover.
"""

from __future__ import annotations

import copy
import datetime
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from mappers import fhirschema
from mappers.checkout import (
    checkout_to_medication_request,
    parse_checkout,
    stripe_session_to_checkout,
)
from mappers.fhirschema import CONTAINED_RESOURCE_TYPES, OUTBOUND_RESOURCE_TYPES
from mappers.identifiers import IdentifierSystems
from mappers.profiles import ProfileSet
from mappers.profiles.common import Coding
from mappers.validation import reference_problems, resource_problems
from tests.mappers.conftest import GOLDEN, PROFILES, example, find_plan

EXAMPLES = Path(__file__).with_name("fhir_examples") / "hl7.fhir.r4.examples.json.gz"

Path_ = tuple[str | int, ...]


def _golden() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    files = sorted(PROFILES.glob("*/*.examples/*.expected.json"))
    files += sorted(GOLDEN.glob("*.expected.json"))
    for path in files:
        data = json.loads(path.read_text())
        if data.get("resourceType") == "Bundle":
            out += [e["resource"] for e in data["entry"]]
        elif "resourceType" in data:
            out.append(data)
        else:
            out += [v for v in data.values() if isinstance(v, dict) and "resourceType" in v]
    return out


def _public_examples() -> dict[str, dict[str, Any]]:
    with gzip.open(EXAMPLES, "rt", encoding="utf-8") as f:
        resources: dict[str, dict[str, Any]] = json.load(f)["resources"]
    return resources


@pytest.fixture(scope="module")
def golden(profile_set: ProfileSet, systems: IdentifierSystems) -> list[dict[str, Any]]:
    """Every golden output, and a MedicationRequest with its contained Medication."""
    checkout, _ = parse_checkout(
        stripe_session_to_checkout(example("stripe-checkout-session-completed.json")),
        find_plan(profile_set),
    )
    found = profile_set.plan("glp1-semaglutide-starter")
    assert found is not None
    form = Coding(
        system="http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
        code="SOL",
        display="Solution",
    )
    mr = checkout_to_medication_request(
        checkout,
        found[1].model_copy(update={"dose_form": form}),
        request_id="mr-1",
        patient_id="pat-1",
        systems=systems,
    )
    assert mr["contained"][0]["resourceType"] == "Medication"
    resources = [*_golden(), mr]
    assert len(resources) > 30
    return resources


def _rejects(resource: dict[str, Any]) -> tuple[bool, bool]:
    """(the hot path refuses, the reference layers refuse)."""
    # the hot path's decision: the compiled validator, then (only if it accepts) the rest
    # of resource_problems, which would otherwise run the reference layers a second time
    fast = not fhirschema.conforms(resource) or bool(resource_problems(resource))
    return fast, bool(reference_problems(resource))


# --------------------------------------------------------------------------- mutations

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
_CHOICE = re.compile(
    r"^(value|effective|medication|deceased|multipleBirth|onset|abatement|occurred|timing"
    r"|asNeeded|dose|rate|bounds|reported|source|born|allowed|defaultValue|initial|answer)"
    r"([A-Z]\w*)$"
)
_SKIP = ("resourceType",)


def _walk(node: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in _SKIP:
                yield from _walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, (*path, i))


def _mutations(resource: dict[str, Any]) -> Iterator[tuple[str, Path_, Any]]:
    """``(kind, path, new value)``; ``drop`` deletes the element at ``path``."""
    for path, value in _walk(resource):
        if not path:
            continue
        key = path[-1]
        if isinstance(key, str):
            yield "drop", path, None
            choice = _CHOICE.match(key)
            if choice:
                other = "Boolean" if choice.group(2) == "String" else "String"
                yield "choice2", (*path[:-1], choice.group(1) + other), other == "Boolean" or "x"
        if isinstance(value, dict):
            yield "unknown", (*path, "bogusElement"), "x"
            yield "wrongtype", path, "x"
            yield "empty", path, {}
        elif isinstance(value, list):
            yield "wrongtype", path, {"x": 1}
            yield "emptylist", path, []
        elif isinstance(value, str):
            yield from (
                ("null", path, None),
                ("number", path, 12345),
                ("emptystr", path, ""),
                ("control", path, value + "\x01"),
                ("code", path, "not-a-code"),
                ("space", path, value + " x"),
            )
            if _DATE.match(value):
                rest = value[10:]
                yield "feb30", path, "2023-02-30" + rest
                yield "feb29", path, "2023-02-29" + rest
                yield "leapday", path, "2024-02-29" + rest
                yield "apr31", path, value[:5] + "04-31" + rest
                if "T" in value:
                    yield "nozone", path, value[:19]
                    yield "noseconds", path, value[:16] + value[19:]
        elif isinstance(value, bool):
            yield from (("string", path, "true"), ("number", path, 1), ("null", path, None))
        elif isinstance(value, int | float):
            yield from (
                ("string", path, str(value)),
                ("fraction", path, 1.5),
                ("int32", path, 2**31),
                ("negative", path, -1),
                ("boolean", path, True),
                ("null", path, None),
            )


def _fold(path: Path_) -> tuple[str, ...]:
    return tuple("#" if isinstance(p, int) else p for p in path)


def _apply(resource: dict[str, Any], kind: str, path: Path_, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    node: Any = out
    for part in path[:-1]:
        node = node[part]
    if kind == "drop":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def _mutants(
    resources: list[dict[str, Any]], seen: set[tuple[str, ...]], only: set[tuple[str, ...]] | None
) -> Iterator[tuple[dict[str, Any], str, Path_, Any]]:
    """Each resource's mutations, once per (type, kind, folded path) not in ``seen`` (added
    to it) and, with ``only``, on the element paths in ``only``."""
    for resource in resources:
        rtype = resource["resourceType"]
        for kind, path, value in _mutations(resource):
            key = (rtype, kind, *_fold(path))
            element = (rtype, *_fold(path[:-1] if kind in ("unknown", "choice2") else path))
            if key in seen or (only is not None and element not in only):
                continue
            seen.add(key)
            yield resource, kind, path, value


def _disagreements(
    resources: list[dict[str, Any]], seen: set[tuple[str, ...]], only: set[tuple[str, ...]] | None
) -> tuple[int, list[str]]:
    """The mutants (:func:`_mutants`) where the two ways disagree, and how many were run."""
    checked, out = 0, []
    for resource, kind, path, value in _mutants(resources, seen, only):
        checked += 1
        fast, reference = _rejects(_apply(resource, kind, path, value))
        if fast != reference:
            where = f"{resource['resourceType']} {kind} {'.'.join(map(str, path))}"
            out.append(f"{where}: hot path refuses={fast}, reference={reference}")
    return checked, out


# --------------------------------------------------------------------------- the tests


def test_the_vendored_schema_defines_exactly_the_types_we_emit() -> None:
    assert fhirschema.resource_types() == OUTBOUND_RESOURCE_TYPES | CONTAINED_RESOURCE_TYPES
    text = json.dumps(fhirschema.official_schema())
    referenced = set(re.findall(r'"#/definitions/([A-Za-z0-9_]+)"', text))
    assert referenced <= set(fhirschema.official_schema()["definitions"])


def test_every_golden_output_is_valid_both_ways(golden: list[dict[str, Any]]) -> None:
    for resource in golden:
        assert resource_problems(resource) == [], resource["resourceType"]
        assert reference_problems(resource) == [], resource["resourceType"]


def test_the_public_r4_examples_are_judged_alike() -> None:
    examples = _public_examples()
    assert len(examples) > 200
    wrong = [name for name, r in examples.items() if len(set(_rejects(r))) != 1]
    assert wrong == []
    # they are a real test: most are valid, and some are refused (US Core rules, a
    # Questionnaire item without linkId, contained resources of types we do not emit)
    verdicts = [bool(reference_problems(r)) for r in examples.values()]
    assert verdicts.count(False) > 150 and verdicts.count(True) > 10


def test_mutated_golden_outputs_are_judged_alike(golden: list[dict[str, Any]]) -> None:
    checked, wrong = _disagreements(golden, set(), None)
    assert checked > 1000
    assert wrong == []


def test_mutated_public_examples_are_judged_alike_on_the_elements_we_emit(
    golden: list[dict[str, Any]],
) -> None:
    emitted = {(r["resourceType"], *_fold(p)) for r in golden for p, _ in _walk(r)}
    seen: set[tuple[str, ...]] = set()
    for _ in _mutants(golden, seen, None):  # only what the golden mutations do not cover
        pass
    checked, wrong = _disagreements(list(_public_examples().values()), seen, emitted)
    assert checked > 0
    assert wrong == []


# --------------------------------------------------------------------------- the layers

OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "weight"},
    "subject": {"reference": "Patient/p1"},
    "valueQuantity": {"value": 80, "unit": "kg"},
}
PATIENT = {
    "resourceType": "Patient",
    "identifier": [{"system": "urn:x", "value": "1"}],
    "name": [{"family": "Rivera"}],
    "gender": "female",
    "birthDate": "1988-02-28",
}


def _without(resource: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != key}


@pytest.mark.parametrize(
    ("resource", "model_refuses", "schema_refuses"),
    [
        pytest.param(_without(OBSERVATION, "status"), True, False, id="no-status"),
        pytest.param({**OBSERVATION, "valueString": "x"}, True, False, id="two-choice-types"),
        pytest.param({**PATIENT, "birthDate": "1988-02-30"}, True, False, id="30-february"),
        pytest.param({**PATIENT, "meta": "x"}, True, False, id="string-for-an-element"),
        pytest.param({**OBSERVATION, "status": "bogus"}, False, True, id="status-bogus"),
        pytest.param({**PATIENT, "gender": None}, False, True, id="gender-null"),
        pytest.param({**PATIENT, "active": "true"}, False, True, id="string-for-boolean"),
        pytest.param({**PATIENT, "favouriteColour": "x"}, True, True, id="unknown-element"),
        pytest.param(_without(OBSERVATION, "code"), True, True, id="no-code"),
    ],
)
def test_together_stricter_than_either_alone(
    resource: dict[str, Any], model_refuses: bool, schema_refuses: bool
) -> None:
    """The table of issue 18: the model and the official schema each miss what the other
    finds; the hot path refuses every one."""
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        model = False
    except ValueError:
        model = True
    assert model is model_refuses
    assert bool(fhirschema.problems(resource, official=True)) is schema_refuses
    assert not fhirschema.conforms(resource)
    assert resource_problems(resource)


@pytest.fixture
def without_compiled_rules(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The hot path compiled from the official schema alone (no added rules)."""
    monkeypatch.setattr(fhirschema, "compiled_definitions", fhirschema.official_definitions)
    fhirschema.clear_cache()
    yield
    monkeypatch.undo()
    fhirschema.clear_cache()


@pytest.mark.usefixtures("without_compiled_rules")
def test_the_mutations_catch_a_validator_without_the_compiled_rules(
    golden: list[dict[str, Any]],
) -> None:
    """A control: without its added rules the hot path misses what the model finds, and
    the mutations show it (so the tests above could fail)."""
    sample = [next(r for r in golden if r["resourceType"] == t) for t in ("Patient", "Flag")]
    _, wrong = _disagreements(sample, set(), None)
    kinds = {line.split()[1] for line in wrong}
    assert {"drop", "feb30", "wrongtype", "control"} <= kinds


def test_a_value_that_is_not_json_is_refused_not_raised() -> None:
    resource = {**PATIENT, "birthDate": datetime.date(1988, 2, 28)}
    assert not fhirschema.conforms(resource)
    assert "not_json" in {p.code for p in resource_problems(resource)}
