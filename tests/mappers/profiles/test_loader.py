"""Tests for mappers.profiles.load_profiles: the bundled set loads; broken sets are refused
with every problem named by file, path and message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mappers.profiles import ProfileLoadError, load_profiles
from tests.mappers.conftest import PROFILES

INTAKE = "intake/glp1-weight-management-v1.yaml"


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    """A writable copy of the bundled profiles."""
    return Path(shutil.copytree(PROFILES, tmp_path / "profiles"))


def load_error(root: Path) -> ProfileLoadError:
    with pytest.raises(ProfileLoadError) as info:
        load_profiles(root)
    return info.value


def test_the_bundled_profiles_load(profiles: Path) -> None:
    loaded = load_profiles(profiles)
    assert set(loaded.intake) == {("glp1-weight-management", "1")}
    assert loaded.plan("glp1-semaglutide-starter") is not None
    assert loaded.enabled_targets() == []  # no EHR is configured by default
    assert loaded.workflow is not None
    source = loaded.source_of("intake/glp1-weight-management/1")
    assert source is not None and source.path == INTAKE and len(source.content_hash) == 64


def test_broken_yaml_is_reported_with_file_and_line(profiles: Path) -> None:
    (profiles / "checkout" / "broken.yaml").write_text(
        "kind: checkout\nid: broken\nversion: '1'\nplans:\n  a: [unclosed\n  b: 2\n"
    )
    error = load_error(profiles)
    (problem,) = error.problems
    assert problem.code == "yaml_syntax"
    assert problem.location == "checkout/broken.yaml:6"
    assert "checkout/broken.yaml:6: invalid YAML" in str(error)


def test_an_unknown_key_is_reported_with_its_path(profiles: Path) -> None:
    path = profiles / INTAKE
    data = yaml.safe_load(path.read_text())
    data["items"][3]["requried"] = True
    path.write_text(yaml.safe_dump(data))
    error = load_error(profiles)
    (problem,) = error.problems
    assert problem.location == f"{INTAKE}: items.3.requried"
    assert problem.code == "extra_forbidden"
    assert f"{INTAKE}: items.3.requried: Extra inputs are not permitted" in str(error)


def test_a_plan_defined_twice_is_reported(profiles: Path) -> None:
    (profiles / "checkout" / "zz-more.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "checkout",
                "id": "more-plans",
                "version": "1",
                "plans": {
                    "glp1-semaglutide-starter": {
                        "program": "glp1-weight-management",
                        "medication": {
                            "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                            "code": "1",
                        },
                    }
                },
            }
        )
    )
    error = load_error(profiles)
    (problem,) = error.problems
    assert (problem.location, problem.code) == ("checkout/zz-more.yaml", "duplicate")
    assert "plan 'glp1-semaglutide-starter' also in checkout profile glp1-plans" in str(error)


def test_an_intake_form_version_defined_twice_is_reported(profiles: Path) -> None:
    shutil.copy(profiles / INTAKE, profiles / "intake" / "copy.yaml")
    (problem,) = load_error(profiles).problems
    assert problem.code == "duplicate"
    assert problem.message == "intake glp1-weight-management version 1 defined twice"


def test_every_problem_is_reported_at_once(profiles: Path) -> None:
    (profiles / "ehr" / "bad.yaml").write_text("kind: ehr\nname: bad\nbase_url: ftp://x\n")
    (profiles / "checkout" / "list.yaml").write_text("- a\n- b\n")
    (profiles / "workflow.yaml").unlink()
    error = load_error(profiles)
    assert {(p.location, p.code) for p in error.problems} == {
        ("ehr/bad.yaml", "value_error"),
        ("checkout/list.yaml", "not_a_mapping"),
        ("workflow.yaml", "missing"),
    }
    assert str(error).startswith("3 problem(s) in the profiles:")


def test_an_inconsistent_workflow_names_the_unknown_state(profiles: Path) -> None:
    path = profiles / "workflow.yaml"
    data = yaml.safe_load(path.read_text())
    data["transitions"].append({"event": "shipped", "from": ["dispensed"], "to": "lost_in_mail"})
    path.write_text(yaml.safe_dump(data))
    (problem,) = load_error(profiles).problems
    assert problem.location.startswith("workflow.yaml")
    assert "transition 'shipped' names unknown state 'lost_in_mail'" in problem.message


def test_a_missing_directory_is_reported(tmp_path: Path) -> None:
    (problem,) = load_error(tmp_path / "nowhere").problems
    assert problem.code == "missing"


def test_an_ehr_target_with_incomplete_auth_is_reported(profiles: Path) -> None:
    (profiles / "ehr" / "half.yaml").write_text(
        "kind: ehr\nname: half\nbase_url: https://ehr.example.org/fhir\n"
        "auth: {method: client_secret_post, client_id: gw}\n"
    )
    (problem,) = load_error(profiles).problems
    assert problem.location == "ehr/half.yaml: auth"
    assert "needs token_url, client_secret_env" in problem.message
