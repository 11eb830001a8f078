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
Our own checks (required bindings, control characters) run in the same walk over the JSON,
with the problems the reference walks would give, in their order: a memo entry keeps the
problems its subtree has (located relative to the subtree), so a subtree taken from the
memo still reports them at its path. The US Core rules then run as before.

Only subtrees that hold profile data, ids or answers from a closed set are memoized:
Coding, CodeableConcept, Quantity (a bare number with its profile's unit: a vital sign,
a dose), Meta, Dosage and its parts, References (local ids), Provenance
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
from mappers.validation import (
    OUTBOUND_RESOURCE_TYPES,
    _check_bindings,
    _check_characters,
    _fields,
    _model_class,
    _us_core_rules,
    resource_problems,
)

#: Model classes whose instances are memoized by their exact JSON.
MEMO_TYPES = frozenset(
    {
        "Coding",
        "CodeableConcept",
        "Quantity",
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

_Entry = tuple[Any, tuple[Problem, ...], tuple[Problem, ...]]
"""A memo entry: the validated instance, then its binding and its character problems, each
located relative to the subtree (the suffix after the subtree's own path)."""

_memo: OrderedDict[tuple[type, str], _Entry] = OrderedDict()


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


class _Found:
    """Our checks' problems while walking one resource, in the reference walks' orders."""

    __slots__ = ("bindings", "characters")

    def __init__(self) -> None:
        self.bindings: list[Problem] = []
        self.characters: list[Problem] = []


def _relative(problems: list[Problem], start: int, path: str) -> tuple[Problem, ...]:
    cut = len(path)
    return tuple(Problem(p.location[cut:], p.code, p.message) for p in problems[start:])


def _absolute(problems: tuple[Problem, ...], path: str) -> list[Problem]:
    return [Problem(path + p.location, p.code, p.message) for p in problems]


def _lookup(cls: type, value: dict[str, Any], path: str, found: _Found) -> Any:
    """The memoized instance for ``value``, its problems added to ``found`` at ``path``;
    None (nothing added) when ``value`` is not valid alone."""
    key = (cls, _key(value))
    hit = _memo.get(key)
    if hit is not None:
        _memo.move_to_end(key)
        instance, bindings, characters = hit
        if bindings:
            found.bindings += _absolute(bindings, path)
        if characters:
            found.characters += _absolute(characters, path)
        return instance
    try:
        instance = cls.model_validate(value)  # type: ignore[attr-defined]
    except (ValidationError, KeyError):  # reported by the full validation at its path
        return None
    b0, c0 = len(found.bindings), len(found.characters)
    _check_bindings(value, cls, path, found.bindings)
    _check_characters(value, path, found.characters)
    # Every location under ``path`` starts with it: keep only the suffix.
    _memo[key] = (
        instance,
        _relative(found.bindings, b0, path),
        _relative(found.characters, c0, path),
    )
    if len(_memo) > MEMO_SIZE:
        _memo.popitem(last=False)
    return instance


def _visit(value: dict[str, Any], cls: type, path: str, found: _Found) -> Any:
    """One element (a JSON object of model ``cls`` at non-empty ``path``): our checks into
    ``found``, and the element to validate (a memoized instance, or a copy with memoized
    children)."""
    if "resourceType" in value:
        # A contained resource: checked as its own type, validated with the resource.
        _check_bindings(value, cls, path, found.bindings)
        _check_characters(value, path, found.characters)
        return value
    if _memoizable(cls, value):
        instance = _lookup(cls, value, path, found)
        if instance is not None:
            return instance
    return _walk(value, cls, path, found)


def _walk(node: dict[str, Any], cls: type, path: str, found: _Found) -> dict[str, Any]:
    """The binding and character checks of :mod:`mappers.validation` over ``node`` (same
    problems, same order) in one pass, returning a shallow copy of ``node`` with memoizable
    subtrees replaced by model instances."""
    out = dict(node)
    spec = _fields(cls)
    for key, value in node.items():
        here = f"{path}.{key}" if path else key
        field = spec.get(key)
        if field is None:
            _check_characters(value, here, found.characters)
            continue
        codes, child = field
        if codes is not None or child is None or not isinstance(value, dict | list):
            # A coded or primitive element: no model below it to substitute.
            if codes is not None:
                _check_bindings({key: value}, cls, path, found.bindings)
            _check_characters(value, here, found.characters)
            if child is not None and isinstance(value, dict | list):
                out[key] = _substitute_only(value, child)
            continue
        if isinstance(value, dict):
            out[key] = _visit(value, child, here, found)
            continue
        items = []
        for i, item in enumerate(value):
            at = f"{here}[{i}]"
            if isinstance(item, dict):
                items.append(_visit(item, child, at, found))
            else:
                _check_bindings(item, child, at, found.bindings)
                _check_characters(item, at, found.characters)
                items.append(item)
        out[key] = items
    return out


def _substitute_only(value: dict[str, Any] | list[Any], cls: type) -> Any:
    """Memoized instances for an element our binding walk does not enter (no such element
    in R4B today: an element with both a required binding and a model type)."""
    scratch = _Found()
    if isinstance(value, dict):
        return _visit(value, cls, "_", scratch)
    return [_visit(v, cls, "_", scratch) if isinstance(v, dict) else v for v in value]


def fast_resource_problems(resource: dict[str, Any]) -> list[Problem]:
    """:func:`mappers.validation.resource_problems` with memoized subtrees (same result)."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype not in OUTBOUND_RESOURCE_TYPES:
        return resource_problems(resource)
    cls = _model_class(rtype)
    if cls is None:
        return resource_problems(resource)
    found = _Found()
    substituted = _walk(resource, cls, "", found)
    try:
        cls.model_validate(substituted)  # type: ignore[attr-defined]
    except (ValidationError, KeyError):  # the reference path names every problem
        return resource_problems(resource)
    ours = found.bindings + found.characters
    _us_core_rules(resource, ours)
    return [Problem(f"{rtype}.{p.location}", p.code, p.message) for p in ours]


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
