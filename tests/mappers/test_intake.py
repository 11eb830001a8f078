"""Tests for mappers.intake: submission -> Patient + QuestionnaireResponse.

Golden output for the bundled sample, one typed answer per item type of the GLP-1 form,
and every kind of problem located at its input path without repeating the input value.
"""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse

from mappers.errors import MappingErrors, ProblemCollector
from mappers.identifiers import IdentifierSystems
from mappers.intake import (
    TIME_DROPPED,
    answers_to_items,
    intake_to_patient,
    intake_to_questionnaire_response,
    parse_intake_submission,
)
from mappers.pipeline import EXAMPLE_SYSTEMS, preview
from mappers.profiles import IntakeProfile, ProfileSet
from mappers.validation import resource_problems
from tests.mappers.conftest import GOLDEN, assert_golden

UCUM = "http://unitsofmeasure.org"
ANSWERS_CS = "https://fhir-gateway.example.org/fhir/CodeSystem/glp1-intake-answers"
SNOMED = "http://snomed.info/sct"


def sample() -> dict[str, Any]:
    """The golden input: the bundled GLP-1 sample submission."""
    return json.loads((GOLDEN / "intake-glp1.input.json").read_text())  # type: ignore[no-any-return]


def parse(profile_set: ProfileSet, data: dict[str, Any]) -> Any:
    """``(submission, profile, items)`` of a valid submission."""
    parsed = parse_intake_submission(data, profile_set.intake_profile, profile_set.concept_maps)
    return parsed.submission, parsed.profile, parsed.items


def problems_of(profile_set: ProfileSet, data: Any) -> dict[str, str]:
    """``{location: code}`` of the problems ``data`` has (it must have some)."""
    with pytest.raises(MappingErrors) as info:
        parse(profile_set, data)
    return {p.location: p.code for p in info.value.problems}


def items_for(
    profile: IntakeProfile, answers: dict[str, Any]
) -> tuple[list[Any], ProblemCollector]:
    problems = ProblemCollector()
    return answers_to_items(answers, profile, problems)[0], problems


def answer_for(profile: IntakeProfile, key: str, value: Any) -> list[dict[str, Any]]:
    """The ``answer`` list the item ``key`` gets for ``value`` (with the other answers valid)."""
    answers = {**sample()["answers"], key: value}
    items, problems = items_for(profile, answers)
    assert not problems.problems, problems.problems
    link = profile.items_by_key[key].linkid
    (item,) = [i for i in items if i["linkId"] == link]
    return item["answer"]  # type: ignore[no-any-return]


def problem_for(profile: IntakeProfile, key: str, value: Any) -> tuple[str, str, str]:
    """``(location, code, message)`` of the single problem ``value`` causes for ``key``."""
    answers = {**sample()["answers"], key: value}
    _, problems = items_for(profile, answers)
    assert len(problems.problems) == 1, problems.problems
    p = problems.problems[0]
    return p.location, p.code, p.message


# --------------------------------------------------------------------------- golden


def test_sample_intake_maps_to_golden_patient_and_questionnaire_response(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    submission, profile, items = parse(profile_set, sample())
    patient = intake_to_patient(submission, patient_id="pat-1", systems=systems)
    qr = intake_to_questionnaire_response(
        submission, profile, items, response_id="qr-1", patient_id="pat-1", systems=systems
    )
    assert_golden({"Patient": patient, "QuestionnaireResponse": qr}, "intake-glp1.expected.json")


def test_sample_resources_validate_and_round_trip_through_r4b(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    submission, profile, items = parse(profile_set, sample())
    patient = intake_to_patient(submission, patient_id="pat-1", systems=systems)
    qr = intake_to_questionnaire_response(
        submission, profile, items, response_id="qr-1", patient_id="pat-1", systems=systems
    )
    assert resource_problems(patient) == []
    assert resource_problems(qr) == []
    assert json.loads(Patient.model_validate(patient).model_dump_json()) == patient
    assert json.loads(QuestionnaireResponse.model_validate(qr).model_dump_json()) == qr


# --------------------------------------------------------------------------- typed answers


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        pytest.param(
            "weight_lb",
            212,
            {"value": 212, "unit": "lb", "system": UCUM, "code": "[lb_av]"},
            id="quantity-int",
        ),
        pytest.param(
            "weight_lb",
            " 212.5 ",
            {"value": 212.5, "unit": "lb", "system": UCUM, "code": "[lb_av]"},
            id="quantity-string",
        ),
        pytest.param(
            "height_in",
            65.5,
            {"value": 65.5, "unit": "in", "system": UCUM, "code": "[in_i]"},
            id="quantity-float",
        ),
    ],
)
def test_quantity_answer_is_a_ucum_quantity(
    glp1_profile: IntakeProfile, key: str, value: Any, expected: dict[str, Any]
) -> None:
    assert answer_for(glp1_profile, key, value) == [{"valueQuantity": expected}]


