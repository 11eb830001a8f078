"""Per-EHR rewrites of outgoing resources, from an EHR target profile's ``overrides``.

:func:`target_transform` returns the function the delivery worker passes as
``transform=`` to :func:`mappers.bundle.rest_calls` (built once per target and profile
set, reused for every delivery): it is applied to each resource copy after references
were rewritten, so it sees ``urn:uuid:`` references for
resources in the Bundle and ``Type/<remote id>`` or ``Type?identifier=...`` for the others.
In order:

1. **resource types the target does not receive** (not in ``send``, or in
   ``overrides.skip``): references to them are removed where they are optional list
   entries (``Provenance.target``, ``derivedFrom``, ``supportingInformation``...) or the
   value of an extension (``flag-detail``), so the EHR is never asked to resolve a
   resource it will not get;
2. **identifier systems**: each identifier of system ``from`` is also sent under the EHR's
   system ``to`` (ours stays first: ``ifNoneExist`` deduplicates on it). R4
   QuestionnaireResponse has one identifier (0..1), so it is left as it is;
3. **extensions** added to every resource of a type;
4. **code translations** through ConceptMaps (https://hl7.org/fhir/R4/conceptmap.html):
   each Coding whose ``system|code`` the map translates gets the target coding added
   after it (``add``) or is replaced by it (``replace``). Contained resources are
   translated too (a plan's contained Medication).

The input resource is a copy made by the Bundle builder; it is changed in place and
returned. Nothing here does I/O.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from mappers.conceptmap import CompiledConceptMap
from mappers.profiles import EhrTargetProfile
from mappers.profiles.overrides import CodeTranslation

Transform = Callable[[dict[str, Any]], dict[str, Any]]

_REF_TYPE = re.compile(r"^([A-Z][A-Za-z]+)[/?]")
#: Every typed reference in a resource's JSON text (``json.dumps`` spacing).
_REFS_IN_JSON = re.compile(r'"reference": "([A-Z][A-Za-z]+)[/?]')


def received_types(target: EhrTargetProfile) -> set[str]:
    """The resource types ``target`` receives: ``send`` minus ``overrides.skip``."""
    return {str(t) for t in target.send} - {str(t) for t in target.overrides.skip}


def target_transform(
    target: EhrTargetProfile, concept_maps: Mapping[str, CompiledConceptMap]
) -> Transform:
    """The per-resource rewrite for ``target`` (see the module docstring).

    Args:
        target: the EHR target profile.
        concept_maps: the profile set's concept maps by name (the lint guarantees every
            ``code_translations[].concept_map`` exists).

    Returns:
        ``transform(resource) -> resource``.
    """
    receives = received_types(target)
    overrides = target.overrides
    translations = [
        (t, concept_maps[t.concept_map])
        for t in overrides.code_translations
        if t.concept_map in concept_maps
    ]

    def transform(resource: dict[str, Any]) -> dict[str, Any]:
        rtype = str(resource.get("resourceType", ""))
        if _refers_to_unreceived(resource, receives):
            _drop_unreceived(resource, receives)
        _add_identifiers(resource, rtype, overrides.identifier_systems)
        for ext in overrides.extensions:
            if ext.resource_type == rtype:
                resource.setdefault("extension", []).append(copy.deepcopy(ext.extension))
        for spec, cmap in translations:
            _translate(resource, rtype, spec, cmap)
        return resource

    return transform


def _ref_type(node: Any) -> str | None:
    ref = node.get("reference") if isinstance(node, dict) else None
    if isinstance(ref, str):
        m = _REF_TYPE.match(ref)
        return m.group(1) if m else None
    return None


def _refers_to_unreceived(resource: dict[str, Any], receives: set[str]) -> bool:
    """Whether any reference of ``resource`` names a type the target does not receive:
    one scan of its JSON text (C code) instead of a walk of about 100 nodes in Python
    for the usual resource, which refers only to types the target receives."""
    return any(t not in receives for t in _REFS_IN_JSON.findall(json.dumps(resource)))


def _drop_unreceived(node: Any, receives: set[str]) -> None:
    if isinstance(node, list):
        for child in node:
            _drop_unreceived(child, receives)
        return
    if not isinstance(node, dict):
        return
    for key in list(node):
        value = node[key]
        if isinstance(value, list):
            kept = []
            for entry in value:
                rtype = _ref_type(entry)
                if rtype is None and key == "extension" and isinstance(entry, dict):
                    rtype = _ref_type(entry.get("valueReference"))
                if rtype is not None and rtype not in receives:
                    continue
                kept.append(entry)
            if len(kept) != len(value):
                if kept:
                    node[key] = kept
                else:
                    del node[key]
                    continue
        _drop_unreceived(node.get(key), receives)


def _add_identifiers(resource: dict[str, Any], rtype: str, overrides: list[Any]) -> None:
    identifiers = resource.get("identifier")
    if not overrides or not isinstance(identifiers, list):
        return  # QuestionnaireResponse.identifier is a single Identifier (0..1)
    present = {(i.get("system"), i.get("value")) for i in identifiers}
    for spec in overrides:
        if spec.resource_types and rtype not in spec.resource_types:
            continue
        for ident in list(identifiers):
            if ident.get("system") == spec.from_ and (spec.to, ident.get("value")) not in present:
                copy_ = {k: v for k, v in ident.items() if k != "system"}
                identifiers.append({"system": spec.to, **copy_})
                present.add((spec.to, ident.get("value")))


def _translate(
    resource: dict[str, Any], rtype: str, spec: CodeTranslation, cmap: CompiledConceptMap
) -> None:
    for contained in resource.get("contained", []):
        if isinstance(contained, dict):
            _translate(contained, str(contained.get("resourceType", "")), spec, cmap)
    if spec.elements:
        for path in spec.elements:
            head, _, rest = path.partition(".")
            if head != rtype or not rest:
                continue
            for node in _walk_path(resource, rest.split(".")):
                _translate_concept(node, spec, cmap)
    else:
        _translate_everywhere(resource, spec, cmap)


def _walk_path(node: Any, parts: list[str]) -> list[Any]:
    nodes = [node]
    for part in parts:
        nxt: list[Any] = []
        for n in nodes:
            child = n.get(part) if isinstance(n, dict) else None
            if isinstance(child, list):
                nxt.extend(child)
            elif child is not None:
                nxt.append(child)
        nodes = nxt
    return nodes


def _translate_everywhere(node: Any, spec: CodeTranslation, cmap: CompiledConceptMap) -> None:
    if isinstance(node, list):
        for child in node:
            _translate_everywhere(child, spec, cmap)
    elif isinstance(node, dict):
        if isinstance(node.get("coding"), list):
            _translate_concept(node, spec, cmap)
        for key, value in node.items():
            if key not in ("coding", "contained"):
                _translate_everywhere(value, spec, cmap)


def _translate_concept(node: Any, spec: CodeTranslation, cmap: CompiledConceptMap) -> None:
    """Translate the codings of a CodeableConcept (or one Coding) in place."""
    if not isinstance(node, dict):
        return
    if "coding" not in node and "system" in node and "code" in node:
        targets = cmap.translate(str(node["system"]), str(node["code"]))
        if targets and spec.mode == "replace":
            node.clear()
            node.update(targets[0].to_coding())
        return
    codings = node.get("coding")
    if not isinstance(codings, list):
        return
    out: list[dict[str, Any]] = []
    for coding in codings:
        targets = cmap.translate(str(coding.get("system")), str(coding.get("code")))
        if spec.mode == "add" or not targets:
            out.append(coding)
        for t in targets:
            new = t.to_coding()
            if new not in out and new not in codings:
                out.append(new)
    node["coding"] = out
