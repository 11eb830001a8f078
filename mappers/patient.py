"""Merging what several sources say about one canonical Patient, by profile ownership.

Each source's profile lists the Patient elements it *owns* (``patient.owns`` of an intake
or checkout profile; the lint refuses an element owned by both kinds). For each element:

==========================================  ==============================================
situation                                   result
==========================================  ==============================================
incoming has no value (or a placeholder:    existing kept
``gender: unknown``, a data-absent name,
birthsex ``UNK``, a data-absent birthDate)
existing has no value (or a placeholder)    incoming set (a fill, no conflict)
values equal, or saying the same (names:   nothing changes (an owner's or the same
same family, given, prefix and suffix;      source's wording of it is kept)
contact points: the same values)
same source as the existing value           incoming replaces it (a correction)
incoming source owns the element            incoming replaces it; **conflict**: the
                                            existing value lost (``replaced_existing``)
otherwise                                   existing kept; **conflict**: the incoming
                                            value lost (``kept_existing``)
==========================================  ==============================================

Every conflict is returned with the losing value so the caller keeps it (a conflict
record, and the Provenance of the message names it), never silently dropped.
Identifiers from every source are kept (union by ``system|value``); contact points of
systems other than phone and email are kept as they are.

Elements: ``name``, ``gender``, ``birthDate`` (with ``_birthDate``), ``birthsex`` (the US
Core birthsex extension), ``address`` (compared per ``use``: ``address.home``,
``address.billing``; owning ``address`` owns every use), ``telecom.phone``,
``telecom.email``.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Source = Literal["intake", "checkout"]

US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"

ELEMENTS = ("name", "gender", "birthDate", "birthsex", "address", "telecom.phone", "telecom.email")


@dataclass(frozen=True)
class ElementConflict:
    """Two sources disagree on one Patient element.

    Attributes:
        element: the element (``birthDate``, ``telecom.phone``...).
        outcome: ``kept_existing`` (the incoming value lost) or ``replaced_existing``.
        kept_source: the source whose value the Patient now has.
        lost_source: the source whose value lost (``unknown`` when not recorded).
        lost_value: the losing value as FHIR JSON (PHI: store it, never log it).
    """

    element: str
    outcome: Literal["kept_existing", "replaced_existing"]
    kept_source: str
    lost_source: str
    lost_value: Any


@dataclass
class MergeResult:
    """The merged Patient, who now owns each element's value, and the conflicts."""

    patient: dict[str, Any]
    sources: dict[str, str]
    conflicts: list[ElementConflict]


def get_element(patient: Mapping[str, Any], element: str) -> Any:
    """The value of ``element`` in ``patient`` as JSON, or None when absent.

    ``address.<use>`` is the addresses of one ``use`` (home, billing...): a billing address
    from a checkout and a home address from an intake are different elements.
    """
    if element.startswith("address."):
        use = element.split(".", 1)[1]
        found = [a for a in patient.get("address", []) if a.get("use", "home") == use]
        return found or None
    if element == "birthsex":
        ext = [e for e in patient.get("extension", []) if e.get("url") == US_CORE_BIRTHSEX]
        return ext[0] if ext else None
    if element.startswith("telecom."):
        system = element.split(".", 1)[1]
        points = [t for t in patient.get("telecom", []) if t.get("system") == system]
        return points or None
    if element == "birthDate":
        if "birthDate" in patient:
            return patient["birthDate"]
        return {"_birthDate": patient["_birthDate"]} if "_birthDate" in patient else None
    return patient.get(element)


def set_element(patient: dict[str, Any], element: str, value: Any) -> None:
    """Set ``element`` to ``value`` (as returned by :func:`get_element`) in place."""
    if element.startswith("address."):
        use = element.split(".", 1)[1]
        others = [a for a in patient.get("address", []) if a.get("use", "home") != use]
        merged = list(value or []) + others if use == "home" else others + list(value or [])
        if merged:
            patient["address"] = merged
        else:
            patient.pop("address", None)
        return
    if element == "birthsex":
        others = [e for e in patient.get("extension", []) if e.get("url") != US_CORE_BIRTHSEX]
        patient["extension"] = ([value] if value else []) + others
        if not patient["extension"]:
            del patient["extension"]
        return
    if element.startswith("telecom."):
        system = element.split(".", 1)[1]
        others = [t for t in patient.get("telecom", []) if t.get("system") != system]
        merged = others + list(value or [])
        order = {"phone": 0, "email": 1}
        merged.sort(key=lambda t: order.get(t.get("system", ""), 2))
        if merged:
            patient["telecom"] = merged
        else:
            patient.pop("telecom", None)
        return
    if element == "birthDate":
        patient.pop("birthDate", None)
        patient.pop("_birthDate", None)
        if isinstance(value, dict):
            patient["_birthDate"] = value["_birthDate"]
        elif value is not None:
            patient["birthDate"] = value
        return
    if value is None:
        patient.pop(element, None)
    else:
        patient[element] = value