@pytest.mark.parametrize(
    ("value", "codes"),
    [
        pytest.param(["hypertension", "sleep apnea"], ["38341003", "78275009"], id="aliases"),
        pytest.param(["HIGH BLOOD PRESSURE"], ["38341003"], id="alias-any-case"),
        pytest.param(["Hyperlipidemia"], ["55822004"], id="display"),
        pytest.param(["44054006"], ["44054006"], id="code"),
        pytest.param("t2d", ["44054006"], id="single-string"),
        pytest.param(["gerd", "acid reflux", "235595009"], ["235595009"], id="same-option-once"),
    ],
)
def test_multi_choice_answers_are_codings_one_per_option(
    glp1_profile: IntakeProfile, value: Any, codes: list[str]
) -> None:
    answer = answer_for(glp1_profile, "medical_history", value)
    assert [a["valueCoding"]["code"] for a in answer] == codes
    assert all(a["valueCoding"]["system"] == SNOMED for a in answer)
    assert all(a["valueCoding"]["display"] for a in answer)


def test_choice_answer_accepts_an_alias(glp1_profile: IntakeProfile) -> None:
    assert answer_for(glp1_profile, "pregnancy_status", "N/A") == [
        {
            "valueCoding": {
                "system": ANSWERS_CS,
                "code": "not-applicable",
                "display": "Not applicable",
            }
        }
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("no", False),
        ("N", False),
        (False, False),
        (" No ", False),
        ("0", False),
        ("yes", True),
        ("Y", True),
        (True, True),
        ("true", True),
    ],
)
def test_boolean_answer_from_words_letters_and_json(
    glp1_profile: IntakeProfile, value: Any, expected: bool
) -> None:
    assert answer_for(glp1_profile, "history_pancreatitis", value) == [{"valueBoolean": expected}]


@pytest.mark.parametrize(("value", "expected"), [(2, 2), ("3", 3), (4.0, 4), (0, 0)])
def test_integer_answer(glp1_profile: IntakeProfile, value: Any, expected: int) -> None:
    answer = answer_for(glp1_profile, "alcohol_drinks_per_week", value)
    assert answer == [{"valueInteger": expected}]
    assert type(answer[0]["valueInteger"]) is int


@pytest.mark.parametrize(("value", "expected"), [(5.7, 5.7), ("6.1", 6.1), (7, 7)])
def test_decimal_answer(glp1_profile: IntakeProfile, value: Any, expected: float) -> None:
    assert answer_for(glp1_profile, "recent_hba1c_percent", value) == [{"valueDecimal": expected}]


@pytest.mark.parametrize("value", ["03/02/2026", "3/2/2026", "2026-03-02", "March 2, 2026"])
def test_date_answer_in_us_and_iso_formats(glp1_profile: IntakeProfile, value: str) -> None:
    assert answer_for(glp1_profile, "last_physical_exam_date", value) == [
        {"valueDate": "2026-03-02"}
    ]


def test_text_answer_is_trimmed(glp1_profile: IntakeProfile) -> None:
    assert answer_for(glp1_profile, "current_medications", "  metformin 500 mg  ") == [
        {"valueString": "metformin 500 mg"}
    ]


