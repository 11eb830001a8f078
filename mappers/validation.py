"""Validation of every FHIR resource the gateway emits: the one public entry point.

:func:`validate_resources` (and :func:`resource_problems` for one resource) decide with
three layers, because ``fhir.resources`` and the official R4 JSON Schema each miss what the
other checks, and neither checks our rules:

1. the ``fhir.resources.R4B`` model (wire-compatible with R4 4.0.1 for the resource types we
   send; never the top-level R5 models), which rejects unknown elements, wrong datatypes,
   dateTimes with a time but no zone, empty strings, missing required elements (required
   primitives too), two types of one choice element, dates that do not exist;
2. the official FHIR R4 JSON Schema (:mod:`mappers.fhirschema`), which also rejects
   ``null``, strings for numbers and booleans, codes outside the required value sets R4
   lists, ``id`` over 64 characters, integers with fractions;
3. our own checks: every ``code`` element with a *required* binding against its value set
   (the model's ``enum_values``: ``Patient.gender``, ``ContactPoint.system``,
   ``MedicationRequest.status``/``intent``...), the resource type being one R4 has and we
   emit, and the US Core rules we claim (US Core 6.1/7.0: Patient identifier/name/gender,
   USPS ``address.state`` of US addresses; us-core-21 requester on orders; QuestionnaireResponse
   ``questionnaire`` as a canonical, never a ``urn:uuid:``), and the R4 ``string`` rule
   that no control characters but tab, CR and LF appear (the models let them through).

The hot path (ingest, mapping) does not build the models: :func:`mappers.fhirschema.conforms`
runs the schema with layers 1 and 3 compiled into it (one Rust pass, about 10 µs per
resource), then the US Core rules. Only a resource it refuses is validated again with all
three layers, which name every problem (``tests/mappers/test_validation_differential.py``
shows that the two ways accept and refuse the same resources). Authoring (``profiles
check``, golden examples, preview) passes ``authoring=True`` and always runs all three.

Sources: https://hl7.org/fhir/R4/terminologies.html#required,
https://hl7.org/fhir/R4/json.html#schema,
https://hl7.org/fhir/us/core/STU6.1/StructureDefinition-us-core-patient.html.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from mappers import fhirschema
from mappers.errors import MappingErrors, Problem
from mappers.fhirschema import OUTBOUND_RESOURCE_TYPES

#: USPS state/territory/military codes (https://www.usps.com/, US Core us-core-usps-state).
USPS_CODES = frozenset(
    [
        "AL",
        "AK",
        "AZ",
        "AR",
        "CA",
        "CO",
        "CT",
        "DE",
        "DC",
        "FL",
        "GA",
        "HI",
        "ID",
        "IL",
        "IN",
        "IA",
        "KS",
        "KY",
        "LA",
        "ME",
        "MD",
        "MA",
        "MI",
        "MN",
        "MS",
        "MO",
        "MT",
        "NE",
        "NV",
        "NH",
        "NJ",
        "NM",
        "NY",
        "NC",
        "ND",
        "OH",
        "OK",
        "OR",
        "PA",
        "RI",
        "SC",
        "SD",
        "TN",
        "TX",
        "UT",
        "VT",
        "VA",
        "WA",
        "WV",
        "WI",
        "WY",
        "AS",
        "GU",
        "MP",
        "PR",
        "VI",
        "UM",
        "FM",
        "MH",
        "PW",
        "AA",
        "AE",
        "AP",
    ]
)

#: Characters an R4 ``string`` may not hold: code points below 32 other than tab, LF, CR
#: (https://hl7.org/fhir/R4/datatypes.html#string). PostgreSQL's JSONB refuses NUL too.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")

_ORDER_INTENTS = frozenset(
    {"order", "original-order", "reflex-order", "filler-order", "instance-order"}
)

_FieldSpec = tuple[frozenset[str] | None, type | None]


@cache
def _model_class(name: str) -> type | None:
    try:
        model: type = get_fhir_model_class(name)
        return model
    except KeyError:
        return None


@cache
def _fields(cls: type) -> dict[str, _FieldSpec]:
    """Per element alias: the required-binding codes, and the element's model class."""
    out: dict[str, _FieldSpec] = {}
    for field in cls.model_fields.values():  # type: ignore[attr-defined]
        alias = field.alias
        if alias is None:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        enum = extra.get("enum_values")
        # fhir.resources ends a value set it only partly lists with "+" (e.g.
        # Questionnaire.item.type): such a list cannot be checked against.
        codes = frozenset(enum) if enum and "+" not in enum else None
        child: type | None = None
        for arg in _flatten(field.annotation):
            name = getattr(arg, "__name__", "")
            if name.endswith("Type") and arg.__module__ == "abc":
                child = _model_class(name[: -len("Type")])
                break
        out[alias] = (codes, child)
    return out


