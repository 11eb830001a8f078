"""``fhir-gateway profiles check|preview|schema``: what an analyst and CI run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from gateway.cli import app
from gateway.settings import BUNDLED_PROFILES_DIR
from tests.support.profiles import GLP1_V1, copy_profiles, edit_yaml

runner = CliRunner()
V1_INPUT = BUNDLED_PROFILES_DIR / "intake/glp1-weight-management-v1.examples/basic.input.json"


def test_check_bundled_profiles_passes_strict() -> None:
    r = runner.invoke(app, ["profiles", "check", str(BUNDLED_PROFILES_DIR), "--strict"])
    assert r.exit_code == 0, r.output
    assert "ok   intake/glp1-weight-management-v2.yaml example full" in r.output
    assert "0 error(s), 0 warning(s)" in r.output


def test_check_fails_on_a_lint_error_with_file_and_line(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    edit_yaml(root / GLP1_V1, lambda d: d["derived"]["flags"][0].update(when="item.where("))
    r = runner.invoke(app, ["profiles", "check", str(root)])
    assert r.exit_code == 1
    assert f"{GLP1_V1}:" in r.output and "[fhirpath-syntax]" in r.output


def test_check_shows_the_golden_diff(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    edit_yaml(root / GLP1_V1, lambda d: d["items"][0].update(text="Weight?"))
    r = runner.invoke(app, ["profiles", "check", str(root)])
    assert r.exit_code == 1
    assert "FAIL intake/glp1-weight-management-v1.yaml example basic: mismatch" in r.output
    assert '.item[0].text: -"What is your current weight?" +"Weight?"' in r.output
    r = runner.invoke(app, ["profiles", "check", str(root), "--update-expected"])
    assert r.exit_code == 0
    assert runner.invoke(app, ["profiles", "check", str(root)]).exit_code == 0


def test_check_reports_unmapped_fields_and_strict_fails(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    stripe = root / "checkout/glp1-plans.examples/stripe.input.json"
    event = json.loads(stripe.read_text())
    event["data"]["object"]["metadata"]["referral_code"] = "R1"
    stripe.write_text(json.dumps(event))
    r = runner.invoke(app, ["profiles", "check", str(root)])
    assert r.exit_code == 0
    assert (
        "input field data.object.metadata.referral_code is not mapped [unmapped-field]" in r.output
    )
    assert runner.invoke(app, ["profiles", "check", str(root), "--strict"]).exit_code == 1


def test_check_fails_on_a_stale_schema(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    (root / "schema/intake.schema.json").write_text("{}\n")
    r = runner.invoke(app, ["profiles", "check", str(root)])
    assert r.exit_code == 1 and "[stale-schema]" in r.output
    assert runner.invoke(app, ["profiles", "schema", "--out", str(root / "schema")]).exit_code == 0
    assert runner.invoke(app, ["profiles", "check", str(root)]).exit_code == 0


def test_preview_prints_the_bundle(tmp_path: Path) -> None:
    draft = tmp_path / "my-draft.yaml"
    draft.write_text(
        (BUNDLED_PROFILES_DIR / GLP1_V1).read_text().replace("How physically active", "How active")
    )
    r = runner.invoke(
        app,
        [
            "profiles",
            "preview",
            str(draft),
            str(V1_INPUT),
            "--profiles-dir",
            str(BUNDLED_PROFILES_DIR),
        ],
    )
    assert r.exit_code == 0, r.output
    bundle = json.loads(r.stdout)
    assert bundle["type"] == "collection"
    qr = bundle["entry"][1]["resource"]
    assert any(i["text"].startswith("How active") for i in qr["item"])


def test_preview_exits_1_with_the_issues(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    data = json.loads(V1_INPUT.read_text())
    data["answers"]["weight_lb"] = "a lot"
    bad.write_text(json.dumps(data))
    r = runner.invoke(
        app,
        [
            "profiles",
            "preview",
            str(BUNDLED_PROFILES_DIR / GLP1_V1),
            str(bad),
            "--profiles-dir",
            str(BUNDLED_PROFILES_DIR),
        ],
    )
    assert r.exit_code == 1
    assert "answers.weight_lb: expected a number in lb [invalid_answer]" in r.output


def test_worked_example_of_the_guide(tmp_path: Path) -> None:
    """docs/PROFILES.md: a v3 with a new question and flag, made with YAML only."""
    root = copy_profiles(tmp_path / "p")
    v2 = (root / "intake/glp1-weight-management-v2.yaml").read_text()
    v3 = (
        v2.replace('version: "2"', 'version: "3"')
        .replace(
            "      - key: pregnancy_status\n",
            "      - key: gallbladder_disease\n"
            "        link_id: gallbladder-disease\n"
            "        text: Have you ever had gallbladder disease or gallstones?\n"
            "        type: boolean\n"
            "        required: true\n"
            "      - key: pregnancy_status\n",
        )
        .replace(
            "  consents:\n",
            "    - id: gallbladder\n"
            "      when: \"repeat(item).where(linkId = 'gallbladder-disease')"
            '.answer.value = true"\n'
            '      text: "Caution with GLP-1 therapy: history of gallbladder disease"\n'
            "      code: {system: *flags, code: gallbladder-history}\n"
            "      priority: PM\n"
            "  consents:\n",
        )
    )
    (root / "intake/glp1-weight-management-v3.yaml").write_text(v3)
    examples = root / "intake/glp1-weight-management-v3.examples"
    examples.mkdir()
    for case, answer in (("full", "yes"), ("conditional-required", "no")):
        src = root / f"intake/glp1-weight-management-v2.examples/{case}.input.json"
        data = json.loads(src.read_text())
        data["form"]["version"] = "3"
        data["answers"]["gallbladder_disease"] = answer
        (examples / f"{case}.input.json").write_text(json.dumps(data))
    v2_examples = root / "intake/glp1-weight-management-v2.examples"
    problems = "conditional-required.expected-problems.json"
    (examples / problems).write_text((v2_examples / problems).read_text())
    r = runner.invoke(app, ["profiles", "check", str(root), "--write-expected"])
    assert r.exit_code == 0, r.output
    expected = json.loads((examples / "full.expected.json").read_text())
    flags = [e["resource"] for e in expected["entry"] if e["resource"]["resourceType"] == "Flag"]
    assert "gallbladder-history" in [f["code"]["coding"][0]["code"] for f in flags]
    assert runner.invoke(app, ["profiles", "check", str(root), "--strict"]).exit_code == 0


def test_preview_takes_a_path_inside_the_profiles_dir(tmp_path: Path, monkeypatch: Any) -> None:
    """README: `fhir-gateway profiles preview intake/my-form.yaml in.json` from anywhere."""
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(
        app,
        [
            "profiles",
            "preview",
            GLP1_V1,
            str(V1_INPUT),
            "--profiles-dir",
            str(BUNDLED_PROFILES_DIR),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["type"] == "collection"


def test_preview_of_a_missing_profile_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        [
            "profiles",
            "preview",
            str(tmp_path / "intake/nope.yaml"),
            str(V1_INPUT),
            "--profiles-dir",
            str(BUNDLED_PROFILES_DIR),
        ],
    )
    assert r.exit_code == 2
    assert "nope.yaml: not readable here or under" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_preview_refuses_an_input_for_another_form_version(tmp_path: Path) -> None:
    """Issue 15: a v1 input previewed with the v2 file must not silently use the deployed v1."""
    v2 = "intake/glp1-weight-management-v2.yaml"
    r = runner.invoke(
        app,
        [
            "profiles",
            "preview",
            str(BUNDLED_PROFILES_DIR / v2),
            str(V1_INPUT),
            "--profiles-dir",
            str(BUNDLED_PROFILES_DIR),
        ],
    )
    assert r.exit_code == 1
    assert r.stdout == ""
    assert "intake/glp1-weight-management/2" in r.stderr
    assert "form.id and form.version name another profile" in r.stderr


def test_preview_refuses_a_checkout_with_an_intake_profile(tmp_path: Path) -> None:
    checkout = BUNDLED_PROFILES_DIR / "checkout/glp1-plans.examples/canonical.input.json"
    r = runner.invoke(
        app,
        [
            "profiles",
            "preview",
            str(BUNDLED_PROFILES_DIR / GLP1_V1),
            str(checkout),
            "--profiles-dir",
            str(BUNDLED_PROFILES_DIR),
        ],
    )
    assert r.exit_code == 1
    assert "the input is a checkout; the profile previewed is intake/" in r.stderr


def test_preview_of_a_checkout_profile_maps_its_own_plans() -> None:
    checkout = BUNDLED_PROFILES_DIR / "checkout/glp1-plans.examples/canonical.input.json"
    r = runner.invoke(
        app,
        [
            "profiles",
            "preview",
            str(BUNDLED_PROFILES_DIR / "checkout/glp1-plans.yaml"),
            str(checkout),
            "--profiles-dir",
            str(BUNDLED_PROFILES_DIR),
        ],
    )
    assert r.exit_code == 0, r.output


def test_check_refuses_the_guides_placeholder_code(tmp_path: Path) -> None:
    """Issue 15: the PROFILES.md plan pasted as written is an error, not 0 errors."""
    root = copy_profiles(tmp_path / "p")
    plans = root / "checkout/glp1-plans.yaml"
    text = plans.read_text()
    assert 'code: "1991306"' in text
    plans.write_text(
        text.replace('code: "1991306"', 'code: "<the SCD RxCUI of the 2.4 mg pen, from RxNav>"', 1)
    )
    r = runner.invoke(app, ["profiles", "check", str(root)])
    assert r.exit_code == 1
    [line] = [x for x in r.output.splitlines() if "[code-syntax]" in x]
    assert line.startswith("checkout/glp1-plans.yaml:")
    assert ".medication.code: " in line and "placeholder" in line


def test_check_refuses_a_loinc_code_with_a_wrong_check_digit(tmp_path: Path) -> None:
    root = copy_profiles(tmp_path / "p")
    form = root / "intake/glp1-weight-management-v2.yaml"
    form.write_text(form.read_text().replace("code: 29463-7", "code: 29463-8", 1))
    r = runner.invoke(app, ["profiles", "check", str(root)])
    assert r.exit_code == 1
    assert "LOINC check digit" in r.output and "[code-syntax]" in r.output
