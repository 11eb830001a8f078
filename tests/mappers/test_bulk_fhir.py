"""FHIR Bulk Data export lines -> stored resources (pure parts of the import)."""

from __future__ import annotations

import doctest
from typing import Any

import pytest

from mappers import bulk_fhir
from mappers.errors import MappingErrors
from mappers.identifiers import IdentifierSystems
from mappers.validation import resource_problems

SYSTEMS = IdentifierSystems("https://gw.example/sid")


def test_doctests() -> None:
    assert doctest.testmod(bulk_fhir).failed == 0


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "s", "value": "v"}]},
            "s|v",
        ),
        (
            {
                "resourceType": "QuestionnaireResponse",
                "id": "q1",
                "identifier": {"system": "s", "value": "v"},
            },
            "s|v",
        ),
        (
            {"resourceType": "MedicationRequest", "id": "m1", "identifier": [{"value": "v"}]},
            "old/MedicationRequest/m1",
        ),
        ({"resourceType": "Patient"}, None),
    ],
)
def test_business_id_is_the_first_identifier_else_source_type_and_id(
    data: dict[str, Any], expected: str | None
) -> None:
    assert bulk_fhir.business_id(data, "old") == expected


@pytest.mark.parametrize(
    ("reference", "parsed"),
    [
        ("Patient/123", ("Patient", "123")),
        ("https://old.example/fhir/Patient/a-1/_history/4", ("Patient", "a-1")),
        ("#med", None),
        ("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", None),
        ("not a reference", None),
    ],
)
def test_parse_reference(reference: str, parsed: tuple[str, str] | None) -> None:
    assert bulk_fhir.parse_reference(reference) == parsed


def test_references_to_patients_are_rewritten_and_others_become_logical() -> None:
    mr = {
        "resourceType": "MedicationRequest",
        "id": "mr-1",
        "status": "active",
        "intent": "order",
        "medicationReference": {"reference": "#med"},
        "contained": [{"resourceType": "Medication", "id": "med", "code": {"text": "x"}}],
        "subject": {"reference": "Patient/p1"},
        "requester": {"reference": "Practitioner/dr-1", "display": "Dr. Example"},
    }
    out = bulk_fhir.prepare_resource(
        mr, new_id="new-1", known={"p1": "gw-1"}, systems=SYSTEMS, source="old"
    )
    assert out["id"] == "new-1"
    assert out["subject"] == {"reference": "Patient/gw-1"}
    assert out["medicationReference"] == {"reference": "#med"}
    assert out["requester"] == {
        "display": "Dr. Example",
        "type": "Practitioner",
        "identifier": {
            "system": "https://gw.example/sid/migrated-id/old/Practitioner",
            "value": "dr-1",
        },
    }
    assert out["identifier"] == [
        {"system": "https://gw.example/sid/migrated-id/old/MedicationRequest", "value": "mr-1"}
    ]
    assert resource_problems(out) == []
    assert mr["subject"] == {"reference": "Patient/p1"}  # the input is not changed


def test_a_bundle_local_reference_is_refused() -> None:
    qr = {
        "resourceType": "QuestionnaireResponse",
        "id": "q",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "author": {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"},
    }
    with pytest.raises(MappingErrors) as err:
        bulk_fhir.prepare_resource(qr, new_id="n", known={"p1": "g"}, systems=SYSTEMS, source="o")
    assert [p.location for p in err.value.problems] == ["QuestionnaireResponse.author.reference"]


@pytest.mark.parametrize(
    ("subject", "code"),
    [
        (None, "missing_subject"),
        ({"reference": "Group/g1"}, "subject_not_patient"),
        ({"reference": "Patient/unknown"}, "unknown_patient"),
    ],
)
def test_subject_problems(subject: dict[str, str] | None, code: str) -> None:
    qr: dict[str, Any] = {"resourceType": "QuestionnaireResponse", "status": "completed"}
    if subject:
        qr["subject"] = subject
    [problem] = bulk_fhir.subject_problems(qr, {"p1": "g"})
    assert problem.code == code and problem.location.startswith("QuestionnaireResponse.subject")


def test_patient_is_normalized_and_an_unusable_phone_or_email_is_kept_as_exported() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"versionId": "9", "lastUpdated": "2024-01-01T00:00:00Z", "profile": ["x"]},
        "telecom": [
            {"system": "phone", "value": "415.555.2671 x12"},
            {"system": "email", "value": " A@Example.COM "},
        ],
        "address": [{"state": "texas"}, {"state": "Ontario", "country": "CA"}],
    }
    out, problems = bulk_fhir.normalize_patient(
        patient, patient_id="g1", systems=SYSTEMS, source="old"
    )
    assert problems == []
    assert out["meta"] == {"profile": ["x"]}
    assert out["identifier"][:2] == [
        {"system": "https://gw.example/sid/patient-id", "value": "g1"},
        {"system": "https://gw.example/sid/migrated-id/old/Patient", "value": "p1"},
    ]
    assert out["telecom"][0]["value"] == "+14155552671"
    assert out["telecom"][0]["extension"][0]["valueString"] == "12"
    assert out["telecom"][1]["value"] == "a@example.com"
    assert [a["state"] for a in out["address"]] == ["TX", "Ontario"]

    # Synthea's numbers (555 area code) and junk the old system held: kept, not refused;
    # an email that is not one is not a matching key
    patient["telecom"] = [
        {"system": "phone", "value": "555-718-2251"},
        {"system": "phone", "value": "call me"},
        {"system": "email", "value": "n/a"},
        {"system": "email", "value": "B@example.com"},
    ]
    patient["birthDate"] = "2999-01-01"
    out, problems = bulk_fhir.normalize_patient(
        patient, patient_id="g1", systems=SYSTEMS, source="old"
    )
    assert [(p.location, p.code) for p in problems] == [
        ("Patient.birthDate", "birth_date_in_future"),
    ]
    assert [t["value"] for t in out["telecom"]] == [
        "555-718-2251",
        "call me",
        "n/a",
        "b@example.com",
    ]
    assert bulk_fhir.patient_emails(out) == ["b@example.com"]

    patient["birthDate"] = "1974-12"  # a FHIR date with month precision is kept
    assert (
        bulk_fhir.normalize_patient(patient, patient_id="g", systems=SYSTEMS, source="o")[0][
            "birthDate"
        ]
        == "1974-12"
    )


def test_unsupported_type_is_named_and_original_time_prefers_authored() -> None:
    problem = bulk_fhir.unsupported_type_problem({"resourceType": "Observation"})
    assert problem is not None and "Observation" in problem.message
    assert bulk_fhir.unsupported_type_problem({"resourceType": "Patient"}) is None
    when = bulk_fhir.original_time(
        {"authoredOn": "2024-03-02", "meta": {"lastUpdated": "2024-03-03T10:00:00Z"}}
    )
    assert when is not None and when.isoformat() == "2024-03-03T10:00:00+00:00"