def test_items_follow_the_form_order_and_skip_unanswered_optional_questions(
    glp1_profile: IntakeProfile,
) -> None:
    answers = sample()["answers"]
    for optional in ("goal_weight_lb", "allergies", "tobacco_use"):
        del answers[optional]
    answers["additional_notes"] = None  # null counts as unanswered
    reversed_answers = dict(reversed(list(answers.items())))
    items, problems = items_for(glp1_profile, reversed_answers)
    assert not problems.problems
    expected = [
        i.linkid for i in glp1_profile.items if i.key in answers and answers[i.key] is not None
    ]
    assert [i["linkId"] for i in items] == expected
    assert {"goal-weight", "allergies", "tobacco-smoking-status", "notes"}.isdisjoint(
        i["linkId"] for i in items
    )


def test_each_item_carries_link_id_and_question_text(glp1_profile: IntakeProfile) -> None:
    items, _ = items_for(glp1_profile, sample()["answers"])
    weight = items[0]
    assert weight["linkId"] == "body-weight"
    assert weight["text"] == "What is your current weight?"


# --------------------------------------------------------------------------- problems


def test_unknown_question_key_is_located(profile_set: ProfileSet) -> None:
    data = sample()
    data["answers"]["favourite_colour"] = "blue"
    assert problems_of(profile_set, data) == {"answers.favourite_colour": "unknown_question"}


@pytest.mark.parametrize("missing", [None, [], ""], ids=["null", "empty-list", "empty-string"])
def test_required_question_without_an_answer_is_located(
    profile_set: ProfileSet, missing: Any
) -> None:
    data = sample()
    data["answers"]["medical_history"] = missing
    del data["answers"]["weight_lb"]
    assert problems_of(profile_set, data) == {
        "answers.weight_lb": "missing_answer",
        "answers.medical_history": "missing_answer",
    }


@pytest.mark.parametrize(
    ("key", "value", "location", "code"),
    [
        ("pregnancy_status", "maybe later", "answers.pregnancy_status", "invalid_choice"),
        ("pregnancy_status", ["no"], "answers.pregnancy_status", "single_answer_expected"),
        (
            "medical_history",
            ["hypertension", "broken toe"],
            "answers.medical_history[1]",
            "invalid_choice",
        ),
        ("weight_lb", 45, "answers.weight_lb", "out_of_range"),
        ("weight_lb", "1200", "answers.weight_lb", "out_of_range"),
        ("height_in", "five feet", "answers.height_in", "invalid_answer"),
        ("alcohol_drinks_per_week", 201, "answers.alcohol_drinks_per_week", "out_of_range"),
        ("alcohol_drinks_per_week", -1, "answers.alcohol_drinks_per_week", "out_of_range"),
        ("alcohol_drinks_per_week", 2.5, "answers.alcohol_drinks_per_week", "invalid_answer"),
        ("recent_hba1c_percent", 25.1, "answers.recent_hba1c_percent", "out_of_range"),
        ("recent_hba1c_percent", True, "answers.recent_hba1c_percent", "invalid_answer"),
        ("history_pancreatitis", "sometimes", "answers.history_pancreatitis", "invalid_answer"),
        (
            "last_physical_exam_date",
            "02/30/2026",
            "answers.last_physical_exam_date",
            "invalid_date",
        ),
        (
            "last_physical_exam_date",
            "03/02/26",
            "answers.last_physical_exam_date",
            "ambiguous_date",
        ),
        ("last_physical_exam_date", 20260302, "answers.last_physical_exam_date", "invalid_answer"),
        ("current_medications", "x" * 2001, "answers.current_medications", "answer_too_long"),
        ("current_medications", {"drug": "x"}, "answers.current_medications", "invalid_answer"),
        (
            "current_medications",
            "metformin\x00500",
            "answers.current_medications",
            "invalid_character",
        ),
    ],
)
def test_bad_answer_is_located_with_its_code(
    glp1_profile: IntakeProfile, key: str, value: Any, location: str, code: str
) -> None:
    found_location, found_code, message = problem_for(glp1_profile, key, value)
    assert (found_location, found_code) == (location, code)
    if isinstance(value, str) and len(value) > 3:
        assert value.strip() not in message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_invalid_answers_not_crashes(
    glp1_profile: IntakeProfile, value: float
) -> None:
    # json.loads accepts NaN and Infinity; they must be reported, not raise.
    for key in ("weight_lb", "alcohol_drinks_per_week", "recent_hba1c_percent"):
        location, code, _ = problem_for(glp1_profile, key, value)
        assert (location, code) == (f"answers.{key}", "invalid_answer")


