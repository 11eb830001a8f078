"""Partner profiles, EHR events blocks and SLA timers: loading and cross-checks."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import BUNDLED_PROFILES_DIR
from mappers.profiles import ProfileLoadError, load_profiles
from mappers.profiles.events import SignatureSpec
from mappers.workflow import sla_deadline


def _copy(tmp_path: Path) -> Path:
    dest = tmp_path / "profiles"
    shutil.copytree(BUNDLED_PROFILES_DIR, dest)
    return dest


def _edit(path: Path, change: Any) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_shipped_partner_profiles_load() -> None:
    profiles = load_profiles(BUNDLED_PROFILES_DIR)
    assert sorted(profiles.partners) == [
        "beacon-provider-network",
        "example-ehr-hl7",
        "sunrise-pharmacy",
    ]
    assert profiles.hl7_sender("SUNRISE-RX") is profiles.partners["sunrise-pharmacy"]
    assert profiles.hl7_sender("NOBODY") is None
    assert profiles.ehr["example-ehr"].events is not None
    assert profiles.source_of("partner/sunrise-pharmacy") is not None


def test_cross_checks_against_the_workflow(tmp_path: Path) -> None:
    root = _copy(tmp_path)

    def pharmacy(data: dict[str, Any]) -> None:
        data["webhook"]["statuses"]["approved"] = "decision:approved"  # not the pharmacy's
        data["webhook"]["statuses"]["teleported"] = "teleported"  # not an event
        data["webhook"]["statuses"]["decided"] = "decision"  # needs a detail
        data["hl7"]["facilities"].append("EXAMPLEEHR")  # already the EHR feed's

    def ehr_feed(data: dict[str, Any]) -> None:
        data["hl7"]["patient_identifiers"][0]["remote_id_of"] = "no-such-ehr"

    _edit(root / "events" / "sunrise-pharmacy.yaml", pharmacy)
    _edit(root / "events" / "example-ehr-hl7.yaml", ehr_feed)
    with pytest.raises(ProfileLoadError) as err:
        load_profiles(root)
    codes = {(p.location.split(":")[0], p.code) for p in err.value.problems}
    assert codes == {
        ("events/sunrise-pharmacy.yaml", "not_owner"),
        ("events/sunrise-pharmacy.yaml", "unknown_event"),
        ("events/sunrise-pharmacy.yaml", "missing_detail"),
        ("events/sunrise-pharmacy.yaml", "duplicate"),
        ("events/example-ehr-hl7.yaml", "unknown_target"),
    }


def test_ehr_events_block_is_checked(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    _edit(
        root / "ehr" / "example-ehr.yaml",
        lambda d: d["events"]["resources"].append({"resource": "Task", "event": "dispensed"}),
    )
    with pytest.raises(ProfileLoadError) as err:
        load_profiles(root)
    assert [p.code for p in err.value.problems] == ["not_owner"]


def test_partner_needs_a_channel_and_valid_jmespath(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "events" / "empty.yaml").write_text("kind: partner\nname: empty\nsource: pharmacy\n")
    _edit(
        root / "events" / "beacon-provider-network.yaml",
        lambda d: d["webhook"]["fields"].update(event_id="foo[?"),
    )
    with pytest.raises(ProfileLoadError) as err:
        load_profiles(root)
    assert {p.location.split(":")[0] for p in err.value.problems} == {
        "events/empty.yaml",
        "events/beacon-provider-network.yaml",
    }


@pytest.mark.parametrize(
    "spec",
    [
        {"scheme": "hmac-sha256", "secret_env": "X"},  # no header
        {"scheme": "standard-webhooks", "secret_env": "X", "tolerance": "PT10M"},
        {"scheme": "standard-webhooks", "secret_env": "X", "header": "X-Sig"},
        {"scheme": "hmac-sha256", "secret_env": "lower", "header": "X"},
    ],
)
def test_bad_signature_specs(spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SignatureSpec.model_validate(spec)


def test_workflow_sla_timers_are_checked(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    _edit(
        root / "workflow.yaml",
        lambda d: d["sla"].extend(
            [
                {"name": "review_overdue", "state": "in_review", "within": "PT1H"},
                {"name": "x", "state": "nowhere", "within": "PT1H", "until": "nothing"},
                {"name": "y", "state": "paid", "within": "PT0S"},
            ]
        ),
    )
    with pytest.raises(ProfileLoadError) as err:
        load_profiles(root)
    message = str(err.value)
    for part in ("defined twice", "unknown state 'nowhere'", "unknown event 'nothing'", "positive"):
        assert part in message


def test_sla_deadline_earliest_running_timer() -> None:
    workflow = load_profiles(BUNDLED_PROFILES_DIR).workflow_or_raise
    entered = datetime(2026, 11, 24, 12, tzinfo=UTC)
    assert sla_deadline(workflow, state="awaiting_review", entered_at=entered) == (
        entered + timedelta(minutes=15),
        "payment_not_delivered",
    )
    assert sla_deadline(
        workflow, state="awaiting_review", entered_at=entered, recorded={"ehr_delivered"}
    ) == (entered + timedelta(hours=24), "review_overdue")
    assert sla_deadline(workflow, state="approved", entered_at=entered) is None
