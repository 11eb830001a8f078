"""Merging what several sources say about one canonical Patient.

The intake app owns demographics (the patient typed them in a form built for it); a
checkout only fills elements the Patient does not have yet. Identifiers from every source
are kept. Profile-driven ownership per element comes with the profile work.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

Source = Literal["intake", "checkout"]

_DEMOGRAPHICS = ("name", "gender", "birthDate", "address", "extension")


def merge_patient(
    existing: dict[str, Any], incoming: dict[str, Any], *, source: Source
) -> dict[str, Any]:
    """Merge ``incoming`` (a Patient mapped from one message) into ``existing``.

    Args:
        existing: the stored Patient (R4 JSON); not modified.
        incoming: the Patient the new message maps to (same ``id``).
        source: which kind of message ``incoming`` came from.

    Returns:
        The merged Patient. Identifiers: union by ``(system, value)``. Telecom: an
        intake replaces the contact points of the systems it sends; a checkout adds
        systems the Patient lacks. Name, gender, birthDate, address, extensions: an intake
        replaces them; a checkout fills them only when absent (or ``gender`` is
        ``unknown``, or the name is only a data-absent-reason).
    """
    merged = copy.deepcopy(existing)
    seen = {(i.get("system"), i.get("value")) for i in merged.get("identifier", [])}
    for ident in incoming.get("identifier", []):
        if (ident.get("system"), ident.get("value")) not in seen:
            merged.setdefault("identifier", []).append(ident)
            seen.add((ident.get("system"), ident.get("value")))

    old_telecom = merged.get("telecom", [])
    new_telecom = incoming.get("telecom", [])
    if source == "intake":
        systems = {t["system"] for t in new_telecom}
        merged_telecom = [t for t in old_telecom if t.get("system") not in systems] + new_telecom
    else:
        systems = {t.get("system") for t in old_telecom}
        merged_telecom = old_telecom + [t for t in new_telecom if t["system"] not in systems]
    if merged_telecom:
        merged["telecom"] = merged_telecom

    for element in _DEMOGRAPHICS:
        if element not in incoming:
            continue
        if source == "intake" or _absent(merged, element):
            merged[element] = copy.deepcopy(incoming[element])
    return merged


def _absent(patient: dict[str, Any], element: str) -> bool:
    value = patient.get(element)
    if not value:
        return True
    if element == "gender":
        return bool(value == "unknown")
    if element == "name":
        return all(set(n) <= {"extension"} for n in value)
    return False
