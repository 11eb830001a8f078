"""The same validation as :func:`mappers.validation.validate_resources`, memoized for the
parts of a resource that repeat across submissions.

Why: ``fhir.resources`` validation costs about 5 µs per model node (pure-Python validators
on every element), which dominates mapping time. Most nodes the profiles produce are
constants of the profile (codings of answers, categories, codes, dosage instructions) or
answers from a small set (yes/no questions, choice questions); validating them again for
every submission proves nothing new.

How, exactly: before validating a resource, each subtree whose model class is in
:data:`MEMO_TYPES` and whose JSON was validated before is replaced by the model instance
that validation produced. ``fhir.resources`` accepts an instance of the expected class
as already valid (``fhir_core.types ... fhir_model_validator``: an instance is only type
checked), so the resource is validated exactly as before, minus the repeated work. A
subtree seen for the first time is validated alone with the same model class the field
declares; an invalid one is left as JSON, so the full validation reports it at its path.
Our own checks (required bindings, US Core rules) then run over the JSON as before.

Only subtrees that hold profile data, ids or answers from a closed set are memoized:
Coding, CodeableConcept, Meta, Dosage and its parts, References (local ids), Provenance
agents and entities, Consent policy and provision, extensions with a code, coding,
boolean or reference value, and QuestionnaireResponse items whose answers are all
booleans, codings or bare numbers (or a data-absent-reason); free text, names, dates,
identifiers, addresses and contact points are validated every time and never kept. The memo is a
bounded LRU (:data:`MEMO_SIZE` entries).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from mappers.errors import MappingErrors, Problem
from mappers.validation import _fields, _model_class, resource_problems

#: Model classes whose instances are memoized by their exact JSON.
MEMO_TYPES = frozenset(
    {
        "Coding",
        "CodeableConcept",
        "Meta",
        "Dosage",
        "Timing",
        "TimingRepeat",
        "DosageDoseAndRate",
        "Reference",
        "ProvenanceAgent",
        "ProvenanceEntity",
        "ConsentPolicy",
        "ConsentProvision",
    }
)
#: Extension values that are codes or references, never free text.
_CLOSED_EXTENSION_VALUES = frozenset(
    {"valueCode", "valueCoding", "valueCodeableConcept", "valueBoolean", "valueReference"}
)
MEMO_SIZE = 16384

_memo: OrderedDict[tuple[type, str], Any] = OrderedDict()


def _key(value: Any) -> str:
    # repr of JSON data (str, int, float, bool, None, dict, list) is injective: equal
    # keys mean equal content. Key order is not normalized; a different order is a miss.
    return repr(value)


#: QR answer types that hold no free text and no dates (a bare number, a yes/no, a code).
_CLOSED_ANSWERS = frozenset(
    {"valueBoolean", "valueCoding", "valueInteger", "valueDecimal", "valueQuantity"}
)


def closed_item(item: dict[str, Any]) -> bool:
    """A QR item whose answers are booleans, codings or bare numbers (or absent with a
    reason), and whose children are too."""
    for answer in item.get("answer", []):
        if set(answer) - _CLOSED_ANSWERS:
            return False
    return all(closed_item(child) for child in item.get("item", []))


def _memoizable(cls: type, value: Any) -> bool:
    name = cls.__name__
    if name in MEMO_TYPES:
        return True
    if name == "Extension":
        return set(value) <= {"url"} | _CLOSED_EXTENSION_VALUES
    return name == "QuestionnaireResponseItem" and closed_item(value)


def _lookup(cls: type, value: dict[str, Any]) -> Any:
    key = (cls, _key(value))
    hit = _memo.get(key)
    if hit is not None:
        _memo.move_to_end(key)
        return hit
    try:
        instance = cls.model_validate(value)  # type: ignore[attr-defined]
    except (ValidationError, KeyError):  # reported by the full validation at its path
        return None
    _memo[key] = instance
    if len(_memo) > MEMO_SIZE:
        _memo.popitem(last=False)
    return instance


def _substitute(node: dict[str, Any], cls: type) -> dict[str, Any]:
    """A shallow copy of ``node`` with memoizable subtrees replaced by model instances."""
    out = dict(node)
    spec = _fields(cls)
    for name, value in node.items():
        field = spec.get(name)
        if field is None or field[1] is None:
            continue
        child = field[1]
        if isinstance(value, dict):
            out[name] = _replace(value, child)
        elif isinstance(value, list):
            out[name] = [_replace(v, child) if isinstance(v, dict) else v for v in value]
    return out


def _replace(value: dict[str, Any], cls: type) -> Any:
    if "resourceType" in value:
        return value  # contained resources: validated with the resource
    if _memoizable(cls, value):
        instance = _lookup(cls, value)
        if instance is not None:
            return instance
    return _substitute(value, cls)


def fast_resource_problems(resource: dict[str, Any]) -> list[Problem]:
    """:func:`mappers.validation.resource_problems` with memoized subtrees (same result)."""
    rtype = resource.get("resourceType")
    cls = _model_class(rtype) if isinstance(rtype, str) else None
    if cls is None:
        return resource_problems(resource)
    try:
        cls.model_validate(_substitute(resource, cls))  # type: ignore[attr-defined]
    except (ValidationError, KeyError):  # the reference path names every problem
        return resource_problems(resource)
    return resource_problems(resource, structure_checked=True)


def validate_resources_fast(resources: Iterable[dict[str, Any]]) -> None:
    """Validate each resource; raise once with every problem of every resource.

    Raises:
        MappingErrors: as :func:`mappers.validation.validate_resources`.
    """
    problems: list[Problem] = []
    for resource in resources:
        problems.extend(fast_resource_problems(resource))
    if problems:
        raise MappingErrors(problems)
