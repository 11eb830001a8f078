"""Code tables as FHIR ConceptMaps (R4 https://hl7.org/fhir/R4/conceptmap.html).

Every code table a profile uses (an EHR's local codes, free-text answer synonyms) is a
ConceptMap, kept in ``profiles/concept-maps/`` either as ConceptMap JSON or as a CSV that
compiles to one (one row per mapping)::

    source_system,source_code,source_display,target_system,target_code,target_display,equivalence
    http://www.nlm.nih.gov/research/umls/rxnorm,1991306,,urn:oid:1.2.3,OZ025,,equivalent

A CSV's ConceptMap gets ``url = urn:fhir-gateway:concept-map:<file stem>`` and
``name``/``id`` from the stem. Both forms are validated with ``fhir.resources.R4B`` and
compiled into a :class:`CompiledConceptMap` for lookups (``$translate`` semantics:
https://hl7.org/fhir/R4/conceptmap-operation-translate.html, restricted to the groups'
explicit elements; ``unmapped`` modes are not supported and are refused by the loader).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B.conceptmap import ConceptMap
from pydantic import ValidationError

from mappers.codesyntax import code_syntax_problem
from mappers.errors import Problem

CSV_COLUMNS = (
    "source_system",
    "source_code",
    "source_display",
    "target_system",
    "target_code",
    "target_display",
    "equivalence",
)

#: Equivalences that mean "use the target code" (R4 concept-map-equivalence).
USABLE_EQUIVALENCES = frozenset(
    {"relatedto", "equivalent", "equal", "wider", "subsumes", "narrower", "specializes", "inexact"}
)


@dataclass(frozen=True, slots=True)
class Translation:
    """One target of a source code."""

    system: str
    code: str
    display: str | None
    equivalence: str

    def to_coding(self) -> dict[str, str]:
        """The target as a FHIR Coding."""
        out = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


@dataclass
class CompiledConceptMap:
    """A ConceptMap ready for lookups.

    Attributes:
        name: the file stem profiles refer to it by.
        url: the ConceptMap's canonical URL.
        resource: the ConceptMap as R4 JSON.
        table: ``(source system, source code) -> targets`` (usable equivalences only).
        by_code: ``casefolded source code -> targets`` across every group, for free-text
            lookups (answer synonyms).
    """

    name: str
    url: str
    resource: dict[str, Any]
    table: dict[tuple[str, str], list[Translation]] = field(default_factory=dict)
    by_code: dict[str, list[Translation]] = field(default_factory=dict)

    def translate(self, system: str, code: str) -> list[Translation]:
        """The targets of ``system|code``; empty when the map has none."""
        return self.table.get((system, code), [])

    def lookup_text(self, text: str) -> list[Translation]:
        """The targets of a free-text source code (case- and space-insensitive)."""
        return self.by_code.get(_fold(text), [])

    @property
    def source_systems(self) -> set[str]:
        """Every group's source system."""
        return {s for s, _ in self.table}


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def compile_concept_map(name: str, resource: dict[str, Any]) -> CompiledConceptMap:
    """Compile a validated ConceptMap (R4 JSON) into lookup tables."""
    compiled = CompiledConceptMap(name=name, url=str(resource.get("url", "")), resource=resource)
    for group in resource.get("group", []):
        source, target = group.get("source", ""), group.get("target", "")
        for element in group.get("element", []):
            for tgt in element.get("target", []):
                eq = tgt.get("equivalence", "equivalent")
                if eq not in USABLE_EQUIVALENCES or not tgt.get("code"):
                    continue
                t = Translation(target, tgt["code"], tgt.get("display"), eq)
                compiled.table.setdefault((source, element["code"]), []).append(t)
                compiled.by_code.setdefault(_fold(element["code"]), []).append(t)
    return compiled


