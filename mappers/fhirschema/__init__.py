"""The hot-path validator: the official FHIR R4 JSON Schema, compiled with ``jsonschema-rs``.

The vendored ``fhir.schema.json`` (the HL7 R4 4.0.1 schema, cut to the resource types the
gateway emits: see the README beside it) is compiled once per process, with one compiled
validator per resource type (``{"$ref": "#/definitions/Patient", ...}``, never the
top-level ``oneOf``). Before compiling, the rules the R4 schema does not state are added to
a copy of its definitions, so that one Rust pass checks all of them:

* **minimum cardinalities**: every element the ``fhir.resources.R4B`` model requires. The
  R4 schema leaves required primitives optional (``status`` may be carried by
  ``_status``); a required primitive needs its value or a ``_x`` with an extension, as in
  ``fhir.resources``, and a required choice (``medication[x]``) one of its types;
* **choice-type exclusivity**: at most one ``value[x]`` (``effective[x]`` ...) of a group;
* **real calendar dates** in ``date``, ``dateTime`` and ``instant`` (no 30 February, 29
  February only in leap years), where the schema checks the pattern only;
* **integers** within the R4 range (``integer`` is 32-bit; ``unsignedInt`` >= 0,
  ``positiveInt`` >= 1; the schema types them as any number);
* **required code bindings** (https://hl7.org/fhir/R4/terminologies.html#required): a
  coded element whose value set the model lists takes only its codes (the intersection of
  the model's and the schema's lists where both have one);
* **no control characters** in any string (https://hl7.org/fhir/R4/datatypes.html#string:
  none below U+0020 but tab, CR and LF; PostgreSQL's JSONB refuses NUL as well).

The rules come from the ``fhir.resources.R4B`` field metadata (``is_required``,
``element_required``, ``one_of_many``, ``enum_values``), so the compiled validator is
as strict as that model and the official schema together; ``tests/mappers/
test_validation_differential.py`` checks that on the public R4 examples, every golden
output and mutated copies of them.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Iterable, Iterator
from functools import cache
from importlib import resources
from typing import Any

import jsonschema_rs
from fhir.resources.R4B import get_fhir_model_class

from mappers.errors import Problem

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

#: Resource types the gateway emits only inside another one, as ``contained`` (a plan's
#: Medication with its dose form, in its MedicationRequest).
CONTAINED_RESOURCE_TYPES = frozenset({"Medication"})

_PREFIX = "#/definitions/"

#: The string patterns of the R4 schema as FHIR means them, and without control characters
#: (below U+0020 but tab, LF and CR). FHIR's regexes come from XML Schema, where ``\s`` is
#: space, tab, LF and CR only: ``[ \r\n\t\S]+`` means "not empty". Read as ECMA-262
#: (JSON Schema), ``\s`` also matches a no-break space and other Unicode spaces, which
#: would refuse a free-text answer with a no-break space that R4 allows.
STRING_PATTERNS = {
    "string": "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]+$",
    "markdown": "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]+$",
    "uri": "^[^\\x00-\\x20]*$",
    "url": "^[^\\x00-\\x20]*$",
    "canonical": "^[^\\x00-\\x20]*$",
    "code": "^[^\\x00-\\x20]+([ \\t\\n\\r][^\\x00-\\x20]+)*$",
    "base64Binary": "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]*$",
    "xhtml": "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]*$",
}
#: The official schema's patterns that use ``\\s``/``\\S``, read as FHIR means them.
XSD_PATTERNS: dict[str, dict[str, Any]] = {
    "^[ \\r\\n\\t\\S]+$": {"pattern": "^[\\s\\S]+$"},
    "^\\S*$": {"pattern": "^[^ \\t\\n\\r]*$"},
    "^[^\\s]+(\\s[^\\s]+)*$": {"pattern": "^[^ \\t\\n\\r]+([ \\t\\n\\r][^ \\t\\n\\r]+)*$"},
    "^(\\s*([0-9a-zA-Z\\+/=]){4}\\s*)+$": {
        "pattern": "^([ \\t\\n\\r]*([0-9a-zA-Z\\+/=]){4}[ \\t\\n\\r]*)+$"
    },
}

_YEAR = "([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH = "(0[1-9]|1[0-2])"
# A month and a day that exist in every year, or 29 February of a leap year (divisible by
# 4, and by 400 where it ends in 00). Year 0000 is not a FHIR year.
_MONTH_DAY = (
    "((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])"
    "|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    "|02-(0[1-9]|1[0-9]|2[0-8]))"
)
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_FULL_DATE = f"({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME = (
    "([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]+)?"
    "(Z|(\\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)
#: The R4 patterns of the date types, with real calendar dates.
DATE_PATTERNS = {
    "date": f"^({_YEAR}(-{_MONTH})?|{_FULL_DATE})$",
    "dateTime": f"^({_YEAR}(-{_MONTH})?|{_FULL_DATE}(T{_TIME})?)$",
    "instant": f"^{_FULL_DATE}T{_TIME}$",
}
#: R4 integer ranges (https://hl7.org/fhir/R4/datatypes.html#primitive).
INTEGER_RANGES = {
    "integer": (-2147483648, 2147483647),
    "unsignedInt": (0, 2147483647),
    "positiveInt": (1, 2147483647),
}


@cache
def official_schema() -> dict[str, Any]:
    """The vendored schema, as published (cut to the emitted types)."""
    text = resources.files(__name__).joinpath("fhir.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def resource_types() -> frozenset[str]:
    """The resource types the vendored schema defines (those the gateway emits)."""
    return frozenset(official_schema()["discriminator"]["mapping"])


def _ref(node: dict[str, Any]) -> str | None:
    target = node.get("$ref")
    if target is None and isinstance(node.get("items"), dict):
        target = node["items"].get("$ref")
    if isinstance(target, str) and target.startswith(_PREFIX):
        return target[len(_PREFIX) :]
    return None


def _flatten(annotation: Any) -> Iterator[Any]:
    args = typing.get_args(annotation)
    if not args:
        yield annotation
        return
    for arg in args:
        yield from _flatten(arg)


def _child_class(field: Any) -> type | None:
    """The model class of a complex element (``abc.<Name>Type`` annotations)."""
    for arg in _flatten(field.annotation):
        name = getattr(arg, "__name__", "")
        if name.endswith("Type") and getattr(arg, "__module__", "") == "abc":
            try:
                child: type = get_fhir_model_class(name[: -len("Type")])
            except KeyError:
                return None
            return child
    return None


def _pairs(definitions: dict[str, Any]) -> dict[str, type]:
    """Each object definition of the schema with the R4B model class of the same element,
    found by walking both from the resource types (``QuestionnaireResponse_Answer`` is
    ``QuestionnaireResponseItemAnswer``)."""
    found: dict[str, type] = {}
    todo: list[tuple[str, type]] = [(t, get_fhir_model_class(t)) for t in sorted(resource_types())]
    while todo:
        name, cls = todo.pop()
        if name in found:
            if found[name] is not cls and found[name].__name__ != cls.__name__:
                raise ValueError(f"{name} is both {found[name].__name__} and {cls.__name__}")
            continue
        found[name] = cls
        properties = definitions[name].get("properties", {})
        for field in cls.model_fields.values():  # type: ignore[attr-defined]
            prop = properties.get(field.alias)
            if prop is None:
                continue
            target, child = _ref(prop), _child_class(field)
            if target is None or child is None or target == "ResourceList":
                continue
            if "properties" in definitions[target]:
                todo.append((target, child))
    return found


def _extra(field: Any) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _enum_target(prop: dict[str, Any]) -> dict[str, Any]:
    """The schema node that holds a coded element's codes (its items for a list), with a
    ``$ref`` moved under ``allOf`` (draft 6 ignores a sibling of ``$ref``)."""
    items = prop.get("items")
    target = items if prop.get("type") == "array" and isinstance(items, dict) else prop
    if "$ref" in target:
        target["allOf"] = [*target.get("allOf", []), {"$ref": target.pop("$ref")}]
    return target


def _add_model_rules(definition: dict[str, Any], cls: type) -> None:
    """The model's cardinalities, choice groups and bindings, on one definition."""
    properties: dict[str, Any] = definition["properties"]
    required: list[str] = list(definition.get("required", []))
    all_of: list[dict[str, Any]] = []
    groups: dict[str, list[str]] = {}
    group_required: dict[str, bool] = {}
    for field in cls.model_fields.values():  # type: ignore[attr-defined]
        alias = field.alias
        if alias is None or alias not in properties:
            continue  # an R4B-only element: the R4 schema refuses it already
        extra = _extra(field)
        enum = extra.get("enum_values")
        if enum and "+" not in enum:
            target = _enum_target(properties[alias])
            have = target.get("enum")
            target["enum"] = [c for c in enum if have is None or c in have]
        choice = extra.get("one_of_many")
        if choice:
            groups.setdefault(choice, []).append(alias)
            group_required[choice] = extra.get("one_of_many_required") is True
        if field.is_required() and alias not in required:
            required.append(alias)
        elif extra.get("element_required"):
            # the value, or (https://hl7.org/fhir/R4/extensibility.html#Special-Case)
            # an extension on the primitive saying why it is absent
            all_of.append(
                {
                    "anyOf": [
                        {"required": [alias]},
                        {
                            "required": [f"_{alias}"],
                            "properties": {
                                f"_{alias}": {
                                    "required": ["extension"],
                                    "properties": {"extension": {"minItems": 1}},
                                }
                            },
                        },
                    ]
                }
            )
    dependencies: dict[str, Any] = dict(definition.get("dependencies", {}))
    for name, members in groups.items():
        if len(members) > 1:
            for member in members:
                others = [o for o in members if o != member]
                dependencies[member] = {"propertyNames": {"not": {"enum": others}}}
        if group_required[name]:
            all_of.append({"anyOf": [{"required": [m]} for m in members]})
    if required:
        definition["required"] = required
    if dependencies:
        definition["dependencies"] = dependencies
    if all_of:
        definition["allOf"] = [*definition.get("allOf", []), *all_of]


