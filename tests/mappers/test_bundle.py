"""Tests for mappers.bundle: transaction Bundles for an EHR, and their responses."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mappers.bundle import (
    build_transaction_bundle,
    business_identifier,
    if_none_exist,
    parse_location,
    parse_transaction_response,
)
from mappers.validation import resource_problems

SID = "https://fhir-gateway.example.org/sid"
TAG_SYSTEM = f"{SID}/provenance"
PAT = "0b6c1d4e-0000-4000-8000-000000000001"
QR = "0b6c1d4e-0000-4000-8000-000000000002"
MR = "0b6c1d4e-0000-4000-8000-000000000003"
PROV = "0b6c1d4e-0000-4000-8000-000000000004"


def patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": PAT,
        "meta": {"versionId": "3", "lastUpdated": "2026-11-23T19:00:00Z", "profile": ["p"]},
        "identifier": [
            {"system": f"{SID}/patient-id", "value": PAT},
            {"system": f"{SID}/external-patient-id", "value": "app-user-8812"},
        ],
        "name": [{"family": "Rivera"}],
        "gender": "female",
    }


def questionnaire_response() -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse",
        "id": QR,
        "identifier": {"system": f"{SID}/intake-submission", "value": "sub-1"},
        "questionnaire": "https://fhir-gateway.example.org/fhir/Questionnaire/glp1|1",
        "status": "completed",
        "subject": {"reference": f"Patient/{PAT}"},
    }


def medication_request(supporting: list[str] | None = None) -> dict[str, Any]:
    mr: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": MR,
        "identifier": [{"system": f"{SID}/checkout-session", "value": "cs_1"}],
        "status": "draft",
        "intent": "proposal",
        "medicationCodeableConcept": {"text": "semaglutide"},
        "subject": {"reference": f"Patient/{PAT}"},
        "requester": {"reference": f"Patient/{PAT}"},
    }
    if supporting is not None:
        mr["supportingInformation"] = [{"reference": r} for r in supporting]
    return mr


def provenance(targets: list[str]) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "id": PROV,
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": PROV}]},
        "target": [{"reference": t} for t in targets],
        "recorded": "2026-11-23T19:06:00Z",
        "agent": [{"who": {"reference": f"Patient/{PAT}"}}],
    }


def build(
    resources: list[dict[str, Any]],
    *,
    remote_ids: dict[str, str] | None = None,
    outside: dict[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    return build_transaction_bundle(
        resources,
        remote_ids=remote_ids or {},
        outside_identifiers=outside or {},
        provenance_tag_system=TAG_SYSTEM,
    )


def entry(bundle: dict[str, Any], resource_type: str) -> dict[str, Any]:
    (found,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]
    return found


# --------------------------------------------------------------------------- entries


def test_every_entry_has_a_urn_uuid_full_url_and_no_local_id_or_version() -> None:
    bundle = build([patient(), questionnaire_response()])
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert [e["fullUrl"] for e in bundle["entry"]] == [f"urn:uuid:{PAT}", f"urn:uuid:{QR}"]
    pat = entry(bundle, "Patient")["resource"]
    assert "id" not in pat
    assert pat["meta"] == {"profile": ["p"]}


def test_the_bundle_validates_as_r4() -> None:
    bundle = build(
        [patient(), questionnaire_response(), medication_request([f"QuestionnaireResponse/{QR}"])]
    )
    assert resource_problems(bundle) == []


def test_new_resources_are_conditional_creates_on_their_business_identifier() -> None:
    bundle = build([patient(), questionnaire_response(), medication_request()])
    assert entry(bundle, "Patient")["request"] == {
        "method": "POST",
        "url": "Patient",
        "ifNoneExist": f"identifier={SID}/patient-id|{PAT}",
    }
    # QuestionnaireResponse.identifier is a single Identifier in R4, not a list
    assert entry(bundle, "QuestionnaireResponse")["request"]["ifNoneExist"] == (
        f"identifier={SID}/intake-submission|sub-1"
    )
    assert entry(bundle, "MedicationRequest")["request"]["ifNoneExist"] == (
        f"identifier={SID}/checkout-session|cs_1"
    )


def test_provenance_is_conditional_on_its_tag() -> None:
    bundle = build([patient(), provenance([f"Patient/{PAT}"])])
    assert entry(bundle, "Provenance")["request"] == {
        "method": "POST",
        "url": "Provenance",
        "ifNoneExist": f"_tag={TAG_SYSTEM}|{PROV}",
    }
    # the tag travels with the resource, so a replay finds it
    assert entry(bundle, "Provenance")["resource"]["meta"]["tag"] == [
        {"system": TAG_SYSTEM, "code": PROV}
    ]


def test_search_values_are_escaped() -> None:
    resource = {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "a&b c|d"}]}
    assert if_none_exist(resource, TAG_SYSTEM) == "identifier=urn:x|a%26b%20c%7Cd"


def test_a_resource_without_identifier_has_no_if_none_exist() -> None:
    resource = {"resourceType": "Patient", "id": PAT, "identifier": [{"value": "no-system"}]}
    assert business_identifier(resource) is None
    assert "ifNoneExist" not in build([resource])["entry"][0]["request"]


def test_a_resource_the_ehr_already_has_is_a_put_to_its_id() -> None:
    bundle = build([patient(), questionnaire_response()], remote_ids={f"Patient/{PAT}": "ehr-77"})
    pat = entry(bundle, "Patient")
    assert pat["request"] == {"method": "PUT", "url": "Patient/ehr-77"}
    assert pat["resource"]["id"] == "ehr-77"
    assert entry(bundle, "QuestionnaireResponse")["request"]["method"] == "POST"


# --------------------------------------------------------------------------- references


def test_references_inside_the_bundle_become_urn_uuids() -> None:
    bundle = build(
        [
            patient(),
            questionnaire_response(),
            provenance([f"Patient/{PAT}", f"QuestionnaireResponse/{QR}"]),
        ]
    )
    assert entry(bundle, "QuestionnaireResponse")["resource"]["subject"] == {
        "reference": f"urn:uuid:{PAT}"
    }
    assert entry(bundle, "Provenance")["resource"]["target"] == [
        {"reference": f"urn:uuid:{PAT}"},
        {"reference": f"urn:uuid:{QR}"},
    ]


def test_references_outside_the_bundle_use_the_remote_id_when_known() -> None:
    bundle = build(
        [patient(), medication_request([f"QuestionnaireResponse/{QR}"])],
        remote_ids={f"QuestionnaireResponse/{QR}": "ehr-qr-5"},
    )
    mr = entry(bundle, "MedicationRequest")["resource"]
    assert mr["supportingInformation"] == [{"reference": "QuestionnaireResponse/ehr-qr-5"}]
    assert mr["subject"] == {"reference": f"urn:uuid:{PAT}"}


def test_references_outside_the_bundle_become_conditional_without_a_remote_id() -> None:
    bundle = build(
        [medication_request([f"QuestionnaireResponse/{QR}"])],
        outside={
            f"Patient/{PAT}": (f"{SID}/patient-id", PAT),
            f"QuestionnaireResponse/{QR}": (f"{SID}/intake-submission", "sub 1"),
        },
    )
    mr = entry(bundle, "MedicationRequest")["resource"]
    assert mr["subject"] == {"reference": f"Patient?identifier={SID}/patient-id|{PAT}"}
    assert mr["supportingInformation"] == [
        {"reference": f"QuestionnaireResponse?identifier={SID}/intake-submission|sub%201"}
    ]


def test_an_unresolvable_optional_reference_is_dropped() -> None:
    bundle = build([patient(), medication_request([f"QuestionnaireResponse/{QR}"])])
    assert "supportingInformation" not in entry(bundle, "MedicationRequest")["resource"]


def test_only_the_unresolvable_optional_references_are_dropped() -> None:
    other = "0b6c1d4e-0000-4000-8000-0000000000ff"
    bundle = build(
        [
            patient(),
            questionnaire_response(),
            medication_request([f"QuestionnaireResponse/{other}", f"QuestionnaireResponse/{QR}"]),
        ]
    )
    assert entry(bundle, "MedicationRequest")["resource"]["supportingInformation"] == [
        {"reference": f"urn:uuid:{QR}"}
    ]


def test_an_unresolvable_required_reference_is_kept() -> None:
    bundle = build([medication_request()])
    assert entry(bundle, "MedicationRequest")["resource"]["subject"] == {
        "reference": f"Patient/{PAT}"
    }


def test_canonicals_are_never_rewritten() -> None:
    questionnaire = {"resourceType": "Questionnaire", "id": "glp1", "status": "active", "url": "x"}
    qr = questionnaire_response()
    qr["questionnaire"] = "Questionnaire/glp1"  # looks like a reference to an entry; is not one
    bundle = build([questionnaire, patient(), qr])
    rewritten = entry(bundle, "QuestionnaireResponse")["resource"]
    assert rewritten["questionnaire"] == "Questionnaire/glp1"
    assert rewritten["subject"] == {"reference": f"urn:uuid:{PAT}"}


def test_the_inputs_are_not_modified() -> None:
    resources = [
        patient(),
        questionnaire_response(),
        medication_request([f"QuestionnaireResponse/x{QR[1:]}"]),
    ]
    before = copy.deepcopy(resources)
    build(resources, remote_ids={f"Patient/{PAT}": "ehr-1"})
    assert resources == before


def test_transform_is_applied_to_each_resource_copy() -> None:
    def drop_meta(resource: dict[str, Any]) -> dict[str, Any]:
        resource.pop("meta", None)
        return resource

    bundle = build_transaction_bundle(
        [patient()],
        remote_ids={},
        outside_identifiers={},
        provenance_tag_system=TAG_SYSTEM,
        transform=drop_meta,
    )
    assert "meta" not in bundle["entry"][0]["resource"]


# --------------------------------------------------------------------------- responses


def response(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": list(entries)}


def test_relative_and_absolute_locations_give_remote_ids_and_versions() -> None:
    sent = [patient(), questionnaire_response()]
    infos = parse_transaction_response(
        response(
            {"response": {"status": "201 Created", "location": "Patient/ehr-1/_history/1"}},
            {
                "response": {
                    "status": "200 OK",
                    "location": "https://ehr.example.org/fhir/QuestionnaireResponse/ehr-2/_history/4",
                }
            },
        ),
        sent,
    )
    assert [
        (i.resource_type, i.local_id, i.remote_id, i.remote_version, i.status) for i in infos
    ] == [
        ("Patient", PAT, "ehr-1", "1", "201 Created"),
        ("QuestionnaireResponse", QR, "ehr-2", "4", "200 OK"),
    ]


def test_version_from_etag_when_the_location_has_none() -> None:
    (info,) = parse_transaction_response(
        response({"response": {"status": "200 OK", "location": "Patient/ehr-1", "etag": 'W/"7"'}}),
        [patient()],
    )
    assert (info.remote_id, info.remote_version) == ("ehr-1", "7")


def test_id_from_the_returned_resource_when_there_is_no_location() -> None:
    (info,) = parse_transaction_response(
        response(
            {
                "response": {"status": "200 OK"},
                "resource": {"resourceType": "Patient", "id": "ehr-9", "meta": {"versionId": "2"}},
            }
        ),
        [patient()],
    )
    assert (info.remote_id, info.remote_version) == ("ehr-9", "2")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("Patient/abc", ("abc", None)),
        ("Patient/abc/_history/3", ("abc", "3")),
        ("http://ehr:8080/fhir/R4/Patient/abc/_history/3", ("abc", "3")),
        ("https://ehr.example.org/fhir/Patient/abc?_format=json", ("abc", None)),
        ("Observation/abc", (None, None)),
        ("not a location", (None, None)),
        (None, (None, None)),
    ],
)
def test_parse_location(location: Any, expected: tuple[str | None, str | None]) -> None:
    assert parse_location(location, "Patient") == expected


def test_a_response_that_is_not_a_transaction_response_is_refused() -> None:
    with pytest.raises(ValueError, match="transaction-response"):
        parse_transaction_response(
            {"resourceType": "Bundle", "type": "searchset", "entry": [{}]}, [patient()]
        )
    with pytest.raises(ValueError, match="transaction-response"):
        parse_transaction_response({"resourceType": "OperationOutcome"}, [patient()])


@pytest.mark.parametrize(
    ("status", "code", "failed"),
    [
        ("201 Created", 201, False),
        ("201", 201, False),
        ("200 OK", 200, False),
        ("412 Precondition Failed", 412, True),
        ("422", 422, True),
        ("500 Internal Server Error", 500, True),
        ("", None, False),
    ],
)
def test_entry_status_with_or_without_reason_phrase(
    status: str, code: int | None, failed: bool
) -> None:
    (info,) = parse_transaction_response(
        response({"response": {"status": status, "location": "Patient/ehr-1"}}), [patient()]
    )
    assert (info.status_code, info.failed) == (code, failed)
    assert info.remote_id == (None if failed else "ehr-1")


def test_a_batch_response_entry_failure_carries_its_operation_outcome() -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid"}],
    }
    batch = {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [
            {"response": {"status": "201 Created", "location": "Patient/ehr-1/_history/1"}},
            {"response": {"status": "400 Bad Request", "outcome": outcome}},
        ],
    }
    ok, bad = parse_transaction_response(batch, [patient(), questionnaire_response()])
    assert (ok.failed, ok.remote_id, bad.failed, bad.outcome) == (False, "ehr-1", True, outcome)


def test_an_outcome_returned_as_the_entry_resource_is_not_taken_for_the_id() -> None:
    (info,) = parse_transaction_response(
        response(
            {
                "response": {"status": "200 OK"},
                "resource": {"resourceType": "OperationOutcome", "id": "oo-1", "issue": []},
            }
        ),
        [patient()],
    )
    assert info.remote_id is None


def test_a_response_with_another_entry_count_is_refused() -> None:
    with pytest.raises(ValueError, match="entry count"):
        parse_transaction_response(
            response({"response": {"status": "201"}}), [patient(), questionnaire_response()]
        )
