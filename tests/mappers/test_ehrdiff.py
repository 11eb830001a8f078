"""The comparison of shadow mode and reconciliation: the elements we own, by JSON Patch."""

from __future__ import annotations

from mappers.ehrdiff import owned_diff

OURS = {
    "resourceType": "MedicationRequest",
    "id": "local-1",
    "status": "draft",
    "intent": "proposal",
    "subject": {"reference": "urn:uuid:0b7e"},
    "identifier": [{"system": "https://x.example/sid/checkout", "value": "chk-1"}],
}


def test_server_bookkeeping_references_and_ehr_only_elements_are_no_difference() -> None:
    theirs = {
        **OURS,
        "id": "9001",
        "meta": {"versionId": "3", "lastUpdated": "2026-12-07T10:00:00Z"},
        "text": {"status": "generated", "div": "<div/>"},
        "subject": {"reference": "Patient/123"},
        "note": [{"text": "added by a clinician"}],
    }
    assert owned_diff(theirs, OURS) == []


def test_a_changed_owned_element_is_a_replace_from_the_ehr_to_ours() -> None:
    theirs = {**OURS, "status": "cancelled"}
    assert owned_diff(theirs, OURS) == [{"op": "replace", "path": "/status", "value": "draft"}]


def test_an_owned_element_the_ehr_lacks_is_an_add() -> None:
    theirs = {k: v for k, v in OURS.items() if k != "intent"}
    assert owned_diff(theirs, OURS) == [{"op": "add", "path": "/intent", "value": "proposal"}]


def test_the_inputs_are_not_modified() -> None:
    theirs = {**OURS, "subject": {"reference": "Patient/123"}}
    owned_diff(theirs, OURS)
    assert theirs["subject"] == {"reference": "Patient/123"}
    assert OURS["subject"] == {"reference": "urn:uuid:0b7e"}
