"""Checkout profiles: Stripe field paths, attribution, the plan table with dose form."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import BUNDLED_PROFILES_DIR
from mappers.checkout import read_path
from mappers.errors import MappingErrors
from mappers.pipeline import EXAMPLE_SYSTEMS, checkout_payload, map_checkout
from mappers.profiles import ProfileSet, load_profiles
from mappers.validation import resource_problems
from tests.support.profiles import PROCESSORS, copy_profiles, edit_yaml

STRIPE = BUNDLED_PROFILES_DIR / "checkout/glp1-plans.examples/stripe.input.json"


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_profiles(BUNDLED_PROFILES_DIR)


def _event(**metadata: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(STRIPE.read_text())
    event["data"]["object"]["metadata"].update(metadata)
    return event


def test_read_path() -> None:
    doc = {"a": {"b": [{"c": 1}, {"c": 2}]}, "x": ""}
    assert read_path(doc, "a.b[1].c") == 2
    assert read_path(doc, "a.b[5].c") is None
    assert read_path(doc, "a.z") is None


def test_stripe_event_through_the_profiles_paths(profiles: ProfileSet) -> None:
    canonical = checkout_payload(_event(utm_source="google"), profiles, kind="stripe")
    assert canonical["checkout_id"] == "cs_test_a1ExampleSession0001"
    assert canonical["completed_at"] == "2026-11-23T19:05:00+00:00"
    assert canonical["plan"] == "glp1-semaglutide-starter"
    assert canonical["customer"]["address"]["state"] == "CA"
    assert canonical["attribution"] == {"utm_source": "google"}
    assert canonical["processor"] == "stripe"


def test_empty_strings_become_absent(profiles: ProfileSet) -> None:
    event = _event()
    event["data"]["object"]["customer_details"]["address"]["line2"] = ""
    canonical = checkout_payload(event, profiles, kind="stripe")
    assert "line2" not in canonical["customer"]["address"]


def test_field_paths_are_profile_data(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    edit_yaml(
        root / PROCESSORS,
        lambda d: d["processors"]["stripe"]["fields"].update(plan="data.object.metadata.sku"),
    )
    profiles = load_profiles(root)
    event = _event(sku="glp1-semaglutide-maintenance")
    assert (
        checkout_payload(event, profiles, kind="stripe")["plan"] == "glp1-semaglutide-maintenance"
    )


def test_event_type_the_processor_does_not_list(profiles: ProfileSet) -> None:
    event = _event()
    event["type"] = "checkout.session.expired"
    with pytest.raises(MappingErrors) as exc:
        checkout_payload(event, profiles, kind="stripe")
    assert [p.code for p in exc.value.problems] == ["not_a_checkout"]


def test_plan_table_gives_the_medication_request(profiles: ProfileSet) -> None:
    canonical = checkout_payload(_event(), profiles, kind="stripe")
    mapped = map_checkout(
        canonical, profiles, systems=EXAMPLE_SYSTEMS, patient_id="p1", request_id="m1"
    )
    mr = mapped.medication_request
    assert (mr["status"], mr["intent"]) == ("draft", "proposal")
    assert "contained" not in mr
    assert mr["medicationCodeableConcept"]["coding"][0] == {
        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
        "code": "1991306",
        "display": "0.25 MG, 0.5 MG Dose 1.5 ML semaglutide 1.34 MG/ML Pen Injector",
    }
    assert mr["dosageInstruction"][0]["text"].startswith("Inject 0.25 mg")
    assert mr["dispenseRequest"]["numberOfRepeatsAllowed"] == 0
    assert mr["dispenseRequest"]["quantity"]["value"] == 1.5
    assert resource_problems(mr) == []
    assert resource_problems(mapped.patient) == []


def test_plan_with_a_dose_form_sends_a_contained_medication(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    edit_yaml(
        root / "checkout/glp1-plans.yaml",
        lambda d: d["plans"]["glp1-semaglutide-starter"].update(
            dose_form={
                "system": "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
                "code": "SOL",
                "display": "Solution",
            }
        ),
    )
    profiles = load_profiles(root)
    canonical = checkout_payload(_event(), profiles, kind="stripe")
    mapped = map_checkout(
        canonical, profiles, systems=EXAMPLE_SYSTEMS, patient_id="p1", request_id="m1"
    )
    mr = mapped.medication_request
    (medication,) = mr["contained"]
    assert medication["code"]["coding"][0] == {
        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
        "code": "1991306",
        "display": "0.25 MG, 0.5 MG Dose 1.5 ML semaglutide 1.34 MG/ML Pen Injector",
    }
    assert medication["form"]["coding"][0]["code"] == "SOL"
    assert mr["medicationReference"]["reference"] == "#med"
    assert mr["dosageInstruction"][0]["text"].startswith("Inject 0.25 mg")
    assert mr["dispenseRequest"]["numberOfRepeatsAllowed"] == 0
    assert mr["dispenseRequest"]["quantity"]["value"] == 1.5
    assert resource_problems(mr) == []
    assert resource_problems(mapped.patient) == []


def test_unknown_plan(profiles: ProfileSet) -> None:
    canonical = checkout_payload(_event(plan="no-such-plan"), profiles, kind="stripe")
    with pytest.raises(MappingErrors) as exc:
        map_checkout(canonical, profiles, systems=EXAMPLE_SYSTEMS, patient_id="p", request_id="m")
    assert [(p.location, p.code) for p in exc.value.problems] == [("plan", "unknown_plan")]


def test_canonical_checkout_keeps_attribution(profiles: ProfileSet) -> None:
    path = BUNDLED_PROFILES_DIR / "checkout/glp1-plans.examples/canonical.input.json"
    data = copy.deepcopy(json.loads(path.read_text()))
    mapped = map_checkout(data, profiles, systems=EXAMPLE_SYSTEMS, patient_id="p", request_id="m")
    assert mapped.checkout.attribution is not None
    assert mapped.checkout.attribution.utm_source == "google"
    assert "google" not in json.dumps(mapped.resources)  # never sent to an EHR
