"""Loading profiles: all or nothing, every problem with file, line and path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict

from mappers.profiles import PROFILE_KINDS, ProfileKind, ProfileLoadError, load_profiles
from mappers.profiles.schema import render, stale_schemas
from tests.support.profiles import GLP1_V1, PLANS, copy_profiles, edit_yaml


def _assert_a_complete_bundled_set(root: Path) -> None:
    """What the bundled set must be, by its properties rather than its exact members, so
    an analyst who follows docs/PROFILES.md (a new form version, a new plan) keeps the
    suite green: every profile file on disk is loaded, one per key; every kind is there;
    what the README, the demo and the tests use is there; nothing delivers by default."""
    profiles = load_profiles(root)
    loaded = {s.path for s in profiles.sources.values()}
    for kind in PROFILE_KINDS.values():
        assert profiles.by_kind[kind.name], f"no {kind.name} profile"
        if kind.location.endswith("/"):
            on_disk = {f"{kind.location}{p.name}" for p in (root / kind.location).glob("*.y*ml")}
            assert on_disk <= loaded, kind.name
            assert len(profiles.by_kind[kind.name]) == len(on_disk), kind.name
    on_disk_maps = {p.stem for p in (root / "concept-maps").iterdir() if p.is_file()}
    assert set(profiles.concept_maps) == on_disk_maps
    # used by the README walkthrough, the demo and the golden examples
    assert {("glp1-weight-management", "1"), ("dermatology-intake", "1")} <= set(profiles.intake)
    assert profiles.plan("glp1-semaglutide-starter") is not None
    assert profiles.processor("stripe") is not None
    assert not profiles.enabled_targets()  # no EHR is configured by default
    for key, source in profiles.sources.items():
        assert len(source.content_hash) == 64, key


def test_bundled_set_loads_every_kind() -> None:
    from gateway.settings import BUNDLED_PROFILES_DIR

    _assert_a_complete_bundled_set(BUNDLED_PROFILES_DIR)


def test_the_bundled_set_test_survives_the_guides_worked_example(tmp_path: Path) -> None:
    """Issue 15: after docs/PROFILES.md's new v3 form and new plan, the set still passes."""
    root = copy_profiles(tmp_path / "p")
    v2 = (root / "intake/glp1-weight-management-v2.yaml").read_text()
    (root / "intake/glp1-weight-management-v3.yaml").write_text(
        v2.replace('version: "2"', 'version: "3"')
    )
    plans = (root / PLANS).read_text()
    start = plans.index("  glp1-semaglutide-starter:")
    end = plans.index("\n  glp1-", start + 1)
    new_plan = plans[start:end].replace("glp1-semaglutide-starter", "glp1-semaglutide-2-4")
    (root / PLANS).write_text(plans.rstrip("\n") + "\n" + new_plan + "\n")
    _assert_a_complete_bundled_set(root)
    assert ("glp1-weight-management", "3") in load_profiles(root).intake