def _flatten(annotation: Any) -> Iterable[Any]:
    args = typing.get_args(annotation)
    if not args:
        yield annotation
        return
    for arg in args:
        yield from _flatten(arg)


def _check_bindings(node: Any, cls: type, path: str, problems: list[Problem]) -> None:
    if isinstance(node, list):
        for i, child in enumerate(node):
            _check_bindings(child, cls, f"{path}[{i}]", problems)
        return
    if not isinstance(node, dict):
        return
    if "resourceType" in node and path:
        inner = _model_class(str(node["resourceType"]))
        if inner is not None:
            cls = inner
    spec = _fields(cls)
    for key, value in node.items():
        field = spec.get(key)
        if field is None:
            continue
        codes, child = field
        here = f"{path}.{key}" if path else key
        if codes is not None:
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, str) and v not in codes:
                    problems.append(
                        Problem(
                            here,
                            "code_not_in_value_set",
                            f"code is not in the required value set ({', '.join(sorted(codes))})",
                        )
                    )
        elif child is not None and isinstance(value, dict | list):
            _check_bindings(value, child, here, problems)


def _check_characters(node: Any, path: str, problems: list[Problem]) -> None:
    if isinstance(node, str):
        if CONTROL_CHARACTERS.search(node):
            problems.append(Problem(path, "invalid_character", "contains a control character"))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            _check_characters(child, f"{path}[{i}]", problems)
    elif isinstance(node, dict):
        for key, value in node.items():
            _check_characters(value, f"{path}.{key}" if path else key, problems)


def _is_us(address: dict[str, Any]) -> bool:
    """True for a US address (``country`` US/USA, or absent as in a US-only form)."""
    country = address.get("country")
    return country is None or str(country).upper() in ("US", "USA")


def _dicts(value: Any) -> list[Any]:
    """The list's items, each a dict or ``{}`` (a wrong type is the model's problem)."""
    if not isinstance(value, list):
        return []
    return [v if isinstance(v, dict) else {} for v in value]