def test_missing_required_consent_is_located(profile_set: ProfileSet) -> None:
    data = sample()
    data["consents"] = [c for c in data["consents"] if c["type"] != "privacy"]
    with pytest.raises(MappingErrors) as info:
        parse(profile_set, data)
    (problem,) = info.value.problems
    assert (problem.location, problem.code) == ("consents", "missing_consent")
    assert "privacy" in problem.message


def test_no_consents_at_all_reports_each_required_one(profile_set: ProfileSet) -> None:
    data = sample()
    del data["consents"]
    with pytest.raises(MappingErrors) as info:
        parse(profile_set, data)
    assert [p.code for p in info.value.problems] == ["missing_consent", "missing_consent"]


@pytest.mark.parametrize(
    ("form", "location", "code"),
    [
        ({"id": "glp1-weight-management", "version": "9"}, "form", "unknown_form"),
        ({"id": "no-such-form", "version": "1"}, "form", "unknown_form"),
    ],
)
def test_unknown_form_or_version(
    profile_set: ProfileSet, form: dict[str, str], location: str, code: str
) -> None:
    data = sample()
    data["form"] = form
    assert problems_of(profile_set, data) == {location: code}


def test_every_problem_of_a_submission_is_reported_at_once(profile_set: ProfileSet) -> None:
    data = sample()
    data["patient"]["phone"] = "555-1234"
    data["patient"]["address"]["state"] = "Teksis"
    data["patient"]["birth_date"] = "04/12/88"
    data["patient"]["nickname"] = "JR"
    data["submitted_at"] = "2026-11-23T14:00:00"  # no offset
    data["answers"]["weight_lb"] = 12
    data["answers"]["pregnancy_status"] = "perhaps"
    data["consents"] = []
    found = problems_of(profile_set, data)
    assert found == {
        "patient.phone": "invalid_phone",
        "patient.address.state": "invalid_state",
        "patient.birth_date": "ambiguous_date",
        "patient.nickname": "extra_forbidden",
        "submitted_at": "timezone_aware",
        "answers.weight_lb": "out_of_range",
        "answers.pregnancy_status": "invalid_choice",
        "consents": "missing_consent",
    }


def test_blank_address_parts_are_reported_at_their_input_path(profile_set: ProfileSet) -> None:
    data = sample()
    data["patient"]["address"].update(line1="   ", city=" ")
    assert problems_of(profile_set, data) == {
        "patient.address.line1": "string_too_short",
        "patient.address.city": "string_too_short",
    }


