"""Tests for mappers.checkout: Stripe session -> canonical checkout -> Patient +
MedicationRequest (a draft proposal awaiting provider review)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.patient import Patient

from mappers.checkout import (
    CanonicalCheckout,
    checkout_to_medication_request,
    checkout_to_patient,
    parse_checkout,
    payment_outcome,
    split_name,
    stripe_session_to_checkout,
)
from mappers.errors import MappingErrors
from mappers.identifiers import IdentifierSystems
from mappers.pipeline import checkout_payload, map_checkout
from mappers.profiles import Plan, ProfileSet
from mappers.validation import resource_problems
from tests.mappers.conftest import GOLDEN, assert_golden, find_plan

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def stripe_sample() -> dict[str, Any]:
    """The golden input: the bundled Stripe ``checkout.session.completed`` event."""
    return json.loads((GOLDEN / "stripe-checkout-session-completed.input.json").read_text())  # type: ignore[no-any-return]


def canonical(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "checkout_id": "chk-0001",
        "processor": "square",
        "completed_at": "2026-11-23T19:05:00Z",
        "plan": "glp1-semaglutide-starter",
        "customer": {"name": "Jordan Rivera", "email": "Jordan.Rivera@Example.com "},
        "amount_total": 29900,
        "currency": "USD",
        "payment_status": "paid",
    }
    data.update(overrides)
    return data


def parse(profile_set: ProfileSet, data: Any) -> tuple[CanonicalCheckout, Plan]:
    return parse_checkout(data, find_plan(profile_set))


def problems_of(profile_set: ProfileSet, data: Any) -> dict[str, str]:
    with pytest.raises(MappingErrors) as info:
        parse(profile_set, data)
    return {p.location: p.code for p in info.value.problems}


def map_stripe(
    profile_set: ProfileSet, systems: IdentifierSystems, qr_id: str | None = "qr-1"
) -> tuple[dict[str, Any], dict[str, Any]]:
    checkout, plan = parse(profile_set, stripe_session_to_checkout(stripe_sample()))
    patient = checkout_to_patient(checkout, patient_id="pat-1", systems=systems)
    mr = checkout_to_medication_request(
        checkout,
        plan,
        request_id="mr-1",
        patient_id="pat-1",
        systems=systems,
        questionnaire_response_id=qr_id,
    )
    return patient, mr


# --------------------------------------------------------------------------- golden


def test_stripe_session_maps_to_golden_canonical_checkout() -> None:
    assert_golden(stripe_session_to_checkout(stripe_sample()), "stripe-checkout.canonical.json")


def test_stripe_checkout_maps_to_golden_patient_and_medication_request(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    patient, mr = map_stripe(profile_set, systems)
    assert_golden({"Patient": patient, "MedicationRequest": mr}, "stripe-checkout.expected.json")


def test_checkout_resources_validate_and_round_trip_through_r4b(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    patient, mr = map_stripe(profile_set, systems)
    assert resource_problems(patient) == []
    assert resource_problems(mr) == []
    assert json.loads(Patient.model_validate(patient).model_dump_json()) == patient
    assert json.loads(MedicationRequest.model_validate(mr).model_dump_json()) == mr


# --------------------------------------------------------------------------- Stripe -> canonical


def test_stripe_event_time_becomes_completed_at_in_utc() -> None:
    out = stripe_session_to_checkout(stripe_sample())
    assert out["completed_at"] == "2026-11-23T19:05:00+00:00"
    assert out["processor"] == "stripe"
    assert out["checkout_id"] == "cs_test_a1ExampleSession0001"


def test_stripe_metadata_and_customer_id_are_carried() -> None:
    out = stripe_session_to_checkout(stripe_sample())
    assert out["plan"] == "glp1-semaglutide-starter"
    assert out["patient_external_id"] == "app-user-8812"
    assert out["intake_submission_id"] == "sub-2026-000123"
    assert out["customer_id"] == "cus_QExampleCustomer1"
    assert (out["amount_total"], out["currency"], out["payment_status"]) == (29900, "usd", "paid")


def test_stripe_empty_strings_become_absent() -> None:
    event = stripe_sample()
    session = event["data"]["object"]
    session["customer_details"]["phone"] = None
    session["customer_details"]["address"].update({"line2": "", "state": ""})
    session["metadata"] = {"plan": "glp1-semaglutide-starter", "intake_submission_id": ""}
    out = stripe_session_to_checkout(event)
    assert "phone" not in out["customer"]
    assert "line2" not in out["customer"]["address"]
    assert "state" not in out["customer"]["address"]
    assert "intake_submission_id" not in out
    assert "patient_external_id" not in out


@pytest.mark.parametrize(
    "change",
    [
        {"data": "not a session"},
        {"data": {"object": ["a", "list"]}},
        {"data": {"object": {"id": "cs_1", "metadata": ["plan"], "customer_details": "Jordan"}}},
        {"data": {"object": {"id": "cs_1", "customer_details": {"address": "100 Market St"}}}},
    ],
    ids=["data", "object", "metadata-and-details", "address"],
)
def test_a_malformed_stripe_event_maps_to_problems_not_exceptions(
    profile_set: ProfileSet, change: dict[str, Any]
) -> None:
    event = {**stripe_sample(), **change}
    out = stripe_session_to_checkout(event)
    assert isinstance(out, dict)
    with pytest.raises(MappingErrors) as info:
        parse(profile_set, out)
    assert "plan" in {p.location for p in info.value.problems}


def test_stripe_event_without_plan_fails_parsing_at_plan(profile_set: ProfileSet) -> None:
    event = stripe_sample()
    event["data"]["object"]["metadata"] = {"patient_external_id": "app-user-8812"}
    assert problems_of(profile_set, stripe_session_to_checkout(event)) == {"plan": "missing"}


# --------------------------------------------------------------------------- parsing problems


def test_unknown_plan_is_located(profile_set: ProfileSet) -> None:
    assert problems_of(profile_set, canonical(plan="glp1-gold-plan")) == {"plan": "unknown_plan"}


def test_checkout_without_any_patient_key_is_refused(profile_set: ProfileSet) -> None:
    assert problems_of(profile_set, canonical(customer={"name": "Jordan Rivera"})) == {
        "customer.email": "unidentified_patient"
    }


def test_us_address_state_and_zip_are_normalized(profile_set: ProfileSet) -> None:
    checkout, _ = parse(
        profile_set,
        canonical(
            customer={
                "email": "a@example.com",
                "address": {"line1": "1 Main St", "state": "new york", "postal_code": "100011234"},
            }
        ),
    )
    assert checkout.customer.address is not None
    assert checkout.customer.address.state == "NY"
    assert checkout.customer.address.postal_code == "10001-1234"


def test_bad_us_address_state_is_located(profile_set: ProfileSet) -> None:
    data = canonical(customer={"email": "a@example.com", "address": {"state": "Teksis"}})
    assert problems_of(profile_set, data) == {"customer.address.state": "invalid_state"}


def test_every_contract_problem_is_listed(profile_set: ProfileSet) -> None:
    data = canonical(
        amount_total=-1,
        currency="dollars",
        payment_status="pending",
        completed_at="2026-11-23 19:05",
        customer={"email": "not-an-email", "phone": "12"},
        coupon="FREE",
    )
    assert problems_of(profile_set, data) == {
        "amount_total": "greater_than_equal",
        "currency": "string_pattern_mismatch",
        "payment_status": "literal_error",
        "completed_at": "timezone_aware",
        "customer.email": "invalid_email",
        "customer.phone": "invalid_phone",
        "coupon": "extra_forbidden",
    }


def test_contact_details_are_normalized(profile_set: ProfileSet) -> None:
    checkout, _ = parse(
        profile_set,
        canonical(customer={"email": " Jordan@Example.COM ", "phone": "(415) 555-2671"}),
    )
    assert checkout.customer.email == "jordan@example.com"
    assert checkout.customer.phone == "+14155552671"
    assert checkout.currency == "usd"


# --------------------------------------------------------------------------- Patient


@pytest.mark.parametrize(
    ("full", "expected"),
    [
        (
            "Jane Q. Doe",
            {"use": "official", "text": "Jane Q. Doe", "family": "Doe", "given": ["Jane", "Q."]},
        ),
        (
            "Jordan Rivera",
            {"use": "official", "text": "Jordan Rivera", "family": "Rivera", "given": ["Jordan"]},
        ),
        ("Cher", {"use": "official", "text": "Cher", "given": ["Cher"]}),
    ],
)
def test_split_name_takes_the_last_word_as_family(full: str, expected: dict[str, Any]) -> None:
    assert split_name(full) == expected


def test_checkout_patient_has_unknown_gender_and_no_birth_date(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    patient, _ = map_stripe(profile_set, systems)
    assert patient["gender"] == "unknown"
    assert "birthDate" not in patient
    assert patient["address"][0]["use"] == "billing"


def test_stripe_customer_id_is_an_identifier(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    patient, _ = map_stripe(profile_set, systems)
    assert {
        "system": f"{systems.base}/stripe-customer",
        "value": "cus_QExampleCustomer1",
    } in patient["identifier"]


def test_customer_id_of_another_processor_is_not_a_stripe_identifier(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    checkout, _ = parse(profile_set, canonical(customer_id="sq-cust-1"))
    patient = checkout_to_patient(checkout, patient_id="pat-1", systems=systems)
    assert [i["system"] for i in patient["identifier"]] == [f"{systems.base}/patient-id"]


def test_checkout_without_a_name_says_why_and_still_validates(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    checkout, _ = parse(profile_set, canonical(customer={"email": "a@example.com"}))
    patient = checkout_to_patient(checkout, patient_id="pat-1", systems=systems)
    assert patient["name"] == [
        {
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                    "valueCode": "unknown",
                }
            ]
        }
    ]
    assert resource_problems(patient) == []


# --------------------------------------------------------------------------- MedicationRequest


def test_medication_request_is_a_draft_proposal_requested_by_the_patient(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    _, mr = map_stripe(profile_set, systems)
    assert (mr["status"], mr["intent"]) == ("draft", "proposal")
    assert mr["subject"] == mr["requester"] == {"reference": "Patient/pat-1"}
    assert mr["authoredOn"] == "2026-11-23T19:05:00Z"
    assert mr["identifier"] == [
        {"system": f"{systems.base}/checkout-session", "value": "cs_test_a1ExampleSession0001"}
    ]


def test_medication_is_the_plans_rxnorm_coding(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    _, mr = map_stripe(profile_set, systems)
    (coding,) = mr["medicationCodeableConcept"]["coding"]
    assert (coding["system"], coding["code"]) == (RXNORM, "1991306")
    assert mr["medicationCodeableConcept"]["text"] == (
        "Semaglutide 0.25 mg weekly starter (pen injector)"
    )


def test_dosage_instruction_from_the_plan(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    _, mr = map_stripe(profile_set, systems)
    (dosage,) = mr["dosageInstruction"]
    assert dosage["timing"] == {"repeat": {"frequency": 1, "period": 1, "periodUnit": "wk"}}
    assert dosage["route"]["coding"][0]["code"] == "34206005"
    assert dosage["doseAndRate"] == [
        {
            "doseQuantity": {
                "value": 0.25,
                "unit": "mg",
                "system": "http://unitsofmeasure.org",
                "code": "mg",
            }
        }
    ]


def test_dispense_request_from_the_plan(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    checkout, plan = parse(profile_set, canonical(plan="glp1-semaglutide-maintenance"))
    mr = checkout_to_medication_request(
        checkout, plan, request_id="mr-1", patient_id="pat-1", systems=systems
    )
    assert mr["dispenseRequest"] == {
        "numberOfRepeatsAllowed": 2,
        "quantity": {
            "value": 1.5,
            "unit": "mL",
            "system": "http://unitsofmeasure.org",
            "code": "mL",
        },
        "expectedSupplyDuration": {
            "value": 28,
            "unit": "days",
            "system": "http://unitsofmeasure.org",
            "code": "d",
        },
    }
    assert mr["medicationCodeableConcept"]["coding"][0]["code"] == "1991316"


def test_supporting_information_only_when_the_intake_is_known(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    _, with_qr = map_stripe(profile_set, systems, qr_id="qr-1")
    _, without = map_stripe(profile_set, systems, qr_id=None)
    assert with_qr["supportingInformation"] == [{"reference": "QuestionnaireResponse/qr-1"}]
    assert "supportingInformation" not in without
    assert resource_problems(without) == []


@pytest.mark.parametrize("zip_number", [2134, 94107], ids=["lost-leading-zero", "five-digits"])
def test_a_zip_sent_as_a_json_number_is_refused_with_why(
    profile_set: ProfileSet, zip_number: int
) -> None:
    data = canonical(customer={"email": "a@example.com", "address": {"postal_code": zip_number}})
    with pytest.raises(MappingErrors) as info:
        parse(profile_set, data)
    ((location, code, message),) = [(p.location, p.code, p.message) for p in info.value.problems]
    assert (location, code) == ("customer.address.postal_code", "postal_code_not_text")
    assert "JSON string" in message and "leading zeros" in message


# --------------------------------------------------------------------------- current Stripe APIs


def stripe_event_of_api(version: str, **customer_details: Any) -> dict[str, Any]:
    """The sample event as a newer API version sends it: ``customer_details`` with
    ``business_name`` / ``individual_name`` / ``tax_exempt``, and ``collected_information``."""
    event = stripe_sample()
    event["api_version"] = version
    session = event["data"]["object"]
    session["customer_details"].update(
        {"business_name": None, "individual_name": None, "tax_exempt": "none", "tax_ids": []}
    )
    session["customer_details"].update(customer_details)
    session["collected_information"] = {
        "business_name": None,
        "individual_name": None,
        "shipping_details": None,
    }
    return event


def stripe_patient(
    profile_set: ProfileSet, systems: IdentifierSystems, event: dict[str, Any]
) -> dict[str, Any]:
    """The Patient the bundled ``processors.stripe`` profile makes of ``event``."""
    checkout, _ = parse(profile_set, checkout_payload(event, profile_set, kind="stripe"))
    patient = checkout_to_patient(checkout, patient_id="pat-1", systems=systems)
    assert resource_problems(patient) == []
    return patient


@pytest.mark.parametrize(
    ("details", "expected_name"),
    [
        ({"name": "Cher"}, {"use": "official", "text": "Cher", "given": ["Cher"]}),
        (
            {"name": "Maria del Carmen  Lopez"},
            {
                "use": "official",
                "text": "Maria del Carmen Lopez",
                "family": "Lopez",
                "given": ["Maria", "del", "Carmen"],
            },
        ),
        (
            # Business name collection: `name` is the business, `individual_name` the person.
            {
                "name": "Acme Logistics LLC",
                "business_name": "Acme Logistics LLC",
                "individual_name": "Jordan Rivera",
            },
            {"use": "official", "text": "Jordan Rivera", "family": "Rivera", "given": ["Jordan"]},
        ),
        (
            {"name": "Jordan Rivera", "individual_name": ""},
            {"use": "official", "text": "Jordan Rivera", "family": "Rivera", "given": ["Jordan"]},
        ),
    ],
    ids=["single-word", "four-parts", "business-and-individual", "individual-empty"],
)
@pytest.mark.parametrize("version", ["2024-06-20", "2025-03-31.basil", "2025-09-30.clover"])
def test_stripe_customer_names_of_current_api_versions(
    profile_set: ProfileSet,
    systems: IdentifierSystems,
    version: str,
    details: dict[str, Any],
    expected_name: dict[str, Any],
) -> None:
    patient = stripe_patient(profile_set, systems, stripe_event_of_api(version, **details))
    assert patient["name"] == [expected_name]


def test_the_default_stripe_mapping_prefers_individual_name_too() -> None:
    event = stripe_event_of_api(
        "2025-09-30.clover", name="Acme Logistics LLC", individual_name="Jordan Rivera"
    )
    assert stripe_session_to_checkout(event)["customer"]["name"] == "Jordan Rivera"


@pytest.mark.parametrize(
    ("details", "address"),
    [
        ({"address": None, "phone": None}, None),
        (
            # Card billing collection "auto": only country and ZIP.
            {
                "address": {
                    "city": None,
                    "country": "US",
                    "line1": None,
                    "line2": None,
                    "postal_code": "94107",
                    "state": None,
                }
            },
            {"use": "billing", "type": "both", "postalCode": "94107", "country": "US"},
        ),
        (
            {
                "address": {
                    "city": "Toronto",
                    "country": "CA",
                    "line1": "1 King St W",
                    "line2": None,
                    "postal_code": "M5H 1A1",
                    "state": "ON",
                },
                "phone": "+14165550123",
            },
            {
                "use": "billing",
                "type": "both",
                "line": ["1 King St W"],
                "city": "Toronto",
                "state": "ON",
                "postalCode": "M5H 1A1",
                "country": "CA",
            },
        ),
    ],
    ids=["address-and-phone-null", "partial-address", "canadian-address"],
)
def test_stripe_customer_details_null_or_partial(
    profile_set: ProfileSet,
    systems: IdentifierSystems,
    details: dict[str, Any],
    address: dict[str, Any] | None,
) -> None:
    patient = stripe_patient(
        profile_set, systems, stripe_event_of_api("2025-03-31.basil", **details)
    )
    assert patient.get("address") == ([address] if address else None)
    phone = details.get("phone", "+14155552671")  # the sample's, unless the case sets it
    phones = [t["value"] for t in patient["telecom"] if t["system"] == "phone"]
    assert phones == ([phone] if phone else [])


# --------------------------------------------------------------------------- payment modes


def stripe_setup_session(plan: str = "glp1-semaglutide-starter") -> dict[str, Any]:
    """A Checkout Session in setup mode, as Stripe sends it: a payment method saved, no
    amount, no currency, a SetupIntent instead of a PaymentIntent."""
    event = stripe_sample()
    session = event["data"]["object"]
    session.update(
        mode="setup",
        payment_status="no_payment_required",
        amount_total=None,
        amount_subtotal=None,
        currency=None,
        payment_intent=None,
        setup_intent="seti_1QExampleSetupIntent",
    )
    session["metadata"]["plan"] = plan
    return event


@pytest.mark.parametrize(
    ("mode", "payment_status", "outcome"),
    [
        ("payment", "paid", "paid"),
        ("subscription", "paid", "paid"),
        ("payment", "no_payment_required", "paid"),  # nothing owed: a 100% discount
        ("subscription", "no_payment_required", "deferred"),  # a trial
        ("setup", "no_payment_required", "deferred"),
        ("payment", "unpaid", "awaiting_payment"),
        ("subscription", "unpaid", "awaiting_payment"),
    ],
)
def test_payment_outcome_of_each_mode_and_status(
    profile_set: ProfileSet, mode: str, payment_status: str, outcome: str
) -> None:
    checkout, _ = parse(profile_set, canonical(mode=mode, payment_status=payment_status))
    assert payment_outcome(checkout) == outcome


def test_a_stripe_setup_session_is_a_valid_deferred_checkout(profile_set: ProfileSet) -> None:
    """It used to be refused as "amount_total missing, currency missing"."""
    data = stripe_session_to_checkout(stripe_setup_session())
    assert (data["mode"], data["payment_status"]) == ("setup", "no_payment_required")
    assert "amount_total" not in data and "currency" not in data
    checkout, _ = parse(profile_set, data)
    assert payment_outcome(checkout) == "deferred"
    assert (checkout.amount_total, checkout.currency) == (None, None)


@pytest.mark.parametrize(
    ("plan", "types"),
    [
        ("glp1-semaglutide-starter", ["Patient", "MedicationRequest"]),
        ("glp1-semaglutide-maintenance", ["Patient"]),
    ],
)
def test_a_deferred_checkout_maps_as_its_plan_says(
    profile_set: ProfileSet, systems: IdentifierSystems, plan: str, types: list[str]
) -> None:
    data = checkout_payload(stripe_setup_session(plan), profile_set, kind="stripe")
    mapped = map_checkout(data, profile_set, systems=systems, patient_id="pat-1", request_id="mr-1")
    assert [r["resourceType"] for r in mapped.resources] == types
    assert (mapped.payment, mapped.event_type) == ("deferred", "payment_deferred")
    for resource in mapped.resources:
        assert resource_problems(resource) == []


def test_a_paid_checkout_is_a_payment_completed(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    data = checkout_payload(stripe_sample(), profile_set, kind="stripe")
    mapped = map_checkout(data, profile_set, systems=systems, patient_id="pat-1", request_id="mr-1")
    assert (mapped.payment, mapped.event_type) == ("paid", "payment_completed")
    assert [r["resourceType"] for r in mapped.resources] == ["Patient", "MedicationRequest"]


def test_amount_and_currency_are_required_unless_setup_mode(profile_set: ProfileSet) -> None:
    data = canonical(mode="subscription")
    del data["amount_total"], data["currency"]
    assert problems_of(profile_set, data) == {"amount_total": "missing", "currency": "missing"}


def test_a_setup_mode_checkout_that_says_it_was_paid_is_refused(
    profile_set: ProfileSet,
) -> None:
    data = canonical(mode="setup", payment_status="paid")
    assert problems_of(profile_set, data) == {"payment_status": "invalid_for_mode"}