def _primitive_rules(official: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per pattern of the official schema: what the compiled schema puts in its place.
    Keyed by pattern because the schema also writes primitives inline (``Extension.
    valueCode`` is ``{"pattern": ..., "type": "string"}``, not a ``$ref`` to ``code``)."""
    rules: dict[str, dict[str, Any]] = {}
    for name, definition in official.items():
        pattern = definition.get("pattern")
        if not name[:1].islower() or pattern is None:
            continue
        update: dict[str, Any] = {}
        if name in DATE_PATTERNS:
            update["pattern"] = DATE_PATTERNS[name]
        elif name in STRING_PATTERNS:
            update["pattern"] = STRING_PATTERNS[name]
        if name in INTEGER_RANGES:
            low, high = INTEGER_RANGES[name]
            update.update(type="integer", minimum=low, maximum=high)
        if update:
            rules[pattern] = update
    return rules


def _rewrite_patterns(node: Any, rules: dict[str, dict[str, Any]]) -> None:
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern in rules:
            node.update(rules[pattern])
        for value in node.values():
            _rewrite_patterns(value, rules)
    elif isinstance(node, list):
        for value in node:
            _rewrite_patterns(value, rules)


@cache
def official_definitions() -> dict[str, Any]:
    """The schema's definitions as published, with its patterns read as FHIR means them
    (``\\s``: space, tab, LF, CR), and nothing added."""
    definitions: dict[str, Any] = copy.deepcopy(official_schema()["definitions"])
    _rewrite_patterns(definitions, XSD_PATTERNS)
    return definitions


@cache
def compiled_definitions() -> dict[str, Any]:
    """The schema's definitions with the rules above added (a copy; the vendored file and
    :func:`official_schema` are unchanged)."""
    official = official_definitions()
    definitions: dict[str, Any] = copy.deepcopy(official)
    _rewrite_patterns(definitions, _primitive_rules(official))
    for name, definition in definitions.items():
        if name in ("string", "markdown", "base64Binary", "xhtml"):
            definition["pattern"] = STRING_PATTERNS[name]
        elif "properties" in definition:
            # the schema gives object definitions no type: "x" passed for a Meta
            definition["type"] = "object"
    for name, cls in _pairs(definitions).items():
        _add_model_rules(definitions[name], cls)
    return definitions


@cache
def _validator(rtype: str, official: bool = False) -> jsonschema_rs.Validator:
    definitions = official_definitions() if official else compiled_definitions()
    if rtype not in definitions or rtype not in resource_types():
        raise KeyError(rtype)
    return jsonschema_rs.Draft6Validator(
        {"$ref": _PREFIX + rtype, "definitions": definitions},
        pattern_options=jsonschema_rs.RegexOptions(),
    )


@cache
def _hot_validator() -> jsonschema_rs.Validator:
    """One validator for every type of :func:`resource_types`: ``anyOf`` one branch per
    type, each ``resourceType`` = the type and ``$ref`` its definition. A resource of type
    T passes it exactly when it passes T's own validator (the other branches fail on
    ``resourceType``), and the definitions the types share (datatypes, ``Resource``...)
    are compiled once: about 10 MB for all 13 types, against about 4 MB per type with a
    validator each, for 0.2 µs more per resource."""
    branches = [
        {
            "required": ["resourceType"],
            "properties": {"resourceType": {"const": rtype}},
            "allOf": [{"$ref": _PREFIX + rtype}],
        }
        for rtype in sorted(resource_types())
    ]
    return jsonschema_rs.Draft6Validator(
        {"anyOf": branches, "definitions": compiled_definitions()},
        pattern_options=jsonschema_rs.RegexOptions(),
    )


def clear_cache() -> None:
    """Forget the compiled validators (tests that compile another way)."""
    _validator.cache_clear()
    _hot_validator.cache_clear()


def conforms(resource: dict[str, Any]) -> bool:
    """True when ``resource`` passes the compiled validator of its type (the R4 schema and
    the rules above). The validator is compiled on first use, once per process
    (:func:`_hot_validator`: one for every type).

    A value that is not JSON data (a ``datetime`` left by a mapper) does not conform.

    Raises:
        KeyError: ``resource["resourceType"]`` is not one of :func:`resource_types`.
    """
    if resource["resourceType"] not in resource_types():
        raise KeyError(resource["resourceType"])
    try:
        return _hot_validator().is_valid(resource)
    except ValueError:  # jsonschema-rs: "Unsupported type"
        return False


def warm_up(types: Iterable[str] | None = None) -> None:
    """Compile the hot-path validator now, at process start-up, rather than on the first
    request (it covers every type; ``types``, when given, are checked to be known).

    Raises:
        KeyError: a type not in :func:`resource_types`.
    """
    for rtype in types or ():
        if rtype not in resource_types():
            raise KeyError(rtype)
    _hot_validator()


def problems(resource: dict[str, Any], *, official: bool = False) -> list[Problem]:
    """The schema's problems with ``resource``, located ``<Type>.<element path>``.

    ``official``: the published R4 schema alone (its patterns read as FHIR means them),
    without the rules added here. Messages name the rule broken, never the value.

    Raises:
        KeyError: as :func:`conforms`.
    """
    rtype = resource["resourceType"]
    try:
        return list(_problems(resource, rtype, official))
    except ValueError:  # jsonschema-rs: "Unsupported type"
        return [Problem(rtype, "not_json", "holds a value that is not JSON data")]


def _location(prefix: str, path: Iterable[str | int]) -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _at(node: Any, path: Iterable[str | int]) -> Any:
    for part in path:
        node = node[part]
    return node


def _problems(resource: dict[str, Any], where: str, official: bool) -> Iterator[Problem]:
    validator = _validator(resource["resourceType"], official)
    for error in validator.iter_errors(resource):
        kind = error.kind
        path = list(error.instance_path)
        here = _location(where, path)
        if isinstance(kind, jsonschema_rs.ValidationErrorKind.AdditionalProperties):
            for name in kind.unexpected:
                yield Problem(f"{here}.{name}", "unknown_element", "is not an R4 element here")
        elif isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
            yield Problem(f"{here}.{kind.property}", "missing", "a required element is missing")
        elif isinstance(kind, jsonschema_rs.ValidationErrorKind.OneOfNotValid):
            # a contained or Bundle entry resource: its own type's problems, not "no match"
            inner = _at(resource, path)
            inner_type = inner.get("resourceType") if isinstance(inner, dict) else None
            if inner_type in resource_types():
                yield from _problems(inner, here, official)
            else:
                yield Problem(here, "unsupported_type", "not a resource type the gateway emits")
        else:
            code, message = _describe(kind, error.schema_path)
            yield Problem(here, code, message)


def _describe(kind: Any, schema_path: list[str | int]) -> tuple[str, str]:
    kinds = jsonschema_rs.ValidationErrorKind
    if isinstance(kind, kinds.Enum):
        return "code_not_in_value_set", "code is not in the required value set"
    if isinstance(kind, kinds.Type):
        return "wrong_type", "has the wrong JSON type for its FHIR datatype"
    if isinstance(kind, kinds.Pattern):
        return "invalid_format", "does not have the format of its FHIR datatype"
    if isinstance(kind, kinds.Not):
        if "dependencies" in schema_path:
            return "choice_type", "holds more than one type of a choice element ([x])"
        return "invalid_character", "contains a control character"
    if isinstance(kind, kinds.Minimum | kinds.Maximum):
        return "out_of_range", "is outside the range of its FHIR integer type"
    if isinstance(kind, kinds.AnyOf):
        return "missing", "a required element (or the reason it is absent) is missing"
    if isinstance(kind, kinds.OneOfNotValid | kinds.OneOfMultipleValid):
        return "invalid_resource", "is not a valid resource of a type the gateway emits"
    if isinstance(kind, kinds.Constant):
        return "wrong_resource_type", "has another resourceType than its element allows"
    return kind.name, "does not conform to the FHIR R4 JSON Schema"
