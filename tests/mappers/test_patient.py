"""Tests for mappers.patient.merge_patient: intake owns demographics, checkout fills gaps,
identifiers from every source are kept."""

from __future__ import annotations

import copy
from typing import Any

from mappers.patient import Source
from mappers.patient import merge_patient as merge_by_ownership
from mappers.validation import resource_problems

SID = "https://fhir-gateway.example.org/sid"
ABSENT_NAME = {
    "extension": [
        {
            "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
            "valueCode": "unknown",
        }
    ]
}


#: What the bundled profiles let each source own (GLP-1 intake; checkout plans).
OWNS: dict[str, set[str]] = {
    "intake": {
        "name",
        "gender",
        "birthDate",
        "birthsex",
        "address",
        "telecom.phone",
        "telecom.email",
    },
    "checkout": set(),
}


def merge_patient(
    existing: dict[str, Any], incoming: dict[str, Any], *, source: Source
) -> dict[str, Any]:
    """The merged Patient with the bundled profiles' ownership."""
    return merge_by_ownership(existing, incoming, source=source, owns=OWNS[source]).patient


def intake_patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "pat-1",
        "extension": [
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
                "valueCode": "F",
            }
        ],
        "identifier": [
            {"system": f"{SID}/patient-id", "value": "pat-1"},
            {"system": f"{SID}/external-patient-id", "value": "app-user-8812"},
        ],
        "name": [{"use": "official", "family": "Rivera", "given": ["Jordan"]}],
        "telecom": [
            {"system": "phone", "value": "+14155552671"},
            {"system": "email", "value": "jordan.rivera@example.com"},
        ],
        "gender": "female",
        "birthDate": "1988-04-12",
        "address": [
            {"use": "home", "line": ["100 Market St"], "city": "San Francisco", "state": "CA"}
        ],
    }


def checkout_patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "pat-1",
        "identifier": [
            {"system": f"{SID}/patient-id", "value": "pat-1"},
            {"system": f"{SID}/stripe-customer", "value": "cus_1"},
        ],
        "name": [{"use": "official", "text": "J. Rivera", "family": "Rivera", "given": ["J."]}],
        "gender": "unknown",
        "telecom": [
            {"system": "phone", "value": "+14155550000"},
            {"system": "email", "value": "other@example.com"},
            {"system": "sms", "value": "+14155550000"},
        ],
        "address": [{"use": "billing", "line": ["1 Billing Rd"], "city": "Oakland", "state": "CA"}],
    }


def test_checkout_does_not_overwrite_intake_demographics() -> None:
    merged = merge_patient(intake_patient(), checkout_patient(), source="checkout")
    original = intake_patient()
    for element in ("name", "gender", "birthDate", "extension"):
        assert merged[element] == original[element], element
    # the checkout's billing address is another address (per use), not a replacement
    assert merged["address"][0] == original["address"][0]
    assert [a["use"] for a in merged["address"]] == ["home", "billing"]


def test_checkout_keeps_the_intakes_phone_and_email() -> None:
    merged = merge_patient(intake_patient(), checkout_patient(), source="checkout")
    phone_email = [t for t in merged["telecom"] if t["system"] in ("phone", "email")]
    assert phone_email == intake_patient()["telecom"]


def test_identifiers_are_unioned_without_duplicates() -> None:
    merged = merge_patient(intake_patient(), checkout_patient(), source="checkout")
    assert merged["identifier"] == [
        {"system": f"{SID}/patient-id", "value": "pat-1"},
        {"system": f"{SID}/external-patient-id", "value": "app-user-8812"},
        {"system": f"{SID}/stripe-customer", "value": "cus_1"},
    ]


def test_intake_after_checkout_replaces_the_demographics() -> None:
    merged = merge_patient(checkout_patient(), intake_patient(), source="intake")
    intake = intake_patient()
    for element in ("name", "gender", "birthDate", "extension"):
        assert merged[element] == intake[element], element
    assert intake["address"][0] in merged["address"]
    # intake replaces phone and email; contact points of other systems stay
    assert {"system": "sms", "value": "+14155550000"} in merged["telecom"]
    for contact in intake["telecom"]:
        assert contact in merged["telecom"]
    assert {"system": f"{SID}/stripe-customer", "value": "cus_1"} in merged["identifier"]
    assert resource_problems(merged) == []


def test_checkout_fills_gaps_an_unknown_gender_and_an_absent_name() -> None:
    sparse = {
        "resourceType": "Patient",
        "id": "pat-1",
        "identifier": [{"system": f"{SID}/patient-id", "value": "pat-1"}],
        "name": [ABSENT_NAME],
        "gender": "unknown",
    }
    incoming = checkout_patient()
    incoming["gender"] = "female"  # a processor that knows it
    merged = merge_patient(sparse, incoming, source="checkout")
    assert merged["name"] == incoming["name"]
    assert merged["gender"] == "female"
    assert merged["address"] == incoming["address"]


def test_checkout_with_an_absent_name_keeps_the_known_one() -> None:
    incoming = checkout_patient()
    incoming["name"] = [ABSENT_NAME]
    merged = merge_patient(intake_patient(), incoming, source="checkout")
    assert merged["name"] == intake_patient()["name"]


def test_merge_does_not_modify_its_inputs() -> None:
    existing, incoming = intake_patient(), checkout_patient()
    before = copy.deepcopy((existing, incoming))
    merged = merge_patient(existing, incoming, source="intake")
    merged["identifier"].append({"system": "x", "value": "y"})
    merged["name"][0]["family"] = "Changed"
    assert (existing, incoming) == before