def is_placeholder(element: str, value: Any) -> bool:
    """True for values that only say "not known" (they never win over a real value)."""
    if value is None:
        return True
    if element == "gender":
        return bool(value == "unknown")
    if element == "name":
        return all(set(n) <= {"extension"} for n in value)
    if element == "birthsex":
        return bool(value.get("valueCode") == "UNK")
    if element == "birthDate":
        return isinstance(value, dict)
    return False


def says_the_same(element: str, a: Any, b: Any) -> bool:
    """True when two values of ``element`` differ only in wording that carries nothing
    else: a HumanName's ``text``/``use``/``period`` (the same ``family``, ``given``,
    ``prefix`` and ``suffix``), a ContactPoint's ``use``/``rank`` (the same ``value``s).

    A checkout that names "Jordan Rivera" (with ``text``) and a phone without ``use`` says
    what the intake said (https://hl7.org/fhir/R4/datatypes.html#HumanName,
    https://hl7.org/fhir/R4/datatypes.html#ContactPoint): not a conflict.
    """
    if not isinstance(a, list) or not isinstance(b, list):
        return False
    if element == "name":

        def name_key(n: Any) -> tuple[Any, ...]:
            n = n if isinstance(n, dict) else {}
            return tuple(
                (n.get(k) if k == "family" else tuple(n.get(k) or []))
                for k in ("family", "given", "prefix", "suffix")
            )

        return sorted(map(name_key, a), key=repr) == sorted(map(name_key, b), key=repr)
    if element.startswith("telecom."):

        def values(points: list[Any]) -> set[Any]:
            return {p.get("value") for p in points if isinstance(p, dict)}

        return values(a) == values(b)
    return False


def merge_patient(
    existing: dict[str, Any],
    incoming: dict[str, Any],
    *,
    source: Source,
    owns: Collection[str],
    sources: Mapping[str, str] | None = None,
) -> MergeResult:
    """Merge ``incoming`` (a Patient mapped from one message) into ``existing``.

    Args:
        existing: the stored Patient (R4 JSON); not modified.
        incoming: the Patient the new message maps to (same ``id``).
        source: which kind of message ``incoming`` came from.
        owns: the elements ``source`` owns (its profile's ``patient.owns``).
        sources: element -> the source that set its current value (unknown elements are
            treated as set by an unknown source).

    Returns:
        The :class:`MergeResult` (rules in the module docstring).
    """
    merged = copy.deepcopy(existing)
    now_sources = dict(sources or {})
    conflicts: list[ElementConflict] = []

    seen = {(i.get("system"), i.get("value")) for i in merged.get("identifier", [])}
    for ident in incoming.get("identifier", []):
        if (ident.get("system"), ident.get("value")) not in seen:
            merged.setdefault("identifier", []).append(ident)
            seen.add((ident.get("system"), ident.get("value")))

    uses = sorted({a.get("use", "home") for p in (merged, incoming) for a in p.get("address", [])})
    elements = [e for e in ELEMENTS if e != "address"] + [f"address.{u}" for u in uses]
    for element in elements:
        owned = element in owns or (element.startswith("address.") and "address" in owns)
        new = get_element(incoming, element)
        old = get_element(merged, element)
        if is_placeholder(element, new):
            if old is None and new is not None:
                set_element(merged, element, copy.deepcopy(new))
                now_sources[element] = source
            continue
        if is_placeholder(element, old):
            set_element(merged, element, copy.deepcopy(new))
            now_sources[element] = source
            continue
        if new == old or says_the_same(element, new, old):
            if owned or now_sources.get(element, "unknown") == source:
                if new != old:
                    set_element(merged, element, copy.deepcopy(new))
                now_sources[element] = source
            continue
        old_source = now_sources.get(element, "unknown")
        if old_source == source:
            set_element(merged, element, copy.deepcopy(new))
        elif owned:
            set_element(merged, element, copy.deepcopy(new))
            now_sources[element] = source
            conflicts.append(ElementConflict(element, "replaced_existing", source, old_source, old))
        else:
            conflicts.append(ElementConflict(element, "kept_existing", old_source, source, new))
    return MergeResult(merged, now_sources, conflicts)


def element_path(element: str) -> str:
    """The FHIRPath of an element name: ``telecom.phone`` ->
    ``Patient.telecom.where(system='phone')``, ``address.billing`` ->
    ``Patient.address.where(use='billing')``, ``birthsex`` -> the extension."""
    if element.startswith("telecom."):
        return f"Patient.telecom.where(system='{element.split('.', 1)[1]}')"
    if element.startswith("address."):
        return f"Patient.address.where(use='{element.split('.', 1)[1]}')"
    if element == "birthsex":
        return f"Patient.extension('{US_CORE_BIRTHSEX}')"
    return f"Patient.{element}"


def element_sources(patient: Mapping[str, Any], source: Source) -> dict[str, str]:
    """For a Patient created from one message: every element it has -> ``source``."""
    elements = [e for e in ELEMENTS if e != "address"]
    elements += sorted({f"address.{a.get('use', 'home')}" for a in patient.get("address", [])})
    return {e: source for e in elements if get_element(patient, e) is not None}