def test_a_blank_second_address_line_is_left_out(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    data = sample()
    data["patient"]["address"]["line2"] = "  "
    submission, _, _ = parse(profile_set, data)
    patient = intake_to_patient(submission, patient_id="pat-1", systems=systems)
    assert patient["address"][0]["line"] == ["100 Market St"]


def test_problem_messages_never_repeat_the_input(profile_set: ProfileSet) -> None:
    data = sample()
    data["patient"]["phone"] = "415-555-26"
    data["patient"]["email"] = "jordan.rivera-at-example.com"
    data["patient"]["birth_date"] = "1988-02-30"
    data["patient"]["first_name"] = ""
    data["answers"]["current_medications"] = "semaglutide " * 200
    with pytest.raises(MappingErrors) as info:
        parse(profile_set, data)
    text = json.dumps([p.as_dict() for p in info.value.problems])
    for secret in ("415-555-26", "jordan.rivera", "1988-02-30", "semaglutide"):
        assert secret not in text


def test_a_non_object_body_is_reported_not_raised(profile_set: ProfileSet) -> None:
    assert problems_of(profile_set, ["not", "an", "object"]) == {"": "model_type"}


# --------------------------------------------------------------------------- Patient


def test_patient_demographics_are_normalized(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    submission, _, _ = parse(profile_set, sample())
    patient = intake_to_patient(submission, patient_id="pat-1", systems=systems)
    assert patient["name"] == [{"use": "official", "family": "Rivera", "given": ["Jordan"]}]
    assert patient["birthDate"] == "1988-04-12"
    assert patient["telecom"] == [
        {"system": "phone", "value": "+14155552671", "use": "mobile"},
        {"system": "email", "value": "jordan.rivera@example.com"},
    ]
    assert patient["address"][0]["state"] == "CA"
    assert patient["identifier"] == [
        {"system": f"{systems.base}/patient-id", "value": "pat-1"},
        {"system": f"{systems.base}/external-patient-id", "value": "app-user-8812"},
    ]


@pytest.mark.parametrize(
    ("sex", "gender", "birthsex"),
    [
        ("female", "female", "F"),
        ("male", "male", "M"),
        ("other", "other", "UNK"),
    ],
)
def test_sex_at_birth_gives_gender_and_us_core_birthsex(
    profile_set: ProfileSet, systems: IdentifierSystems, sex: str, gender: str, birthsex: str
) -> None:
    data = sample()
    data["patient"]["sex_at_birth"] = sex
    submission, _, _ = parse(profile_set, data)
    patient = intake_to_patient(submission, patient_id="pat-1", systems=systems)
    assert patient["gender"] == gender
    assert patient["extension"] == [
        {
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
            "valueCode": birthsex,
        }
    ]
    assert resource_problems(patient) == []


def test_patient_without_external_id_or_line2(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    data = sample()
    del data["patient"]["external_id"]
    del data["patient"]["address"]["line2"]
    submission, _, _ = parse(profile_set, data)
    patient = intake_to_patient(submission, patient_id="pat-1", systems=systems)
    assert patient["identifier"] == [{"system": f"{systems.base}/patient-id", "value": "pat-1"}]
    assert patient["address"][0]["line"] == ["100 Market St"]


# --------------------------------------------------------------------------- QuestionnaireResponse


def test_questionnaire_response_header(profile_set: ProfileSet, systems: IdentifierSystems) -> None:
    submission, profile, items = parse(profile_set, sample())
    qr = intake_to_questionnaire_response(
        submission, profile, items, response_id="qr-1", patient_id="pat-1", systems=systems
    )
    assert qr["questionnaire"] == (
        "https://fhir-gateway.example.org/fhir/Questionnaire/glp1-weight-management|1"
    )
    assert qr["status"] == "completed"
    assert qr["identifier"] == {
        "system": f"{systems.base}/intake-submission",
        "value": "sub-2026-000123",
    }
    assert qr["authored"] == "2026-11-23T14:00:00-05:00"
    assert qr["subject"] == qr["author"] == qr["source"] == {"reference": "Patient/pat-1"}


def test_amended_questionnaire_response_validates(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    submission, profile, items = parse(profile_set, sample())
    qr = intake_to_questionnaire_response(
        submission,
        profile,
        items,
        response_id="qr-1",
        patient_id="pat-1",
        systems=systems,
        status="amended",
    )
    assert qr["status"] == "amended"
    assert resource_problems(qr) == []


def test_parsing_does_not_modify_the_input(profile_set: ProfileSet) -> None:
    data = sample()
    before = copy.deepcopy(data)
    parse(profile_set, data)
    assert data == before


def test_unknown_sex_at_birth_is_refused_where_the_form_requires_it(
    profile_set: ProfileSet,
) -> None:
    # GLP-1 v1 requires sex_at_birth: "unknown" is an answer a required field cannot take.
    data = sample()
    data["patient"]["sex_at_birth"] = "unknown"
    assert problems_of(profile_set, data) == {"patient.sex_at_birth": "unknown_not_allowed"}


def _reference_option(item: Any, value: str) -> Any:
    """The option a text answer selects, as matched before spellings were precompiled:
    the first option (in order) whose folded code, display or alias equals the answer."""

    def fold(text: str) -> str:
        return " ".join(text.split()).casefold()

    for option in item.options:
        spellings = [option.code or "", option.display, *option.aliases]
        if fold(value) in [fold(s) for s in spellings]:
            return option
    return None


def test_precompiled_option_spellings_pick_what_the_option_scan_picked(
    glp1_profile: IntakeProfile,
) -> None:
    choices = [item for _, item in glp1_profile.walk() if item.is_choice]
    assert choices
    for item in choices:
        spellings = [s for o in item.options for s in (o.code or "", o.display, *o.aliases)] + [
            "  " + (item.options[0].display.upper()) + " ",
            "",
            "no such answer",
        ]
        for value in spellings:
            assert item.option_by_spelling.get(" ".join(value.split()).casefold()) is (
                _reference_option(item, value)
            )


def test_the_first_option_with_a_spelling_wins_and_codings_are_fresh() -> None:
    profile = IntakeProfile.model_validate(
        {
            "id": "t",
            "version": "1",
            "title": "T",
            "program": "t",
            "url": "https://example.org/Questionnaire/t",
            "answer_values": {"unknown": ["Maybe"], "declined": ["maybe", "skip"]},
            "items": [
                {
                    "key": "q",
                    "text": "Q",
                    "type": "choice",
                    "options": [
                        {"system": "s", "code": "a", "display": "Alpha", "aliases": ["B"]},
                        {"system": "s", "code": "b", "display": "Beta"},
                    ],
                }
            ],
        }
    )
    problems = ProblemCollector()
    items, _ = answers_to_items({"q": "b"}, profile, problems)
    assert [a["valueCoding"]["code"] for a in items[0]["answer"]] == ["a"]
    items[0]["answer"][0]["valueCoding"]["code"] = "changed"
    again, _ = answers_to_items({"q": "b"}, profile, problems)
    assert again[0]["answer"][0]["valueCoding"]["code"] == "a"
    # a spelling listed as both unknown and declined is unknown (unknown is checked first)
    assert profile.answer_values.absent_reasons == {
        "maybe": "asked-unknown",
        "skip": "asked-declined",
    }
    assert not problems.problems


# --------------------------------------------------------------------------- real-world answers


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tobacco_use", ["never"]),
        ("tobacco_use", ["never", "former"]),
        ("alcohol_drinks_per_week", [2]),
    ],
    ids=["choice-one-element", "choice-two", "integer"],
)
def test_a_list_for_a_single_answer_question_says_so(
    glp1_profile: IntakeProfile, key: str, value: Any
) -> None:
    """Checkbox-style widgets send lists; the problem names the list, not the option."""
    assert problem_for(glp1_profile, key, value) == (
        f"answers.{key}",
        "single_answer_expected",
        "this question takes one answer, not a list",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Yes", True), ("Y", True), ("true", True), (1, True), ("1", True), (0, False)],
)
def test_boolean_spellings_apps_send(
    glp1_profile: IntakeProfile, value: Any, expected: bool
) -> None:
    assert answer_for(glp1_profile, "history_pancreatitis", value) == [{"valueBoolean": expected}]


@pytest.mark.parametrize(
    "value",
    ["185.5 lbs", "185,5", {"value": 185.5, "unit": "lbs"}, "5'10\""],
    ids=["number-with-unit-text", "decimal-comma", "unit-not-ucum", "feet-and-inches"],
)
def test_quantity_text_the_profiles_do_not_claim_is_refused_clearly(
    glp1_profile: IntakeProfile, value: Any
) -> None:
    """Quantities are a number in the item's unit or ``{"value", "unit"}`` (docs/PROFILES.md);
    free text is refused with what was expected, never guessed."""
    location, code, message = problem_for(glp1_profile, "weight_lb", value)
    assert location == "answers.weight_lb"
    assert (code, message) in {
        ("invalid_answer", "expected a number in lb"),
        ("invalid_unit", "unit must be one of lb, kg"),
    }


def test_null_for_an_optional_question_is_unanswered(glp1_profile: IntakeProfile) -> None:
    items, problems = items_for(glp1_profile, {**sample()["answers"], "allergies": None})
    assert not problems.problems
    assert "allergies" not in [i["linkId"] for i in items]


@pytest.mark.parametrize("zip_number", [2134, 94105], ids=["lost-leading-zero", "five-digits"])
def test_a_zip_sent_as_a_json_number_is_refused_with_why(
    profile_set: ProfileSet, zip_number: int
) -> None:
    """A JSON client that sends ``02134`` as a number sends ``2134``: which digit was lost
    cannot be known, so the problem asks for a string instead of "not a valid string"."""
    data = sample()
    data["patient"]["address"]["postal_code"] = zip_number
    with pytest.raises(MappingErrors) as info:
        parse(profile_set, data)
    ((location, code, message),) = [(p.location, p.code, p.message) for p in info.value.problems]
    assert (location, code) == ("patient.address.postal_code", "postal_code_not_text")
    assert "JSON string" in message and "leading zeros" in message


@pytest.mark.parametrize(
    ("state", "postal_code", "expected"),
    [
        ("ca", "94107-1234", ("CA", "94107-1234")),
        ("Calif.", "941071234", ("CA", "94107-1234")),
        ("California ", "94107", ("CA", "94107")),
        ("D.C.", "20001", ("DC", "20001")),
        ("Washington DC", "20001", ("DC", "20001")),
        ("Puerto Rico", "00901", ("PR", "00901")),
        ("GU", "96910", ("GU", "96910")),
        ("VI", "00802", ("VI", "00802")),
        ("AE", "09001", ("AE", "09001")),
        ("AP", "96201", ("AP", "96201")),
        ("AA", "34001", ("AA", "34001")),
    ],
)
def test_real_world_states_and_zips(
    profile_set: ProfileSet, state: str, postal_code: str, expected: tuple[str, str]
) -> None:
    data = sample()
    data["patient"]["address"].update(state=state, postal_code=postal_code)
    submission, _, _ = parse(profile_set, data)
    assert (submission.patient.address.state, submission.patient.address.postal_code) == expected


def test_a_canadian_province_is_refused_as_a_us_state(profile_set: ProfileSet) -> None:
    data = sample()
    data["patient"]["address"]["state"] = "Ontario"
    assert problems_of(profile_set, data) == {"patient.address.state": "invalid_state"}


# --------------------------------------------------------------------------- real-world values


def _with_date_order(profile_set: ProfileSet, order: str | None) -> Any:
    """A find_profile whose forms declare ``date_order``."""

    def find(form_id: str, version: str) -> IntakeProfile | None:
        found = profile_set.intake_profile(form_id, version)
        return found.model_copy(update={"date_order": order}) if found else None

    return find


@pytest.mark.parametrize(
    ("order", "birth_date", "exam_date", "expected"),
    [
        pytest.param(None, "04/12/1988", "03/02/2026", ("1988-04-12", "2026-03-02"), id="us"),
        pytest.param("DMY", "12/04/1988", "02/03/2026", ("1988-04-12", "2026-03-02"), id="dmy"),
        pytest.param("DMY", "12.04.1988", "2.3.2026", ("1988-04-12", "2026-03-02"), id="dots"),
        pytest.param(None, "25/12/1988", "2026-03-02", ("1988-12-25", "2026-03-02"), id="one"),
    ],
)
def test_the_forms_date_order_reads_birth_date_and_date_answers(
    profile_set: ProfileSet,
    order: str | None,
    birth_date: str,
    exam_date: str,
    expected: tuple[str, str],
) -> None:
    data = sample()
    data["patient"]["birth_date"] = birth_date
    data["answers"]["last_physical_exam_date"] = exam_date
    parsed = parse_intake_submission(
        data, _with_date_order(profile_set, order), profile_set.concept_maps
    )
    exam = parsed.answers["last_physical_exam_date"].values[0][0]["valueDate"]
    assert (parsed.submission.patient.birth_date, exam) == expected
    assert parsed.notes == []


def test_a_date_with_two_readings_is_refused_without_a_date_order(
    profile_set: ProfileSet,
) -> None:
    data = sample()
    data["patient"]["birth_date"] = "12.04.1988"
    data["answers"]["last_physical_exam_date"] = "02.03.2026"
    assert problems_of(profile_set, data) == {
        "patient.birth_date": "ambiguous_date",
        "answers.last_physical_exam_date": "ambiguous_date",
    }


def test_a_time_of_day_dropped_from_a_date_is_noted_where_it_was(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    data = sample()
    data["patient"]["birth_date"] = "1988-04-12T10:49:00Z"
    data["answers"]["last_physical_exam_date"] = "3/2/2026 9:30 AM"
    parsed = parse_intake_submission(data, profile_set.intake_profile, profile_set.concept_maps)
    assert parsed.submission.patient.birth_date == "1988-04-12"
    assert [(n.location, n.code) for n in parsed.notes] == [
        ("patient.birth_date", "time_dropped"),
        ("answers.last_physical_exam_date", "time_dropped"),
    ]
    text = json.dumps([n.as_dict() for n in parsed.notes])
    assert "10:49" not in text and "1988" not in text


def test_a_phone_extension_is_kept_beside_the_e164_value(
    profile_set: ProfileSet, systems: IdentifierSystems
) -> None:
    data = sample()
    data["patient"]["phone"] = "(415) 555-2671 ext. 12"
    submission, _, _ = parse(profile_set, data)
    patient = intake_to_patient(submission, patient_id="pat-1", systems=systems)
    assert patient["telecom"][0] == {
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/contactpoint-extension",
                "valueString": "12",
            }
        ],
        "system": "phone",
        "value": "+14155552671",
        "use": "mobile",
    }
    assert resource_problems(patient) == []
    assert json.loads(Patient.model_validate(patient).model_dump_json()) == patient


@pytest.mark.parametrize(
    ("phone", "value"),
    [
        pytest.param("tel:+1-415-555-2671", "+14155552671", id="tel-uri"),
        pytest.param("1-800-FLOWERS", "+18003569377", id="vanity"),
    ],
)
def test_real_world_phones(
    profile_set: ProfileSet, systems: IdentifierSystems, phone: str, value: str
) -> None:
    data = sample()
    data["patient"]["phone"] = phone
    submission, _, _ = parse(profile_set, data)
    patient = intake_to_patient(submission, patient_id="pat-1", systems=systems)
    assert patient["telecom"][0] == {"system": "phone", "value": value, "use": "mobile"}


@pytest.mark.parametrize(
    ("state", "expected"),
    [("Tex.", "TX"), ("06", "CA"), ("Calfornia", "CA"), ("N.Y.", "NY")],
)
def test_real_world_states_beyond_usps_codes(
    profile_set: ProfileSet, state: str, expected: str
) -> None:
    data = sample()
    data["patient"]["address"]["state"] = state
    submission, _, _ = parse(profile_set, data)
    assert submission.patient.address.state == expected


def test_the_provenance_names_a_dropped_time_without_the_value(profile_set: ProfileSet) -> None:
    data = sample()
    data["patient"]["birth_date"] = "1988-04-12 08:15"
    result = preview(data, profile_set, recorded=datetime(2026, 11, 23, 20, tzinfo=UTC))
    assert result.problems == []
    [provenance] = [r for r in result.resources if r["resourceType"] == "Provenance"]
    assert provenance["extension"] == [
        {
            "url": f"{EXAMPLE_SYSTEMS.base}/normalization-note",
            "extension": [
                {"url": "input", "valueString": "patient.birth_date"},
                {"url": "code", "valueCode": "time_dropped"},
                {"url": "text", "valueString": TIME_DROPPED[1]},
            ],
        }
    ]
    assert "08:15" not in json.dumps(provenance)
