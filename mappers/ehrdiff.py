"""Comparing our FHIR resource with the one an EHR holds (issue 16: shadow mode and
reconciliation), as an RFC 6902 JSON Patch (https://www.rfc-editor.org/rfc/rfc6902) made
by the ``jsonpatch`` library.

Only the elements we own are compared: the top-level elements our resource carries (what
the gateway sends, after the Patient ownership merge and the target's overrides). An
element only the EHR has (an MRN, a note, a field another system owns) is not a
difference. Left out on both sides:

* ``id``, ``meta`` and ``text``: the server's bookkeeping and narrative;
* the value of every ``reference``: ours are local ids or ``urn:uuid:`` fullUrls, the
  EHR's are its own ids, so references are compared by presence and the other elements
  of the Reference (``display``, ``type``, ``identifier``), not by id.

The patch goes from the EHR's resource to ours: applied to what the EHR holds, it gives
what the gateway would write.
"""

from __future__ import annotations

from typing import Any

import jsonpatch

#: Top-level elements never compared.
IGNORED_ELEMENTS = frozenset({"id", "meta", "text"})

#: What a reference's value is replaced by before comparing.
REFERENCE_PLACEHOLDER = "(reference)"


def _strip_references(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (REFERENCE_PLACEHOLDER if k == "reference" else _strip_references(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_strip_references(v) for v in node]
    return node


def comparable(resource: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``resource`` without :data:`IGNORED_ELEMENTS`, references as
    :data:`REFERENCE_PLACEHOLDER` (the input is not modified)."""
    return {k: _strip_references(v) for k, v in resource.items() if k not in IGNORED_ELEMENTS}


def owned_diff(ehr: dict[str, Any], ours: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON Patch from the EHR's resource to ours, over the elements ours carries.

    Args:
        ehr: the resource as the EHR returned it.
        ours: the resource as the gateway would send it.

    Returns:
        RFC 6902 operations (``[]``: no difference in the elements we own). Paths are
        JSON Pointers into the resource (``/name/0/family``); values are FHIR content
        (PHI: keep the patch where resources are kept, never in logs).

    >>> owned_diff({"resourceType": "Patient", "id": "9", "gender": "male", "note": "x"},
    ...            {"resourceType": "Patient", "id": "a", "gender": "female"})
    [{'op': 'replace', 'path': '/gender', 'value': 'female'}]
    """
    mine = comparable(ours)
    theirs = comparable(ehr)
    owned = {k: theirs[k] for k in mine if k in theirs}
    patch: list[dict[str, Any]] = jsonpatch.make_patch(owned, mine).patch
    return patch