def test_schema_errors_name_file_line_and_path(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    text = (root / GLP1_V1).read_text().replace("type: integer", "type: integr", 1)
    (root / GLP1_V1).write_text(text)
    with pytest.raises(ProfileLoadError) as exc:
        load_profiles(root)
    (problem,) = exc.value.problems
    file, line, path = problem.location.split(":", 2)
    assert file == GLP1_V1
    assert "type: integr" in text.splitlines()[int(line) - 1]
    assert path.strip().endswith(".type")
    assert problem.code == "literal_error"
    assert "integr" not in problem.message or "Input should be" in problem.message


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    lines = (root / PLANS).read_text().splitlines()
    lines[12] = lines[12] + " ]["
    (root / PLANS).write_text("\n".join(lines))
    with pytest.raises(ProfileLoadError) as exc:
        load_profiles(root)
    (problem,) = exc.value.problems
    assert problem.code == "yaml_syntax"
    assert problem.location == f"{PLANS}:13"


def test_every_problem_of_every_file_is_reported_at_once(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    edit_yaml(root / GLP1_V1, lambda d: d.update(status="live"))
    edit_yaml(root / PLANS, lambda d: d.update(colour="blue"))
    with pytest.raises(ProfileLoadError) as exc:
        load_profiles(root)
    where = sorted(p.location.split(":")[0] for p in exc.value.problems)
    assert where == [PLANS, GLP1_V1]
    assert "2 problem(s) in the profiles" in str(exc.value)


def test_same_form_version_twice_is_refused(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    (root / "intake/copy-of-v1.yaml").write_text((root / GLP1_V1).read_text())
    with pytest.raises(ProfileLoadError) as exc:
        load_profiles(root)
    (problem,) = exc.value.problems
    assert problem.code == "duplicate"
    assert "glp1-weight-management/1" in problem.message


def test_missing_workflow_is_refused(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    (root / "workflow.yaml").unlink()
    with pytest.raises(ProfileLoadError) as exc:
        load_profiles(root)
    assert [p.location for p in exc.value.problems] == ["workflow.yaml"]


def test_a_new_kind_is_one_registry_entry(tmp_path: Path) -> None:
    class ReferralProfile(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["referrals"] = "referrals"
        name: str

    root = copy_profiles(tmp_path / "p")
    (root / "referrals").mkdir()
    (root / "referrals/pharmacy.yaml").write_text("kind: referrals\nname: pharmacy\n")
    (root / "referrals/bad.yaml").write_text("kind: referrals\nname: x\nsignature: hmac\n")
    kinds = {
        **PROFILE_KINDS,
        "referrals": ProfileKind("referrals", ReferralProfile, "referrals/", lambda p: p.name),
    }
    with pytest.raises(ProfileLoadError) as exc:
        load_profiles(root, kinds=kinds)
    assert [p.location for p in exc.value.problems] == ["referrals/bad.yaml:3: signature"]
    (root / "referrals/bad.yaml").unlink()
    profiles = load_profiles(root, kinds=kinds)
    assert profiles.by_kind["referrals"]["pharmacy"].name == "pharmacy"
    assert profiles.source_of("referrals/pharmacy") is not None
    assert json.loads(render(kinds["referrals"]))["title"] == "ReferralProfile"


def test_draft_replaces_the_deployed_profile_without_writing(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    before = sorted(p.name for p in (root / "intake").iterdir())
    draft = (
        (root / GLP1_V1)
        .read_bytes()
        .replace(b"title: GLP-1 weight management intake", b"title: Draft title")
    )
    profiles = load_profiles(root, drafts={"intake/my-draft.yaml": draft})
    assert profiles.intake[("glp1-weight-management", "1")].title == "Draft title"
    assert sorted(p.name for p in (root / "intake").iterdir()) == before


def test_committed_json_schemas_are_up_to_date() -> None:
    from gateway.settings import BUNDLED_PROFILES_DIR

    assert stale_schemas(BUNDLED_PROFILES_DIR / "schema") == []


def test_intake_schema_offers_item_types_for_autocompletion() -> None:
    schema: dict[str, Any] = json.loads(render(PROFILE_KINDS["intake"]))
    item_type = schema["$defs"]["IntakeItem"]["properties"]["type"]
    assert "open_choice" in item_type["enum"] and "dateTime" in item_type["enum"]


def test_invalid_concept_map_is_refused_with_its_line(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    path = root / "concept-maps/acme-formulary.csv"
    path.write_text(path.read_text() + "http://www.nlm.nih.gov/research/umls/rxnorm,,,x,y,,\n")
    with pytest.raises(ProfileLoadError) as exc:
        load_profiles(root)
    problem, *others = exc.value.problems
    assert problem.location == "concept-maps/acme-formulary.csv: line 4"
    assert problem.message == "empty source_code"
    # and the EHR target that uses the map is refused too, not run half-configured
    assert [p.code for p in others] == ["unknown-concept-map"]


def test_every_bundled_profile_file_names_its_json_schema_for_editors() -> None:
    """docs/PROFILES.md: every profile file starts with the YAML language server's
    ``$schema`` modeline (https://github.com/redhat-developer/yaml-language-server),
    pointing at the schema of its kind."""
    from gateway.settings import BUNDLED_PROFILES_DIR

    for kind in PROFILE_KINDS.values():
        location = BUNDLED_PROFILES_DIR / kind.location
        files = sorted(location.glob("*.yaml")) if kind.location.endswith("/") else [location]
        assert files, kind.name
        for path in files:
            first = path.read_text(encoding="utf-8").splitlines()[0]
            prefix = "# yaml-language-server: $schema="
            assert first.startswith(prefix), path
            schema = (path.parent / first.removeprefix(prefix)).resolve()
            assert schema == (BUNDLED_PROFILES_DIR / f"schema/{kind.name}.schema.json").resolve()
