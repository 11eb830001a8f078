"""Write the vendored schema: the official FHIR R4 JSON Schema cut to what the gateway emits.

``python -m mappers.fhirschema.vendor PATH/TO/fhir.schema.json`` reads the HL7 FHIR R4
(4.0.1) ``fhir.schema.json`` and writes ``mappers/fhirschema/fhir.schema.json``: the
definitions of the resource types of :data:`mappers.fhirschema.OUTBOUND_RESOURCE_TYPES`
and :data:`~mappers.fhirschema.CONTAINED_RESOURCE_TYPES` and every definition they reference, unchanged, and ``ResourceList`` (what
``Bundle.entry.resource``, ``Parameters.parameter.resource`` and ``contained`` may hold)
narrowed to those resource types. Nothing else is edited; the rules the schema does not
state are added when it is compiled (:mod:`mappers.fhirschema`). See the README beside
this file for where the input comes from.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mappers.fhirschema import CONTAINED_RESOURCE_TYPES, OUTBOUND_RESOURCE_TYPES

TARGET = Path(__file__).with_name("fhir.schema.json")
_PREFIX = "#/definitions/"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_PREFIX):
                yield value[len(_PREFIX) :]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def trim(
    schema: dict[str, Any],
    types: frozenset[str] = OUTBOUND_RESOURCE_TYPES | CONTAINED_RESOURCE_TYPES,
) -> dict[str, Any]:
    """The schema cut to ``types`` and the definitions they reference (transitively).

    Raises:
        KeyError: a type or a reference the schema does not define.
    """
    definitions: dict[str, Any] = schema["definitions"]
    order = sorted(types)
    keep: set[str] = {"ResourceList"}
    todo = list(order)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo.extend(_refs(definitions[name]))
    out_definitions = {name: definitions[name] for name in definitions if name in keep}
    out_definitions["ResourceList"] = {"oneOf": [{"$ref": _PREFIX + t} for t in order]}
    return {
        "$schema": schema["$schema"],
        "id": schema["id"],
        "description": schema["description"],
        "discriminator": {
            "propertyName": "resourceType",
            "mapping": {t: _PREFIX + t for t in order},
        },
        "oneOf": [{"$ref": _PREFIX + t} for t in order],
        "definitions": out_definitions,
    }


def main() -> None:
    """Read the official schema named on the command line; write the trimmed copy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("source", type=Path, help="the official R4 fhir.schema.json")
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    schema = json.loads(args.source.read_text())
    args.out.write_text(json.dumps(trim(schema), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