def _us_core_rules(resource: dict[str, Any], problems: list[Problem]) -> None:
    """The US Core rules we claim; robust to malformed input (the other layers name it)."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        identifiers = _dicts(resource.get("identifier"))
        if not identifiers:
            problems.append(Problem("identifier", "us_core", "US Core Patient needs an identifier"))
        for i, ident in enumerate(identifiers):
            if not ident.get("system") or not ident.get("value"):
                problems.append(
                    Problem(f"identifier[{i}]", "us_core", "identifier needs system and value")
                )
        if not resource.get("name"):
            problems.append(Problem("name", "us_core", "US Core Patient needs a name"))
        if not resource.get("gender"):
            problems.append(Problem("gender", "us_core", "US Core Patient needs a gender"))
        for i, address in enumerate(_dicts(resource.get("address"))):
            # The USPS binding is extensible: a foreign region has no USPS code.
            state = address.get("state")
            if state is not None and _is_us(address) and state not in USPS_CODES:
                problems.append(
                    Problem(f"address[{i}].state", "us_core", "state must be a USPS code")
                )
    elif rtype == "MedicationRequest":
        if resource.get("intent") in _ORDER_INTENTS and not resource.get("requester"):
            problems.append(
                Problem("requester", "us-core-21", "an order-type intent needs a requester")
            )
    elif rtype == "QuestionnaireResponse":
        canonical = resource.get("questionnaire")
        if isinstance(canonical, str) and canonical.startswith("urn:"):
            problems.append(
                Problem(
                    "questionnaire",
                    "invalid_canonical",
                    "questionnaire must be a canonical URL (transactions do not rewrite it)",
                )
            )


def resource_problems(resource: dict[str, Any], *, authoring: bool = False) -> list[Problem]:
    """Every problem of one FHIR R4 resource (JSON dict); empty when it is valid.

    Args:
        resource: the resource as JSON.
        authoring: validate with all three layers even when the compiled validator accepts
            (``profiles check``, golden examples, preview: slower, and the same answer).

    Returns:
        The problems, each located at ``<Type>.<element path>`` (FHIRPath-like:
        ``Patient.address[0].state``); messages never contain element values.
    """
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype not in OUTBOUND_RESOURCE_TYPES:
        return [
            Problem("resourceType", "unsupported_type", "not a resource type the gateway emits")
        ]
    if not authoring and fhirschema.conforms(resource):
        found: list[Problem] = []
        _us_core_rules(resource, found)
        if not found:
            return []
    problems = reference_problems(resource)
    if not problems and not fhirschema.conforms(resource):
        # the compiled validator refuses what the three layers accept (a rule compiled
        # stricter than its source): its own problems, never nothing
        problems = fhirschema.problems(resource)
    return problems


def reference_problems(resource: dict[str, Any]) -> list[Problem]:
    """The problems the three layers find, each run as published: the R4B model, the
    official R4 schema (:func:`mappers.fhirschema.problems` with ``official=True``) and our
    checks, without the compiled validator. A location the model reports is not repeated
    from the schema. The compiled validator must refuse exactly what this refuses.
    """
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype not in OUTBOUND_RESOURCE_TYPES:
        return [
            Problem("resourceType", "unsupported_type", "not a resource type the gateway emits")
        ]
    cls = _model_class(rtype)
    if cls is None:
        return [Problem("resourceType", "unsupported_type", "unknown resource type")]
    problems: list[Problem] = []
    try:
        cls.model_validate(resource)  # type: ignore[attr-defined]
    except ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False):
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            problems.append(Problem(f"{rtype}.{loc}" if loc else rtype, err["type"], err["msg"]))
    except KeyError:
        problems.append(Problem(rtype, "unsupported_type", "contains an unknown resource type"))
    except (TypeError, AttributeError, ValueError):
        # fhir.resources fails on some wrong types instead of reporting them (an integer
        # where a Url is due raises AttributeError); the schema names the element
        problems.append(Problem(rtype, "invalid_resource", "the R4B model cannot read it"))
    found: list[Problem] = []
    _check_bindings(resource, cls, "", found)
    _check_characters(resource, "", found)
    _us_core_rules(resource, found)
    problems.extend(Problem(f"{rtype}.{p.location}", p.code, p.message) for p in found)
    seen = {_path(p.location) for p in problems}
    problems.extend(
        p for p in fhirschema.problems(resource, official=True) if _path(p.location) not in seen
    )
    return problems


def _path(location: str) -> str:
    """A location in one spelling: the model says ``item.0.answer``, we ``item[0].answer``."""
    return location.replace("[", ".").replace("]", "")


def validate_resources(resources: Iterable[dict[str, Any]], *, authoring: bool = False) -> None:
    """Validate each resource; raise once with every problem of every resource.

    Args:
        resources: FHIR R4 resources as JSON.
        authoring: as :func:`resource_problems`.

    Raises:
        MappingErrors: the problems, each located at ``<Type>.<element path>``.
    """
    problems: list[Problem] = []
    for resource in resources:
        problems.extend(resource_problems(resource, authoring=authoring))
    if problems:
        raise MappingErrors(problems)


#: The resource types ingest validates and stores (their validators are built at start-up;
#: any other type's on its first use).
STORED_RESOURCE_TYPES = frozenset(
    {
        "Patient",
        "QuestionnaireResponse",
        "Observation",
        "Flag",
        "Consent",
        "MedicationRequest",
        "Provenance",
    }
)


def warm_up(types: Iterable[str] = STORED_RESOURCE_TYPES) -> None:
    """Build the compiled validator now, at process start-up rather than in a first
    request: about 1.5 s (the R4B model metadata its rules are compiled from, then the
    schema) and about 10 MB of memory (one validator for every type,
    :func:`mappers.fhirschema.conforms`)."""
    fhirschema.warm_up(types)
