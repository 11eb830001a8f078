"""Each lint rule: a bad profile, and the message (with file and line) it gets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mappers.profiles import ProfileLoadError, load_profiles
from tests.support.profiles import (
    ACME,
    GLP1_V1,
    GLP1_V2,
    PLANS,
    PROCESSORS,
    copy_profiles,
    edit_yaml,
    item,
)


def _load_problems(root: Path) -> list[Any]:
    with pytest.raises(ProfileLoadError) as exc:
        load_profiles(root)
    return exc.value.problems


def _one(root: Path, code: str) -> Any:
    found = [p for p in _load_problems(root) if p.code == code]
    assert found, f"no {code} problem"
    return found[0]


Edit = Callable[[dict[str, Any]], None]


def _bad(tmp_path: Path, rel: str, change: Edit) -> Path:
    root = copy_profiles(tmp_path / "profiles")
    edit_yaml(root / rel, change)
    return root


def test_bundled_profiles_lint_clean() -> None:
    from gateway.settings import BUNDLED_PROFILES_DIR

    profiles = load_profiles(BUNDLED_PROFILES_DIR)
    assert profiles.warnings == []


def test_duplicate_answer_key(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["items"][1]["key"] = d["items"][0]["key"]
        d["items"][1]["link_id"] = "other-link"

    p = _one(_bad(tmp_path, GLP1_V1, change), "duplicate-key")
    assert p.message == "answer key 'weight_lb' is used twice"
    assert p.location.startswith(f"{GLP1_V1}:") and p.location.endswith("items[1].key")


def test_duplicate_link_id(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["items"][2]["link_id"] = d["items"][0]["link_id"]

    p = _one(_bad(tmp_path, GLP1_V1, change), "duplicate-link-id")
    assert p.message == "linkId 'body-weight' is used twice"
    assert p.location.endswith("items[2].link_id")


def test_unknown_link_id_in_enable_when(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        item(d, "last_glp1_dose_at")["enable_when"][0]["question"] = "no_such_question"

    p = _one(_bad(tmp_path, GLP1_V2, change), "unknown-link-id")
    assert p.message == "enable_when names unknown question 'no_such_question'"
    assert "enable_when[0].question" in p.location


def test_unknown_link_id_in_fhirpath(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["derived"]["flags"][0]["when"] = "item.where(linkId = 'history-mtc').answer.value = true"

    p = _one(_bad(tmp_path, GLP1_V1, change), "unknown-link-id")
    assert p.message == "FHIRPath names unknown linkId 'history-mtc'"
    assert p.location.endswith("derived.flags[0].when")


def test_unknown_question_in_observation(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["derived"]["observations"][0]["from"] = "weight_kg"

    p = _one(_bad(tmp_path, GLP1_V1, change), "unknown-link-id")
    assert p.message == "observation names unknown question 'weight_kg'"


def test_enable_when_answer_the_question_cannot_have(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        item(d, "last_glp1_dose_at")["enable_when"][0]["answer"] = "maybe"

    p = _one(_bad(tmp_path, GLP1_V2, change), "unknown-answer")
    assert "question 'current_glp1' is boolean" in p.message


def test_choice_answer_without_code(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        del item(d, "activity_level")["options"][1]["code"]

    p = _one(_bad(tmp_path, GLP1_V1, change), "choice-without-code")
    assert p.message == "answer option 'Lightly active' has no code"
    line = int(p.location.split(":")[1])
    text = (tmp_path / "profiles" / GLP1_V1).read_text().splitlines()
    assert "Lightly active" in text[line - 1] or "Lightly active" in "\n".join(
        text[line - 1 : line + 3]
    )


def test_unknown_ucum_unit(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        item(d, "weight_lb")["unit"] = "[stone_av]"

    p = _one(_bad(tmp_path, GLP1_V1, change), "unknown-ucum-conversion")
    assert p.message == "unknown UCUM unit '[stone_av]'"
    assert p.location.endswith("items[0].unit")


def test_ucum_conversion_between_dimensions(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        item(d, "height_in")["convert_to"] = "kg"

    p = _one(_bad(tmp_path, GLP1_V2, change), "unknown-ucum-conversion")
    assert p.message == "no UCUM conversion from [in_i] to kg"


def test_observation_unit_not_convertible(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["derived"]["observations"][0]["unit"] = "cm"

    p = _one(_bad(tmp_path, GLP1_V1, change), "unknown-ucum-conversion")
    assert p.message == "no UCUM conversion from [lb_av] to cm"


def test_fhirpath_that_does_not_parse(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["derived"]["flags"][1]["when"] = "item.where(linkId = 'history-pancreatitis'"

    p = _one(_bad(tmp_path, GLP1_V1, change), "fhirpath-syntax")
    assert p.message.startswith("FHIRPath does not parse: column ")
    assert "missing ')'" in p.message
    assert p.location.endswith("derived.flags[1].when")


def test_fhirpath_unknown_function(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["derived"]["flags"][1]["when"] = "item.frobnicate()"

    p = _one(_bad(tmp_path, GLP1_V1, change), "fhirpath-syntax")
    assert p.message == "FHIRPath does not evaluate: Not implemented: frobnicate"


def test_observation_from_a_question_that_is_not_a_quantity(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["derived"]["observations"][0]["from"] = "alcohol_drinks_per_week"

    p = _one(_bad(tmp_path, GLP1_V1, change), "wrong-item-type")
    assert p.message == "question 'alcohol_drinks_per_week' is a integer, not a quantity"


def test_plan_without_medication(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        del d["plans"]["glp1-semaglutide-starter"]["medication"]

    p = _one(_bad(tmp_path, PLANS, change), "plan-without-medication")
    assert p.message == "plan 'glp1-semaglutide-starter' has no medication"
    assert p.location.startswith(f"{PLANS}:")


def test_duplicate_plan(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["plans"] = {
            "glp1-semaglutide-starter": {
                "program": "glp1-weight-management",
                "medication": {
                    "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                    "code": "1991306",
                },
            }
        }

    p = _one(_bad(tmp_path, PROCESSORS, change), "duplicate-plan")
    assert "plan 'glp1-semaglutide-starter' is also in checkout profile" in p.message


def test_duplicate_processor(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        processors = yaml_load(tmp_path / "profiles" / PROCESSORS)["processors"]
        d["processors"] = processors

    root = copy_profiles(tmp_path / "profiles")
    edit_yaml(root / PLANS, change)
    p = _one(root, "duplicate-processor")
    assert "processor 'stripe' is also in checkout profile" in p.message


def yaml_load(path: Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(path.read_text()))


def test_unknown_concept_map_for_synonyms(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        item(d, "medical_history")["synonyms"] = "no-such-map"

    p = _one(_bad(tmp_path, GLP1_V2, change), "unknown-concept-map")
    assert p.message == "no concept map 'no-such-map' in concept-maps/"


def test_unknown_concept_map_for_ehr_translation(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["overrides"]["code_translations"][0]["concept_map"] = "missing-formulary"

    p = _one(_bad(tmp_path, ACME, change), "unknown-concept-map")
    assert p.message == "no concept map 'missing-formulary' in concept-maps/"
    assert p.location.startswith(f"{ACME}:")


def test_invalid_override_extension(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["overrides"]["extensions"][0]["extension"] = {"url": "http://x", "valueInteger": "many"}

    p = _one(_bad(tmp_path, ACME, change), "invalid-extension")
    assert p.message.startswith("not a valid FHIR Extension (valueInteger:")


def test_ownership_conflict(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["patient"]["owns"] = ["birthDate"]

    p = _one(_bad(tmp_path, PROCESSORS, change), "ownership-conflict")
    assert p.message.startswith("Patient element birthDate is also owned by intake/")


def test_warnings_do_not_refuse_the_set(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["required_consents"] = ["telehealth", "privacy", "hipaa"]

    root = _bad(tmp_path, GLP1_V1, change)
    profiles = load_profiles(root)
    codes = {(w.code, w.message) for w in profiles.warnings}
    assert ("consent-without-mapping", "consent 'hipaa' has no derived.consents entry") in codes


def test_plan_for_a_program_no_form_has_is_a_warning(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["plans"]["glp1-semaglutide-starter"]["program"] = "sleep-medicine"

    profiles = load_profiles(_bad(tmp_path, PLANS, change))
    assert [w.code for w in profiles.warnings] == ["unknown-program"]


def test_a_workflow_without_the_deferred_payment_event_is_a_warning(tmp_path: Path) -> None:
    """An older workflow.yaml: the set still loads (a deferred checkout's case event then
    goes to the exceptions queue), and the warning says what to add."""

    def change(d: dict[str, Any]) -> None:
        del d["events"]["payment_deferred"], d["initial"]["payment_deferred"]
        d["states"].remove("payment_deferred")
        d["transitions"] = [
            {**t, "from": [s for s in t["from"] if s != "payment_deferred"]}
            for t in d["transitions"]
            if t["event"] != "payment_deferred" and t["from"] != ["payment_deferred"]
        ]

    profiles = load_profiles(_bad(tmp_path, "workflow.yaml", change))
    [warning] = profiles.warnings
    assert warning.code == "checkout-event-not-in-workflow"
    assert "'payment_deferred'" in warning.message
    assert warning.location.startswith(f"{PLANS}:")
