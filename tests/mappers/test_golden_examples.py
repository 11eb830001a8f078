"""The golden example runner: pass, path-level diff on mismatch, unmapped-field coverage."""

from __future__ import annotations

import json
from pathlib import Path

from mappers.examples import run_examples, unmapped_fields
from mappers.fhirdiff import json_diff, resources_diff
from mappers.profiles import load_profiles
from tests.support.profiles import copy_profiles

V1_EXAMPLES = "intake/glp1-weight-management-v1.examples"


def test_bundled_examples_pass() -> None:
    from gateway.settings import BUNDLED_PROFILES_DIR

    results = run_examples(load_profiles(BUNDLED_PROFILES_DIR))
    assert len(results) >= 8
    assert [
        (r.case, r.status, r.unmapped) for r in results if r.status != "pass" or r.unmapped
    ] == []


def test_path_level_diff_format() -> None:
    old = {"item": [{}, {}, {}, {"answer": [{"valueCoding": {"code": "Y"}}]}]}
    new = {"item": [{}, {}, {}, {"answer": [{"valueCoding": {"code": "N"}}]}]}
    assert json_diff(old, new) == ['item[3].answer[0].valueCoding.code: -"Y" +"N"']
    assert json_diff({"a": 1}, {"a": 1, "b": [2]}) == ["b: +[2]"]
    assert json_diff({"a": [1, 2]}, {"a": [1]}) == ["a[1]: -2"]
    assert json_diff({"v": 1}, {"v": 1.0}) == ["v: -1 +1.0"]


def test_resources_diff_pairs_by_type_and_id() -> None:
    old = [{"resourceType": "Flag", "id": "f", "status": "active", "meta": {"versionId": "2"}}]
    new = [
        {"resourceType": "Flag", "id": "f", "status": "inactive"},
        {"resourceType": "Observation", "id": "o"},
    ]
    assert resources_diff(old, new) == [
        'Flag/f.status: -"active" +"inactive"',
        'Observation/o: +{"id":"o","resourceType":"Observation"}',
    ]


def test_a_profile_change_shows_as_a_diff(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    path = root / "intake/glp1-weight-management-v1.yaml"
    path.write_text(
        path.read_text().replace(
            "{system: *answers, code: light, display: Lightly active}",
            "{system: *answers, code: lightly-active, display: Lightly active, aliases: [light]}",
        )
    )
    results = {r.case: r for r in run_examples(load_profiles(root))}
    basic = results["basic"]
    assert basic.status == "mismatch"
    (line,) = basic.diff
    assert line.startswith("QuestionnaireResponse/")
    assert line.endswith('.answer[0].valueCoding.code: -"light" +"lightly-active"')
    assert ".item[" in line


def test_golden_files_are_written_on_request(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    expected = root / V1_EXAMPLES / "basic.expected.json"
    expected.unlink()
    (result,) = [r for r in run_examples(load_profiles(root)) if r.case == "basic"]
    assert result.status == "failed"
    assert result.problems[0].code == "missing_expected"
    (result,) = [r for r in run_examples(load_profiles(root), write=True) if r.case == "basic"]
    assert result.status == "written"
    assert json.loads(expected.read_text())["type"] == "collection"


def test_unmapped_fields_of_an_example_are_reported(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    stripe = root / "checkout/glp1-plans.examples/stripe.input.json"
    event = json.loads(stripe.read_text())
    event["data"]["object"]["metadata"]["promo_code"] = "FALL10"
    event["data"]["object"]["shipping_details"] = {"name": "x"}
    stripe.write_text(json.dumps(event))
    (result,) = [r for r in run_examples(load_profiles(root)) if r.case == "stripe"]
    assert result.status == "pass"
    assert result.unmapped == [
        "data.object.metadata.promo_code",
        "data.object.shipping_details.name",
    ]


def test_unmapped_fields_helper() -> None:
    data = {"a": {"b": 1, "c": [1, 2]}, "d": [{"e": 1}]}
    assert unmapped_fields(data, ["a.b", "d"]) == ["a.c"]
