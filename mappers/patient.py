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
same family, given, prefix and suffix;      source's wording of it is kept); a phone
contact points: the same values, a phone    extension only one side has is added to
extension on one side only)                 the kept value (a fill, no conflict)
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

A phone is its E.164 ``value`` plus, when one was given, its extension in the FHIR core
extension ``contactpoint-extension`` on the ContactPoint (:func:`phone_contact_point`). The
same number with and without an extension is the same line (the extension says where to
go once connected), so it is one phone; the same number with two different extensions is
a conflict.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: Who sent a Patient: a live channel, or a bulk import of another system's FHIR
#: (``migration``: owns nothing, fills what is missing).
Source = Literal["intake", "checkout", "migration"]

US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"

ELEMENTS = ("name", "gender", "birthDate", "birthsex", "address", "telecom.phone", "telecom.email")

#: FHIR core extension for "the number that may be dialed ... after successfully connecting
#: to a private phone network" (valueString; R4 context: ContactPoint; "ContactPoint.value
#: SHOULD still be populated"): http://hl7.org/fhir/R4/extension-contactpoint-extension.html
CONTACTPOINT_EXTENSION = "http://hl7.org/fhir/StructureDefinition/contactpoint-extension"


def phone_contact_point(number: str, *, use: str | None = None) -> dict[str, Any]:
    """A normalized phone (``+14155552671`` or ``+14155552671;ext=12``, as
    :func:`mappers.normalize.normalize_phone` returns) -> a FHIR ContactPoint.

    ``value`` is the E.164 number alone, so EHRs that match or dial ``value`` get a number
    they can use; the extension goes in the core ``contactpoint-extension`` extension
    (:data:`CONTACTPOINT_EXTENSION`), as R4 has no element for it.

    Args:
        number: the normalized phone.
        use: ``ContactPoint.use`` (home | work | temp | old | mobile), or None.

    Returns:
        ``{"extension": [...], "system": "phone", "value": "+14155552671", "use": ...}``.
    """
    e164, _, extension = number.partition(";ext=")
    point: dict[str, Any] = {}
    if extension:
        point["extension"] = [{"url": CONTACTPOINT_EXTENSION, "valueString": extension}]
    point["system"] = "phone"
    point["value"] = e164
    if use:
        point["use"] = use
    return point


def phone_extension(point: Mapping[str, Any]) -> str | None:
    """The extension of a phone ContactPoint (``contactpoint-extension``), or None."""
    for ext in point.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == CONTACTPOINT_EXTENSION:
            value = ext.get("valueString")
            return value if isinstance(value, str) else None
    return None


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
        extensions_a, extensions_b = _extensions_by_value(a), _extensions_by_value(b)
        if extensions_a.keys() != extensions_b.keys():
            return False
        # the same number with an extension on one side only is the same line
        return all(
            not extensions_a[v] or not extensions_b[v] or extensions_a[v] == extensions_b[v]
            for v in extensions_a
        )
    return False


def _extensions_by_value(points: list[Any]) -> dict[Any, set[str]]:
    """ContactPoint value -> the phone extensions given with it."""
    out: dict[Any, set[str]] = {}
    for p in points:
        if isinstance(p, dict):
            extension = phone_extension(p)
            out.setdefault(p.get("value"), set()).update([extension] if extension else [])
    return out


def with_details(element: str, kept: Any, other: Any) -> Any:
    """``kept`` (a value that says the same as ``other``) with the detail only ``other``
    has: a phone extension, for a ContactPoint of ``kept`` with the same value and none.
    Other elements: ``kept`` unchanged."""
    if not element.startswith("telecom.") or not isinstance(kept, list):
        return kept
    extensions = _extensions_by_value(other if isinstance(other, list) else [])
    out = []
    for point in kept:
        found = extensions.get(point.get("value")) if isinstance(point, dict) else None
        if found and len(found) == 1 and phone_extension(point) is None:
            point = {
                "extension": [
                    *point.get("extension", []),
                    {"url": CONTACTPOINT_EXTENSION, "valueString": next(iter(found))},
                ],
                **{k: v for k, v in point.items() if k != "extension"},
            }
        out.append(point)
    return out


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
            same_source = now_sources.get(element, "unknown") == source
            if owned or same_source:
                # a correction by the same source is taken as sent; an owner's value keeps
                # a detail only the other had (a phone extension)
                value = new if same_source else with_details(element, new, old)
                if value != old:
                    set_element(merged, element, copy.deepcopy(value))
                now_sources[element] = source
            else:
                value = with_details(element, old, new)
                if value != old:
                    set_element(merged, element, copy.deepcopy(value))
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
