"""Derived Observations (vitals, BMI), FHIRPath risk Flags, Consents, and the generated
Questionnaires."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.questionnaire import Questionnaire

from gateway.settings import BUNDLED_PROFILES_DIR
from mappers import derived
from mappers.derived import deterministic_id, flag_applies, prune_items, retire_derived
from mappers.pipeline import EXAMPLE_SYSTEMS, MappedIntake, map_intake
from mappers.profiles import FlagSpec, ProfileSet, load_profiles
from mappers.questionnaire import profile_to_questionnaire
from mappers.validation import resource_problems

V1_INPUT = BUNDLED_PROFILES_DIR / "intake/glp1-weight-management-v1.examples/basic.input.json"


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_profiles(BUNDLED_PROFILES_DIR)


def _map(profiles: ProfileSet, **answers: Any) -> MappedIntake:
    data = json.loads(V1_INPUT.read_text())
    data["answers"].update(answers)
    return map_intake(data, profiles, systems=EXAMPLE_SYSTEMS, patient_id="p1", response_id="q1")


def _of(mapped: MappedIntake, rtype: str) -> list[dict[str, Any]]:
    return [r for r in mapped.derived if r["resourceType"] == rtype]


def test_vital_sign_observations_in_ucum_units(profiles: ProfileSet) -> None:
    mapped = _map(profiles, weight_lb=212, height_in=66)
    weight, height, bmi = _of(mapped, "Observation")
    assert weight["code"]["coding"][0]["code"] == "29463-7"
    assert weight["valueQuantity"] == {
        "value": 96.16,
        "unit": "kg",
        "system": "http://unitsofmeasure.org",
        "code": "kg",
    }
    assert height["code"]["coding"][0]["code"] == "8302-2"
    assert height["valueQuantity"]["value"] == 167.6
    # BMI = 96.16 kg / (1.6764 m)^2 = 34.2
    assert bmi["code"]["coding"][0]["code"] == "39156-5"
    assert bmi["valueQuantity"] == {
        "value": 34.2,
        "unit": "kg/m2",
        "system": "http://unitsofmeasure.org",
        "code": "kg/m2",
    }
    for obs in (weight, height, bmi):
        assert obs["derivedFrom"] == [{"reference": "QuestionnaireResponse/q1"}]
        assert obs["category"][0]["coding"][0]["code"] == "vital-signs"
        assert obs["effectiveDateTime"] == mapped.questionnaire_response["authored"]
        assert resource_problems(obs) == []


def test_observation_ids_are_stable(profiles: ProfileSet) -> None:
    a, b = _map(profiles), _map(profiles)
    assert [r["id"] for r in a.derived] == [r["id"] for r in b.derived]
    system = f"{EXAMPLE_SYSTEMS.base}/intake-observation"
    assert a.derived[0]["id"] == deterministic_id(system, "sub-2026-000123/body-weight")


def test_bmi_needs_both_answers(profiles: ProfileSet) -> None:
    mapped = _map(profiles, goal_weight_lb=None)
    assert len(_of(mapped, "Observation")) == 3
    data = json.loads(V1_INPUT.read_text())
    profile = profiles.intake[("glp1-weight-management", "1")]
    assert [o.id for o in profile.derived.observations] == ["body-weight", "body-height", "bmi"]
    del data  # the required weight/height make a missing BMI impossible for this form


def test_no_flags_for_a_patient_without_risks(profiles: ProfileSet) -> None:
    assert _of(_map(profiles), "Flag") == []


def test_mtc_men2_history_raises_a_high_priority_flag(profiles: ProfileSet) -> None:
    mapped = _map(profiles, history_mtc_or_men2="yes")
    (flag,) = _of(mapped, "Flag")
    assert flag["status"] == "active"
    assert flag["code"]["coding"][0]["code"] == "mtc-men2-history"
    assert "medullary thyroid carcinoma" in flag["code"]["text"]
    priority, detail = flag["extension"]
    assert priority["valueCodeableConcept"]["coding"][0]["code"] == "PH"
    assert detail["valueReference"] == {"reference": "QuestionnaireResponse/q1"}
    assert flag["subject"] == {"reference": "Patient/p1"}
    assert resource_problems(flag) == []


def test_several_rules_raise_several_flags(profiles: ProfileSet) -> None:
    mapped = _map(profiles, history_pancreatitis=True, pregnancy_status="yes", type1_diabetes="Y")
    codes = [f["code"]["coding"][0]["code"] for f in _of(mapped, "Flag")]
    assert codes == ["pancreatitis-history", "pregnancy", "type1-diabetes"]


def test_named_items_scope_equals_whole_response(profiles: ProfileSet) -> None:
    mapped = _map(profiles, history_mtc_or_men2=True)
    qr = mapped.questionnaire_response
    for when in [
        "item.where(linkId = 'history-mtc-men2').answer.value = true",
        "item.where(linkId = 'history-mtc-men2').answer.value = false",
        "item.where(linkId = 'pregnancy-status').answer.value.code = 'no'",
    ]:
        named = FlagSpec(id="x", when=when, text="t")
        whole = FlagSpec(id="x", when=when, text="t", scope="response")
        assert flag_applies(named, qr) == flag_applies(whole, qr), when


def test_prune_keeps_groups_of_named_items() -> None:
    items = [
        {"linkId": "g", "item": [{"linkId": "a", "answer": []}, {"linkId": "b"}]},
        {"linkId": "c"},
    ]
    assert prune_items(items, frozenset({"a"})) == [
        {"linkId": "g", "item": [{"linkId": "a", "answer": []}]}
    ]


def test_consents_from_the_submission(profiles: ProfileSet) -> None:
    telehealth, privacy = _of(_map(profiles), "Consent")
    assert telehealth["scope"]["coding"][0]["code"] == "treatment"
    assert privacy["scope"]["coding"][0]["code"] == "patient-privacy"
    assert telehealth["policy"] == [
        {"uri": "https://telehealth.example.org/legal/telehealth-consent/2026-01"}
    ]
    assert telehealth["dateTime"] == "2026-11-23T13:58:10-05:00"
    assert telehealth["sourceReference"] == {"reference": "QuestionnaireResponse/q1"}
    assert resource_problems(telehealth) == []


def test_retired_derived_resources_say_so() -> None:
    flag = {"resourceType": "Flag", "status": "active"}
    obs = {"resourceType": "Observation", "status": "final"}
    assert retire_derived(flag)["status"] == "inactive"
    assert retire_derived(obs)["status"] == "entered-in-error"


@pytest.mark.parametrize(
    "key",
    [("glp1-weight-management", "1"), ("glp1-weight-management", "2"), ("dermatology-intake", "1")],
)
def test_generated_questionnaires_validate(profiles: ProfileSet, key: tuple[str, str]) -> None:
    q = profile_to_questionnaire(profiles.intake[key])
    Questionnaire.model_validate(q)
    assert resource_problems(q) == []
    assert (q["url"], q["version"]) == (profiles.intake[key].url, key[1])


def test_questionnaire_items_carry_codes_units_enable_when(profiles: ProfileSet) -> None:
    q = profile_to_questionnaire(profiles.intake[("glp1-weight-management", "2")])
    body, _, _, meds, _ = q["item"]
    weight = body["item"][0]
    assert weight["code"] == [
        {"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}
    ]
    assert weight["type"] == "quantity"
    assert [e["valueCoding"]["code"] for e in weight["extension"] if "valueCoding" in e] == [
        "[lb_av]",
        "kg",
    ]
    product = meds["item"][1]
    assert product["type"] == "open-choice"
    assert product["required"] is True
    assert product["enableWhen"] == [
        {"question": "current-glp1", "operator": "=", "answerBoolean": True}
    ]
    assert meds["item"][3]["repeats"] is True and meds["item"][3]["type"] == "group"


def test_two_versions_publish_two_questionnaires(profiles: ProfileSet) -> None:
    v1 = profile_to_questionnaire(profiles.intake[("glp1-weight-management", "1")])
    v2 = profile_to_questionnaire(profiles.intake[("glp1-weight-management", "2")])
    assert v1["url"] == v2["url"] and v1["id"] != v2["id"]
    assert len(json.dumps(v1)) != len(json.dumps(v2))


def test_examples_dir_exists_for_every_intake_profile() -> None:
    for path in (BUNDLED_PROFILES_DIR / "intake").glob("*.yaml"):
        assert Path(str(path).removesuffix(".yaml") + ".examples").is_dir(), path


@pytest.mark.parametrize(
    ("system", "value"),
    [
        ("https://fhir-gateway.example.org/sid/intake-observation", "sub-2026-000123/body-weight"),
        ("https://fhir-gateway.example.org/sid/intake-flag", "sub-1/flag-0"),
        ("", ""),
        ("s", "é ü 日本 \U0001f600 | / \\ \t"),
        ("x" * 500, "y" * 1000),
        *[(f"https://sid.example/{i}", f"bench-{i}/consent-{i % 7}") for i in range(200)],
    ],
)
def test_deterministic_id_is_exactly_uuid5(system: str, value: str) -> None:
    """Ids are persisted: the fast form must equal ``str(uuid.uuid5(...))`` byte for byte."""
    expected = str(uuid.uuid5(derived._NAMESPACE, f"{system}|{value}"))
    assert deterministic_id(system, value) == expected


def test_deterministic_id_is_pinned() -> None:
    """A value computed once with ``uuid.uuid5`` and written down: the namespace and the
    algorithm never drift (the golden examples pin more of them)."""
    assert (
        deterministic_id("https://example.org/sid/intake-observation", "sub-1/bmi")
        == "e8c9c0bd-b621-5c51-9a7e-f14fa0056ca5"
    )
