"""Tests for mappers.validation: R4B structure, our code-binding checks, US Core rules,
the outbound resource types, and every resource the mappers emit for the samples."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from mappers.checkout import (
    checkout_to_medication_request,
    checkout_to_patient,
    parse_checkout,
    stripe_session_to_checkout,
)
from mappers.errors import MappingErrors
from mappers.identifiers import IdentifierSystems
from mappers.intake import (
    intake_to_patient,
    intake_to_questionnaire_response,
    parse_intake_submission,
)
from mappers.patient import merge_patient
from mappers.profiles import ProfileSet
from mappers.provenance import provenance_for
from mappers.validation import resource_problems, validate_resources
from tests.mappers.conftest import example, find_plan

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "pat-1",
    "identifier": [{"system": "urn:example:sid", "value": "1"}],
    "name": [{"family": "Rivera", "given": ["Jordan"]}],
    "gender": "female",
    "telecom": [{"system": "phone", "value": "+14155552671", "use": "mobile"}],
    "address": [{"line": ["100 Market St"], "city": "San Francisco", "state": "CA"}],
}
MEDICATION_REQUEST: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "id": "mr-1",
    "status": "draft",
    "intent": "proposal",
    "medicationCodeableConcept": {"text": "semaglutide"},
    "subject": {"reference": "Patient/pat-1"},
}
QUESTIONNAIRE_RESPONSE: dict[str, Any] = {
    "resourceType": "QuestionnaireResponse",
    "id": "qr-1",
    "questionnaire": "https://example.org/Questionnaire/q|1",
    "status": "completed",
}


def changed(resource: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    out.update(changes)
    return out


def codes(resource: dict[str, Any]) -> dict[str, str]:
    return {p.location: p.code for p in resource_problems(resource)}


def test_valid_resources_have_no_problems() -> None:
    for resource in (PATIENT, MEDICATION_REQUEST, QUESTIONNAIRE_RESPONSE):
        assert resource_problems(resource) == []


# --------------------------------------------------------------------------- code bindings


@pytest.mark.parametrize(
    ("resource", "location"),
    [
        pytest.param(changed(PATIENT, gender="F"), "Patient.gender", id="gender"),
        pytest.param(
            changed(PATIENT, telecom=[{"system": "phone", "value": "+1", "use": "cell"}]),
            "Patient.telecom[0].use",
            id="telecom-use",
        ),
        pytest.param(
            changed(PATIENT, telecom=[{"system": "mobile", "value": "+1"}]),
            "Patient.telecom[0].system",
            id="telecom-system",
        ),
        pytest.param(
            changed(PATIENT, name=[{"family": "R", "use": "nick"}]),
            "Patient.name[0].use",
            id="name-use",
        ),
        pytest.param(
            changed(PATIENT, contact=[{"gender": "woman"}]),
            "Patient.contact[0].gender",
            id="nested-backbone",
        ),
        pytest.param(
            changed(MEDICATION_REQUEST, status="pending"),
            "MedicationRequest.status",
            id="mr-status",
        ),
        pytest.param(
            changed(MEDICATION_REQUEST, intent="suggestion"),
            "MedicationRequest.intent",
            id="mr-intent",
        ),
        pytest.param(
            changed(QUESTIONNAIRE_RESPONSE, status="done"),
            "QuestionnaireResponse.status",
            id="qr-status",
        ),
    ],
)
def test_a_code_outside_its_required_value_set_is_caught(
    resource: dict[str, Any], location: str
) -> None:
    assert codes(resource) == {location: "code_not_in_value_set"}


def test_binding_problem_message_lists_the_codes_not_the_value() -> None:
    (problem,) = resource_problems(changed(PATIENT, gender="woman"))
    assert "female, male, other, unknown" in problem.message
    assert "woman" not in problem.message


def test_bindings_are_checked_inside_bundle_entries() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": changed(PATIENT, gender="F"),
                "request": {"method": "POST", "url": "Patient"},
            }
        ],
    }
    assert codes(bundle) == {"Bundle.entry[0].resource.gender": "code_not_in_value_set"}


# --------------------------------------------------------------------------- US Core


@pytest.mark.parametrize("state", ["California", "ca", "XX", "ON"])
def test_address_state_must_be_a_usps_code(state: str) -> None:
    patient = changed(PATIENT, address=[{"city": "X", "state": state}])
    assert codes(patient) == {"Patient.address[0].state": "us_core"}


@pytest.mark.parametrize("country", ["US", "us", "USA"])
def test_a_us_address_state_must_be_a_usps_code(country: str) -> None:
    patient = changed(PATIENT, address=[{"state": "Ontario", "country": country}])
    assert codes(patient) == {"Patient.address[0].state": "us_core"}


@pytest.mark.parametrize(("country", "state"), [("CA", "ON"), ("MX", "Jalisco"), ("GB", "Kent")])
def test_a_foreign_address_keeps_its_own_region(country: str, state: str) -> None:
    # US Core binds Address.state to USPS codes extensibly: a Canadian province has no
    # USPS code, so its own code is allowed.
    patient = changed(PATIENT, address=[{"state": state, "country": country}])
    assert resource_problems(patient) == []


@pytest.mark.parametrize("state", ["CA", "DC", "PR", "GU", "AE"])
def test_usps_codes_of_states_territories_and_military_are_accepted(state: str) -> None:
    assert resource_problems(changed(PATIENT, address=[{"state": state}])) == []


@pytest.mark.parametrize(
    ("missing", "location"),
    [("identifier", "Patient.identifier"), ("name", "Patient.name"), ("gender", "Patient.gender")],
)
def test_us_core_patient_needs_identifier_name_and_gender(missing: str, location: str) -> None:
    patient = copy.deepcopy(PATIENT)
    del patient[missing]
    assert codes(patient) == {location: "us_core"}


def test_us_core_patient_identifier_needs_system_and_value() -> None:
    patient = changed(PATIENT, identifier=[{"value": "1"}])
    assert codes(patient) == {"Patient.identifier[0]": "us_core"}


@pytest.mark.parametrize("intent", ["order", "original-order", "filler-order"])
def test_us_core_21_an_order_needs_a_requester(intent: str) -> None:
    mr = changed(MEDICATION_REQUEST, intent=intent, status="active")
    assert codes(mr) == {"MedicationRequest.requester": "us-core-21"}
    mr["requester"] = {"reference": "Practitioner/dr-1"}
    assert resource_problems(mr) == []


def test_a_proposal_needs_no_requester() -> None:
    assert "requester" not in MEDICATION_REQUEST
    assert resource_problems(MEDICATION_REQUEST) == []


def test_questionnaire_must_be_a_canonical_not_a_urn() -> None:
    qr = changed(
        QUESTIONNAIRE_RESPONSE, questionnaire="urn:uuid:5b6f3f9e-7c1e-4c1e-9a55-1c6f0a1b2c3d"
    )
    assert codes(qr) == {"QuestionnaireResponse.questionnaire": "invalid_canonical"}


# --------------------------------------------------------------------------- structure and types


@pytest.mark.parametrize("rtype", ["SubscriptionStatus", "NutritionProduct", "Citation"])
def test_r4b_only_resource_types_are_refused(rtype: str) -> None:
    assert get_fhir_model_class(rtype) is not None  # they exist in R4B ...
    assert codes({"resourceType": rtype}) == {"resourceType": "unsupported_type"}  # ... not R4


@pytest.mark.parametrize("rtype", ["Encounter", "NotAResource", None])
def test_types_the_gateway_does_not_emit_are_refused(rtype: str | None) -> None:
    assert codes({"resourceType": rtype}) == {"resourceType": "unsupported_type"}


@pytest.mark.parametrize(
    ("change", "location"),
    [
        ({"birthDate": "04/12/1988"}, "Patient.birthDate"),
        ({"favouriteColour": "blue"}, "Patient.favouriteColour"),
        ({"active": "perhaps"}, "Patient.active"),
    ],
)
def test_structure_problems_come_from_the_r4b_model(change: dict[str, Any], location: str) -> None:
    problems = resource_problems(changed(PATIENT, **change))
    assert [p.location for p in problems] == [location]
    for value in change.values():
        assert all(str(value) not in p.message for p in problems)


def test_a_datetime_without_zone_is_refused() -> None:
    mr = changed(MEDICATION_REQUEST, authoredOn="2026-11-23T19:05:00")
    assert [p.location for p in resource_problems(mr)] == ["MedicationRequest.authoredOn"]


def test_control_characters_in_strings_are_refused() -> None:
    # R4 string: "SHALL NOT contain Unicode character points below 32, except for u0009
    # (horizontal tab), u0010 (carriage return) and u0013 (line feed)"
    patient = changed(
        PATIENT,
        name=[{"family": "Riv\x00era", "given": ["Jordan"]}],
        address=[{"line": ["100 Market St", "Apt\x074"], "state": "CA"}],
    )
    assert codes(patient) == {
        "Patient.name[0].family": "invalid_character",
        "Patient.address[0].line[1]": "invalid_character",
    }
    assert all("Riv" not in p.message for p in resource_problems(patient))


def test_tab_and_line_breaks_are_allowed_in_strings() -> None:
    patient = changed(PATIENT, address=[{"line": ["100 Market St\tUnit 4\r\nBack door"]}])
    assert resource_problems(patient) == []


def test_validate_resources_raises_once_with_every_problem() -> None:
    with pytest.raises(MappingErrors) as info:
        validate_resources(
            [changed(PATIENT, gender="F"), changed(MEDICATION_REQUEST, intent="suggestion")]
        )
    assert [p.location for p in info.value.problems] == [
        "Patient.gender",
        "MedicationRequest.intent",
    ]


# --------------------------------------------------------------------------- what the mappers emit


def all_sample_resources(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> list[dict[str, Any]]:
    """Every resource the mappers produce for the bundled samples."""
    parsed = parse_intake_submission(
        example("intake-glp1.json"), profile_set.intake_profile, profile_set.concept_maps
    )
    submission, profile, items = parsed.submission, parsed.profile, parsed.items
    intake_patient = intake_to_patient(submission, patient_id="pat-1", systems=systems)
    qr = intake_to_questionnaire_response(
        submission, profile, items, response_id="qr-1", patient_id="pat-1", systems=systems
    )
    checkout, plan = parse_checkout(
        stripe_session_to_checkout(example("stripe-checkout-session-completed.json")),
        find_plan(profile_set),
    )
    checkout_patient = checkout_to_patient(checkout, patient_id="pat-1", systems=systems)
    merged = merge_patient(intake_patient, checkout_patient, source="checkout", owns=set()).patient
    resources = [intake_patient, qr, checkout_patient, merged]
    for plan_id in ("glp1-semaglutide-starter", "glp1-semaglutide-maintenance"):
        found = profile_set.plan(plan_id)
        assert found is not None
        resources.append(
            checkout_to_medication_request(
                checkout,
                found[1],
                request_id=f"mr-{plan_id}",
                patient_id="pat-1",
                systems=systems,
                questionnaire_response_id="qr-1",
            )
        )
    resources.append(
        provenance_for(
            provenance_id="prov-1",
            targets=["Patient/pat-1", "QuestionnaireResponse/qr-1"],
            recorded=datetime(2026, 11, 23, 19, 6, tzinfo=UTC),
            message_id="msg-1",
            message_kind="intake",
            systems=systems,
            author="Patient/pat-1",
            organization="Telehealth operator",
            profile="intake/glp1-weight-management/1#sha256=abc",
        )
    )
    assert plan is not None
    return resources


def test_every_resource_the_mappers_emit_validates(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    for resource in all_sample_resources(profile_set, systems):
        assert resource_problems(resource) == [], resource["resourceType"]


def test_every_resource_the_mappers_emit_round_trips_through_r4b(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    for resource in all_sample_resources(profile_set, systems):
        model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        assert json.loads(model.model_dump_json()) == resource, resource["resourceType"]
