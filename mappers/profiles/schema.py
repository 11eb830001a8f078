"""JSON Schemas of every profile kind, for editors (validation and autocompletion).

Generated from the pydantic models registered in
:data:`mappers.profiles.loader.PROFILE_KINDS` (JSON Schema draft 2020-12, the dialect
pydantic emits: https://docs.pydantic.dev/latest/concepts/json_schema/), one file per kind
in ``profiles/schema/<kind>.schema.json``. A profile file opts in with a first line the
YAML language server understands::

    # yaml-language-server: $schema=../schema/intake.schema.json

``fhir-gateway profiles schema`` rewrites them; a test fails when a committed schema is
out of date with its model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mappers.profiles.loader import PROFILE_KINDS, ProfileKind

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_for(kind: ProfileKind) -> dict[str, Any]:
    """The JSON Schema of one kind (aliases as in YAML, e.g. ``from``)."""
    schema = kind.model.model_json_schema(by_alias=True, mode="validation")
    return {
        "$schema": DIALECT,
        "$id": f"https://fhir-gateway.example.org/schema/{kind.name}.schema.json",
        **schema,
    }


def render(kind: ProfileKind) -> str:
    """The schema as the file text (sorted keys are not used: pydantic's order is stable)."""
    return json.dumps(schema_for(kind), indent=2, ensure_ascii=False) + "\n"


def write_schemas(dest: Path, kinds: dict[str, ProfileKind] | None = None) -> list[Path]:
    """Write ``<dest>/<kind>.schema.json`` for every kind; returns the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in (kinds or PROFILE_KINDS).values():
        path = dest / f"{kind.name}.schema.json"
        path.write_text(render(kind))
        written.append(path)
    return written


def stale_schemas(dest: Path, kinds: dict[str, ProfileKind] | None = None) -> list[str]:
    """Kinds whose schema file in ``dest`` is missing or differs from the model."""
    out = []
    for kind in (kinds or PROFILE_KINDS).values():
        path = dest / f"{kind.name}.schema.json"
        if not path.is_file() or path.read_text() != render(kind):
            out.append(kind.name)
    return out
