"""Intake mapping per item type, conversions, value maps, unknowns and conditional
requirements, against the bundled GLP-1 v2 (full-featured) and dermatology profiles."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import BUNDLED_PROFILES_DIR
from mappers import ucum
from mappers.errors import MappingError, MappingErrors
from mappers.pipeline import EXAMPLE_SYSTEMS, MappedIntake, map_intake
from mappers.profiles import ProfileSet, load_profiles
from mappers.validation import resource_problems

V2_INPUT = BUNDLED_PROFILES_DIR / "intake/glp1-weight-management-v2.examples/full.input.json"
DERM_INPUT = BUNDLED_PROFILES_DIR / "intake/dermatology-v1.examples/acne.input.json"


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_profiles(BUNDLED_PROFILES_DIR)


def _input(path: Path = V2_INPUT, **answers: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    data["answers"].update(answers)
    for key in [k for k, v in answers.items() if v is None]:
        del data["answers"][key]
    return data


def _map(profiles: ProfileSet, data: dict[str, Any]) -> MappedIntake:
    return map_intake(data, profiles, systems=EXAMPLE_SYSTEMS, patient_id="p1", response_id="q1")


def _problems(profiles: ProfileSet, data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(MappingErrors) as exc:
        _map(profiles, data)
    return [(p.location, p.code) for p in exc.value.problems]


def _answers(mapped: MappedIntake, link_id: str) -> list[dict[str, Any]]:
    def walk(items: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        for it in items:
            if it["linkId"] == link_id:
                return list(it.get("answer", []))
            found = walk(it.get("item", []))
            if found is not None:
                return found
        return None

    found = walk(mapped.questionnaire_response["item"])
    assert found is not None, link_id
    return found


def _item(mapped: MappedIntake, link_id: str) -> dict[str, Any]:
    stack = list(mapped.questionnaire_response["item"])
    while stack:
        it = stack.pop(0)
        if it["linkId"] == link_id:
            return it
        stack.extend(it.get("item", []))
    raise KeyError(link_id)


def test_full_featured_submission_maps_and_validates(profiles: ProfileSet) -> None:
    mapped = _map(profiles, _input())
    for resource in mapped.resources:
        assert resource_problems(resource) == [], resource["resourceType"]
    qr = mapped.questionnaire_response
    assert qr["questionnaire"] == (
        "https://fhir-gateway.example.org/fhir/Questionnaire/glp1-weight-management|2"
    )


@pytest.mark.parametrize(
    ("link_id", "raw_key", "raw", "expected"),
    [
        ("notes", "additional_notes", "  Felt dizzy.  ", {"valueString": "Felt dizzy."}),
        ("alcohol-per-week", "alcohol_drinks_per_week", "3", {"valueInteger": 3}),
        ("sleep-hours", "sleep_hours", 6.5, {"valueDecimal": 6.5}),
        ("last-physical", "last_physical_exam_date", "03/02/2026", {"valueDate": "2026-03-02"}),
        (
            "last-glp1-dose",
            "last_glp1_dose_at",
            "2026-11-20 08:30-05:00",
            {"valueDateTime": "2026-11-20T08:30:00-05:00"},
        ),
        ("history-pancreatitis", "history_pancreatitis", "N", {"valueBoolean": False}),
        ("history-mtc-men2", "history_mtc_or_men2", "si", {"valueBoolean": True}),
        (
            "current-glp1-product",
            "current_glp1_product",
            "OZEMPIC",
            {
                "valueCoding": {
                    "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                    "code": "1991302",
                    "display": "semaglutide",
                }
            },
        ),
        ("current-glp1-product", "current_glp1_product", "Saxenda", {"valueString": "Saxenda"}),
    ],
)
def test_item_types(
    profiles: ProfileSet, link_id: str, raw_key: str, raw: Any, expected: Any
) -> None:
    mapped = _map(profiles, _input(**{raw_key: raw}))
    assert _answers(mapped, link_id) == [expected]


def test_multi_select_with_aliases_and_concept_map_synonyms(profiles: ProfileSet) -> None:
    mapped = _map(profiles, _input(medical_history=["HTN", "osa", "High Blood Pressure"]))
    codes = [a["valueCoding"]["code"] for a in _answers(mapped, "medical-history")]
    # "HTN" via the glp1-condition-synonyms ConceptMap, "osa" via an alias; duplicates once
    assert codes == ["38341003", "78275009"]


def test_choice_accepts_a_coding(profiles: ProfileSet) -> None:
    coding = {"system": "http://snomed.info/sct", "code": "55822004"}
    mapped = _map(profiles, _input(medical_history=[coding]))
    assert _answers(mapped, "medical-history")[0]["valueCoding"]["display"] == "Hyperlipidemia"


def test_unknown_choice_is_refused(profiles: ProfileSet) -> None:
    assert _problems(profiles, _input(medical_history=["gout"])) == [
        ("answers.medical_history[0]", "invalid_choice")
    ]


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        (212, {"value": 212, "unit": "lb", "code": "[lb_av]"}),
        ({"value": 96.2, "unit": "kg"}, {"value": 96.2, "unit": "kg", "code": "kg"}),
        ({"value": "96.2", "unit": "KG"}, {"value": 96.2, "unit": "kg", "code": "kg"}),
    ],
)
def test_quantity_in_its_units(profiles: ProfileSet, raw: Any, stored: dict[str, Any]) -> None:
    mapped = _map(profiles, _input(weight_lb=raw))
    (answer,) = _answers(mapped, "body-weight")
    assert answer == {"valueQuantity": {**stored, "system": "http://unitsofmeasure.org"}}


def test_quantity_converted_in_to_cm_and_ft_to_cm(profiles: ProfileSet) -> None:
    mapped = _map(profiles, _input(height_in=66))
    assert _answers(mapped, "body-height")[0]["valueQuantity"]["value"] == 167.64
    mapped = _map(profiles, _input(height_in={"value": 6, "unit": "ft"}))
    assert _answers(mapped, "body-height")[0]["valueQuantity"] == {
        "value": 182.88,
        "unit": "cm",
        "system": "http://unitsofmeasure.org",
        "code": "cm",
    }


def test_quantity_range_is_checked_in_the_items_unit(profiles: ProfileSet) -> None:
    # 20 kg = 44 lb < min_value 70 lb
    assert _problems(profiles, _input(weight_lb={"value": 20, "unit": "kg"})) == [
        ("answers.weight_lb", "out_of_range")
    ]


def test_quantity_in_a_unit_the_item_does_not_take(profiles: ProfileSet) -> None:
    (problem,) = _problems(profiles, _input(weight_lb={"value": 90, "unit": "stone"}))
    assert problem == ("answers.weight_lb", "invalid_unit")


def test_ucum_conversions() -> None:
    assert ucum.convert(Decimal(212), "[lb_av]", "kg") == Decimal("96.16")
    assert ucum.convert(Decimal(66), "[in_i]", "cm") == Decimal("167.64")
    assert ucum.convert(Decimal(1), "[ft_i]", "[in_i]") == Decimal("12.00")
    assert ucum.convert(Decimal(500), "g", "kg", decimals=1) == Decimal("0.5")
    with pytest.raises(MappingError) as exc:
        ucum.convert(Decimal(1), "kg", "cm")
    assert exc.value.code == "unknown_unit_conversion"


def test_nested_groups_and_a_repeating_group(profiles: ProfileSet) -> None:
    mapped = _map(profiles, _input())
    meds = _item(mapped, "medications-section")
    entries = [i for i in meds["item"] if i["linkId"] == "medication-list"]
    assert len(entries) == 2  # sdcqr-2: one item per repetition, same linkId
    assert entries[1]["item"][0]["answer"] == [{"valueString": "metformin"}]


def test_repeating_group_answers_are_checked_per_entry(profiles: ProfileSet) -> None:
    data = _input(
        medication_list=[{"medication_name": "a"}, {"medication_dose": "x", "route": "y"}]
    )
    assert sorted(_problems(profiles, data)) == [
        ("answers.medication_list[1].medication_name", "missing_answer"),
        ("answers.medication_list[1].route", "unknown_question"),
    ]


def test_child_of_a_repeating_group_at_the_top_level(profiles: ProfileSet) -> None:
    assert _problems(profiles, _input(medication_name="x")) == [
        ("answers.medication_name", "answer_in_group")
    ]


def test_conditional_requirement_applies_when_enabled(profiles: ProfileSet) -> None:
    data = _input(current_glp1="yes", current_glp1_product=None, last_glp1_dose_at=None)
    assert _problems(profiles, data) == [
        ("answers.current_glp1_product", "missing_answer"),
        ("answers.last_glp1_dose_at", "missing_answer"),
    ]


def test_conditional_question_not_required_when_disabled(profiles: ProfileSet) -> None:
    data = _input(current_glp1=False, current_glp1_product=None, last_glp1_dose_at=None)
    mapped = _map(profiles, data)
    with pytest.raises(KeyError):
        _item(mapped, "current-glp1-product")


def test_answer_to_a_disabled_question_is_refused(profiles: ProfileSet) -> None:
    data = _input(current_glp1=False, last_glp1_dose_at=None)
    assert _problems(profiles, data) == [("answers.current_glp1_product", "answer_not_enabled")]


def test_unknown_or_declined_optional_answer_is_data_absent(profiles: ProfileSet) -> None:
    mapped = _map(
        profiles, _input(recent_hba1c_percent="Prefer not to say", sleep_hours="not sure")
    )
    assert _item(mapped, "recent-hba1c") == {
        "linkId": "recent-hba1c",
        "text": "If you know it, what was your most recent HbA1c (%)?",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                "valueCode": "asked-declined",
            }
        ],
    }
    assert _item(mapped, "sleep-hours")["extension"][0]["valueCode"] == "asked-unknown"


def test_unknown_answer_to_a_required_question_is_an_error(profiles: ProfileSet) -> None:
    assert _problems(profiles, _input(history_pancreatitis="unknown")) == [
        ("answers.history_pancreatitis", "unknown_not_allowed")
    ]


def test_empty_string_counts_as_unanswered(profiles: ProfileSet) -> None:
    mapped = _map(profiles, _input(additional_notes="   "))
    with pytest.raises(KeyError):
        _item(mapped, "notes")
    assert _problems(profiles, _input(history_pancreatitis="")) == [
        ("answers.history_pancreatitis", "missing_answer")
    ]


def test_problems_never_echo_the_value(profiles: ProfileSet) -> None:
    secret = "Jordan-Rivera-1988"
    with pytest.raises(MappingErrors) as exc:
        _map(profiles, _input(sleep_hours=secret, weight_lb=secret))
    assert secret not in json.dumps([p.as_dict() for p in exc.value.problems])


def test_optional_patient_fields_become_data_absent_or_are_left_out(profiles: ProfileSet) -> None:
    data = json.loads(DERM_INPUT.read_text())
    mapped = _map(profiles, data)
    assert "address" not in mapped.patient  # "" for an optional field: left out
    data = copy.deepcopy(data)
    data["patient"]["birth_date"] = "prefer not to say"
    (problem,) = _problems(profiles, data)
    assert problem == ("patient.birth_date", "unknown_not_allowed")  # required by this form


def test_birth_date_declined_where_the_form_allows_it(tmp_path: Path) -> None:
    from tests.support.profiles import DERM, copy_profiles, edit_yaml

    root = copy_profiles(tmp_path / "p")
    edit_yaml(root / DERM, lambda d: d["patient"].update(required=["first_name", "email"]))
    profiles = load_profiles(root)
    data = json.loads(DERM_INPUT.read_text())
    data["patient"].update(birth_date="Prefer not to say", sex_at_birth="", last_name="unknown")
    mapped = _map(profiles, data)
    patient = mapped.patient
    assert "birthDate" not in patient
    assert patient["_birthDate"]["extension"][0]["valueCode"] == "asked-declined"
    assert patient["gender"] == "unknown"
    assert patient["name"] == [{"use": "official", "given": ["Riley"]}]
    assert resource_problems(patient) == []