def concept_map_from_csv(name: str, text: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Compile CSV rows (columns :data:`CSV_COLUMNS`, a header row first) to ConceptMap JSON.

    Returns:
        ``(resource, problems)``; ``resource`` is None when there are problems. Problem
        locations are ``line <n>`` (1-based, header is line 1). A code that is not of its
        system's form (RxNorm, LOINC, SNOMED CT; :mod:`mappers.codesyntax`) or a ``<...>``
        placeholder is a ``code-syntax`` problem.
    """
    problems: list[Problem] = []
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(reader.fieldnames or ())
    missing = [
        c
        for c in CSV_COLUMNS
        if c not in header and c not in ("source_display", "target_display", "equivalence")
    ]
    if missing:
        return None, [Problem("line 1", "csv_header", f"missing column(s): {', '.join(missing)}")]
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in reader:
        line = reader.line_num
        values = {k: (row.get(k) or "").strip() for k in CSV_COLUMNS}
        empty = [
            k
            for k in ("source_system", "source_code", "target_system", "target_code")
            if not values[k]
        ]
        if empty:
            problems.append(Problem(f"line {line}", "csv_row", f"empty {', '.join(empty)}"))
            continue
        for side in ("source", "target"):
            wrong = code_syntax_problem(values[f"{side}_system"], values[f"{side}_code"])
            if wrong is not None:
                problems.append(
                    Problem(
                        f"line {line}",
                        "code-syntax",
                        f"{side}_code: {values[f'{side}_system']}: {wrong}",
                    )
                )
        elements = groups.setdefault((values["source_system"], values["target_system"]), {})
        element = elements.setdefault(
            values["source_code"], {"code": values["source_code"], "target": []}
        )
        if values["source_display"]:
            element["display"] = values["source_display"]
        target: dict[str, Any] = {
            "code": values["target_code"],
            "equivalence": values["equivalence"] or "equivalent",
        }
        if values["target_display"]:
            target["display"] = values["target_display"]
        element["target"].append(target)
    if problems:
        return None, problems
    resource: dict[str, Any] = {
        "resourceType": "ConceptMap",
        "id": name,
        "url": f"urn:fhir-gateway:concept-map:{name}",
        "name": name,
        "status": "active",
        "group": [
            {"source": s, "target": t, "element": list(elements.values())}
            for (s, t), elements in groups.items()
        ],
    }
    return resource, []


def parse_concept_map(
    name: str, filename: str, raw: bytes
) -> tuple[CompiledConceptMap | None, list[Problem]]:
    """Read one ``.json`` or ``.csv`` ConceptMap file and compile it.

    Raises nothing: every problem (bad JSON/CSV, not a ConceptMap, R4B validation errors,
    one source code mapped twice to different targets in the same group) is returned with
    its location inside the file.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, [Problem("", "encoding", "a concept map file must be UTF-8")]
    if filename.endswith(".csv"):
        resource, problems = concept_map_from_csv(name, text)
        if resource is None:
            return None, problems
    else:
        try:
            resource = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, [Problem(f"line {exc.lineno}", "invalid_json", exc.msg)]
        if not isinstance(resource, dict) or resource.get("resourceType") != "ConceptMap":
            return None, [Problem("resourceType", "not_a_concept_map", "expected a ConceptMap")]
    try:
        ConceptMap.model_validate(resource)
    except ValidationError as exc:
        return None, [
            Problem(".".join(str(p) for p in err["loc"]), err["type"], err["msg"])
            for err in exc.errors(include_input=False, include_url=False)
        ]
    problems = list(_conflicts(resource.get("group", [])))
    if problems:
        return None, problems
    return compile_concept_map(name, resource), []


def _conflicts(groups: Iterable[dict[str, Any]]) -> Iterable[Problem]:
    for gi, group in enumerate(groups):
        seen: dict[str, int] = {}
        for ei, element in enumerate(group.get("element", [])):
            code = element.get("code")
            if code in seen:
                yield Problem(
                    f"group[{gi}].element[{ei}]",
                    "duplicate_source_code",
                    f"source code {code!r} is mapped twice in this group "
                    f"(also element[{seen[code]}])",
                )
            else:
                seen[code] = ei
