"""Partner webhook JSON -> clinical events with the shipped partner profiles."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.settings import BUNDLED_PROFILES_DIR
from mappers.errors import MappingErrors
from mappers.partners import partner_to_clinical_event, status_key
from mappers.profiles import PartnerProfile, ProfileSet, load_profiles
from tests.support.events_env import pharmacy_webhook

BASE = "https://fhir-gateway.example.org/sid"


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_profiles(BUNDLED_PROFILES_DIR)


@pytest.fixture
def pharmacy(profiles: ProfileSet) -> PartnerProfile:
    return profiles.partners["sunrise-pharmacy"]


@pytest.fixture
def beacon(profiles: ProfileSet) -> PartnerProfile:
    return profiles.partners["beacon-provider-network"]


def beacon_body(event: str, outcome: str | None = None, **patient: str) -> dict[str, Any]:
    return {
        "event_id": "9b1f0c8e",
        "event": event,
        "occurred_at": 1795532645,
        "consult": {"id": "c_3391", "outcome": outcome},
        "patient": patient or {"external_id": "pt-42"},
    }


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("received", "order_received"),
        ("dispensed", "dispensed"),
        ("shipped", "shipped"),
        ("delivered", "delivered_to_patient"),
        ("refill_requested", "refill_requested"),
    ],
)
def test_pharmacy_statuses(pharmacy: PartnerProfile, status: str, expected: str) -> None:
    data = json.loads(pharmacy_webhook("pt-42", status, event_id="evt_1", mrn="M1"))
    event = partner_to_clinical_event(data, pharmacy, identifier_base=BASE)
    assert event is not None
    assert (event.type, event.detail, event.source, event.sender) == (
        expected,
        None,
        "pharmacy",
        "sunrise-pharmacy",
    )
    assert event.event_id == "evt_1" and event.reference == "rx_81723"
    assert event.occurred_at == datetime(2026, 11, 24, 15, 0, tzinfo=UTC)
    assert [(r.system, r.value) for r in event.patient] == [
        (f"{BASE}/external-patient-id", "pt-42"),
        ("urn:oid:2.16.840.1.113883.19.5.1", "M1"),
    ]


def test_ignored_status_gives_no_event(pharmacy: PartnerProfile) -> None:
    data = json.loads(pharmacy_webhook("pt-42", "label_created"))
    assert partner_to_clinical_event(data, pharmacy, identifier_base=BASE) is None


def test_unknown_status_missing_patient_and_bad_time_are_all_reported(
    pharmacy: PartnerProfile,
) -> None:
    data = json.loads(pharmacy_webhook(None, "teleported", created_at="yesterday"))
    with pytest.raises(MappingErrors) as err:
        partner_to_clinical_event(data, pharmacy, identifier_base=BASE)
    assert {(p.location, p.code) for p in err.value.problems} == {
        ("fields.status", "unmapped_status"),
        ("fields.patient", "missing_patient"),
        ("fields.occurred_at", "invalid_datetime"),
    }


def test_missing_event_id(pharmacy: PartnerProfile) -> None:
    data = json.loads(pharmacy_webhook("pt-42", "shipped"))
    del data["id"]
    with pytest.raises(MappingErrors) as err:
        partner_to_clinical_event(data, pharmacy, identifier_base=BASE)
    assert [p.code for p in err.value.problems] == ["missing_event_id"]


@pytest.mark.parametrize(
    ("event", "outcome", "expected"),
    [
        ("consult.assigned", None, ("provider_assigned", None)),
        ("consult.completed", "approved", ("decision", "approved")),
        ("consult.completed", "denied", ("decision", "denied")),
        ("consult.info_requested", None, ("decision", "more_info_needed")),
        ("prescription.sent", None, ("prescription_sent", None)),
    ],
)
def test_provider_network_type_and_status_lookup(
    beacon: PartnerProfile, event: str, outcome: str | None, expected: tuple[str, str | None]
) -> None:
    mapped = partner_to_clinical_event(beacon_body(event, outcome), beacon, identifier_base=BASE)
    assert mapped is not None
    assert (mapped.type, mapped.detail) == expected
    assert mapped.occurred_at == datetime.fromtimestamp(1795532645, tz=UTC)


def test_status_key_lookup_order(beacon: PartnerProfile) -> None:
    assert status_key(beacon_body("consult.completed", "approved"), beacon) == (
        "consult.completed:approved",
        "consult.completed:approved",
    )
    assert status_key(beacon_body("consult.viewed"), beacon) == ("consult.viewed", "consult.viewed")
    assert status_key(beacon_body("consult.completed", "abandoned"), beacon)[0] is None


def test_unix_time_that_is_not_a_number(beacon: PartnerProfile) -> None:
    data = beacon_body("consult.assigned")
    data["occurred_at"] = "soon"
    with pytest.raises(MappingErrors) as err:
        partner_to_clinical_event(data, beacon, identifier_base=BASE)
    assert [p.code for p in err.value.problems] == ["invalid_datetime"]


def test_partner_ids_are_offered_for_learning(beacon: PartnerProfile) -> None:
    data = beacon_body("consult.assigned", external_id="pt-42", network_patient_id="bp_7")
    event = partner_to_clinical_event(data, beacon, identifier_base=BASE)
    assert event is not None
    assert [r.system for r in event.patient] == [
        f"{BASE}/external-patient-id",
        "https://beacon-network.example/fhir/sid/patient",
    ]
