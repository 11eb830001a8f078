"""Validation of every FHIR resource the gateway emits.

Two layers, because ``fhir.resources`` checks structure and datatypes but not code bindings:

1. the ``fhir.resources.R4B`` model (wire-compatible with R4 4.0.1 for the resource types we
   send; never the top-level R5 models), which rejects unknown elements, wrong datatypes,
   dateTimes with a time but no zone, empty strings, missing required elements;
2. our own checks: every ``code`` element with a *required* binding against its value set
   (the model's ``enum_values``: ``Patient.gender``, ``ContactPoint.system``,
   ``MedicationRequest.status``/``intent``...), the resource type being one R4 has and we
   emit, and the US Core rules we claim (US Core 6.1/7.0: Patient identifier/name/gender,
   USPS ``address.state`` of US addresses; us-core-21 requester on orders; QuestionnaireResponse
   ``questionnaire`` as a canonical, never a ``urn:uuid:``), and the R4 ``string`` rule
   that no control characters but tab, CR and LF appear (the models let them through).

Sources: https://hl7.org/fhir/R4/terminologies.html#required,
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

from mappers.errors import MappingErrors, Problem

#: Resource types the gateway emits; all exist in R4 4.0.1 (R4B-only types are refused).
OUTBOUND_RESOURCE_TYPES = frozenset(
    {
        "Patient",
        "QuestionnaireResponse",
        "Questionnaire",
        "MedicationRequest",
        "Provenance",
        "Observation",
        "Flag",
        "Consent",
        "ConceptMap",
        "OperationOutcome",
        "Bundle",
        "Parameters",
    }
)

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


def _us_core_rules(resource: dict[str, Any], problems: list[Problem]) -> None:
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        identifiers = resource.get("identifier") or []
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
        for i, address in enumerate(resource.get("address") or []):
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
        canonical = resource.get("questionnaire", "")
        if canonical.startswith("urn:"):
            problems.append(
                Problem(
                    "questionnaire",
                    "invalid_canonical",
                    "questionnaire must be a canonical URL (transactions do not rewrite it)",
                )
            )


def resource_problems(
    resource: dict[str, Any], *, structure_checked: bool = False
) -> list[Problem]:
    """Every problem of one FHIR R4 resource (JSON dict); empty when it is valid.

    Locations are FHIRPath-like element paths (``Patient.address[0].state``); messages
    never contain element values. ``structure_checked``: the caller already validated the
    resource with its R4B model (:mod:`mappers.fastvalidate`); only our checks run.
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
        if not structure_checked:
            cls.model_validate(resource)  # type: ignore[attr-defined]
    except ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False):
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            problems.append(Problem(f"{rtype}.{loc}" if loc else rtype, err["type"], err["msg"]))
    except KeyError:
        problems.append(Problem(rtype, "unsupported_type", "contains an unknown resource type"))
    found: list[Problem] = []
    _check_bindings(resource, cls, "", found)
    _check_characters(resource, "", found)
    _us_core_rules(resource, found)
    problems.extend(Problem(f"{rtype}.{p.location}", p.code, p.message) for p in found)
    return problems


def validate_resources(resources: Iterable[dict[str, Any]]) -> None:
    """Validate each resource; raise once with every problem of every resource.

    Raises:
        MappingErrors: the problems, each located at ``<Type>.<element path>``.
    """
    problems: list[Problem] = []
    for resource in resources:
        problems.extend(resource_problems(resource))
    if problems:
        raise MappingErrors(problems)
