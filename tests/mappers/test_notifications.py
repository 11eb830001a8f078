"""Notification Bundles (Subscriptions Backport IG) -> clinical events; gap tracking."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mappers.errors import MappingError, MappingErrors
from mappers.notifications import (
    Gap,
    NotificationEvent,
    focus_to_clinical_event,
    parse_notification,
    reference_key,
    track_event_numbers,
)
from mappers.profiles.events import EhrEventsSpec
from tests.support import notifications as n
from tests.support.events_env import EVENTS_BLOCK

SPEC = EhrEventsSpec.model_validate(EVENTS_BLOCK)
RECEIVED = datetime(2026, 11, 24, 18, 0, tzinfo=UTC)


def test_handshake_and_heartbeat_parse() -> None:
    hs = parse_notification(n.bundle("handshake", events_since=0, status="requested"))
    assert (hs.type, hs.subscription, hs.status, hs.events_since) == (
        "handshake",
        "Subscription/telehealth-tasks",
        "requested",
        0,
    )
    hb = parse_notification(n.bundle("heartbeat", events_since=7))
    assert (hb.type, hb.events_since, hb.events) == ("heartbeat", 7, ())


def test_full_resource_notification_carries_the_focus() -> None:
    task = n.task("t1", "e-1", status="accepted")
    note = parse_notification(
        n.bundle(
            "event-notification",
            events_since=3,
            events=[
                (
                    3,
                    "2026-11-24T16:00:00.1234567-05:00",
                    "https://ehr.example.org/fhir/Task/t1/_history/1",
                )
            ],
            resources=[task],
        )
    )
    assert note.event_numbers == [3]
    event = note.events[0]
    assert reference_key(event.focus or "") == "Task/t1"
    assert event.timestamp == datetime(2026, 11, 24, 21, 0, 0, 123456, tzinfo=UTC)
    assert note.resources["Task/t1"]["status"] == "accepted"


def test_id_only_notification_has_no_resources() -> None:
    note = parse_notification(
        n.bundle(
            "event-notification", events_since=4, events=[(4, None, "Task/t1")], id_only=["Task/t1"]
        )
    )
    assert note.resources == {}
    assert note.events[0].focus == "Task/t1"


def test_r4b_subscription_status_is_read_too() -> None:
    data = n.bundle(
        "event-notification", events_since=1, resources=[n.task("t1", "e-1", status="accepted")]
    )
    data["entry"][0]["resource"] = {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": "event-notification",
        "eventsSinceSubscriptionStart": "1",
        "notificationEvent": [{"eventNumber": "1", "focus": {"reference": "Task/t1"}}],
        "subscription": {"reference": "Subscription/s-9"},
        "topic": "https://ehr.example.org/topic",
    }
    note = parse_notification(data)
    assert (note.subscription, note.event_numbers, note.events_since) == (
        "Subscription/s-9",
        [1],
        1,
    )
    # R4B and R5 servers send the SubscriptionStatus in a subscription-notification Bundle
    data["type"] = "subscription-notification"
    assert parse_notification(data).event_numbers == [1]


@pytest.mark.parametrize(
    ("mutate", "codes"),
    [
        (lambda b: b.update(type="transaction"), {"not_history"}),
        (
            lambda b: b["entry"][0].update(
                resource={"resourceType": "Basic", "code": {"text": "x"}}
            ),
            {"missing_status"},
        ),
        (
            lambda b: b["entry"][0]["resource"]["parameter"][3].update(valueCode="bogus"),
            {"unknown_type"},
        ),
        (lambda b: b["entry"][0]["resource"]["parameter"].pop(0), {"missing_subscription"}),
        (
            lambda b: b["entry"][0]["resource"]["parameter"][4].update(valueString="three"),
            {"invalid_number"},
        ),
        (
            lambda b: b["entry"].append({"resource": {"resourceType": "Nonsense"}}),
            {"unknown_resource_type"},
        ),
    ],
)
def test_malformed_notifications_are_refused(mutate: Any, codes: set[str]) -> None:
    data = n.bundle("event-notification", events_since=1, events=[(1, None, "Task/t1")])
    mutate(data)
    with pytest.raises(MappingErrors) as err:
        parse_notification(data)
    assert {p.code for p in err.value.problems} & codes == codes


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (n.task("t1", "e-1", status="accepted"), "the body is a Task,"),
        ({"id": "x"}, "the body is no resource,"),
        ({"resourceType": "<script>"}, "the body is no resource,"),
    ],
)
def test_a_bare_resource_is_not_a_notification(body: dict[str, Any], named: str) -> None:
    """A classic R4 rest-hook posts the resource itself."""
    with pytest.raises(MappingErrors) as err:
        parse_notification(body)
    [problem] = err.value.problems
    assert problem.code == "not_a_notification_bundle" and str(problem.message).startswith(named)


def _event(resource: dict[str, Any], number: int = 5) -> Any:
    return focus_to_clinical_event(
        resource,
        SPEC,
        target="test-ehr",
        subscription="Subscription/s1",
        event=NotificationEvent(number, None, None),
        received_at=RECEIVED,
    )


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        (n.task("t1", "e-1", status="accepted"), ("provider_assigned", None)),
        (
            n.task("t1", "e-1", status="completed", business_status="approved"),
            ("decision", "approved"),
        ),
        (n.task("t1", "e-1", status="completed", business_status="denied"), ("decision", "denied")),
        (n.medication_order("m1", "e-1"), ("prescription_sent", None)),
        (
            {
                "resourceType": "Encounter",
                "id": "en1",
                "status": "planned",
                "class": {"code": "VR"},
                "subject": {"reference": "Patient/e-1"},
            },
            ("appointment_booked", None),
        ),
        (
            {
                "resourceType": "CommunicationRequest",
                "id": "c1",
                "status": "active",
                "subject": {"reference": "Patient/e-1"},
            },
            ("follow_up_required", None),
        ),
        (
            {
                "resourceType": "ServiceRequest",
                "id": "s1",
                "status": "active",
                "intent": "order",
                "subject": {"reference": "Patient/e-1"},
            },
            ("follow_up_required", None),
        ),
    ],
)
def test_focus_resources_map_by_the_target_table(
    resource: dict[str, Any], expected: tuple[str, str | None]
) -> None:
    event = _event(resource)
    assert (event.type, event.detail) == expected
    assert event.source == "ehr" and event.sender == "test-ehr"
    assert event.patient[0].kind == "remote_id" and event.patient[0].value == "e-1"
    assert event.patient[0].target == "test-ehr"


def test_event_id_is_the_resource_version_so_refires_dedupe() -> None:
    first = _event(n.task("t1", "e-1", status="accepted", version="3"), number=5)
    again = _event(n.task("t1", "e-1", status="accepted", version="3"), number=6)
    assert first.event_id == again.event_id == "Task/t1/_history/3"
    unversioned = n.task("t1", "e-1", status="accepted")
    del unversioned["meta"]
    assert _event(unversioned, number=6).event_id == "Subscription/s1#6"


def test_occurred_at_prefers_the_event_timestamp_then_last_updated() -> None:
    resource = n.task("t1", "e-1", status="accepted")
    stamped = focus_to_clinical_event(
        resource,
        SPEC,
        target="test-ehr",
        subscription="Subscription/s1",
        event=NotificationEvent(1, datetime(2026, 11, 24, 10, tzinfo=UTC), None),
        received_at=RECEIVED,
    )
    assert stamped is not None and stamped.occurred_at == datetime(2026, 11, 24, 10, tzinfo=UTC)
    assert _event(resource).occurred_at == datetime(2026, 11, 24, 15, 59, tzinfo=UTC)
    del resource["meta"]
    assert _event(resource).occurred_at == RECEIVED


def test_ignored_and_unmatched_focus() -> None:
    assert _event(n.task("t1", "e-1", status="cancelled")) is None
    assert _event(n.task("t1", "e-1", status="in-progress")) is None  # unmatched: ignore
    strict = SPEC.model_copy(update={"unmatched": "exception"})
    with pytest.raises(MappingError) as err:
        focus_to_clinical_event(
            n.task("t1", "e-1", status="in-progress"),
            strict,
            target="t",
            subscription="Subscription/s1",
            event=NotificationEvent(1, None, None),
            received_at=RECEIVED,
        )
    assert err.value.code == "unmapped_focus"


def test_patient_by_identifier_and_missing_patient() -> None:
    resource = n.task("t1", "e-1", status="accepted")
    resource["for"] = {"identifier": {"system": "urn:mrn", "value": "M1"}}
    event = _event(resource)
    assert [(r.kind, r.system, r.value) for r in event.patient] == [("identifier", "urn:mrn", "M1")]
    resource["for"] = {"reference": "Group/g1"}
    with pytest.raises(MappingError) as err:
        _event(resource)
    assert err.value.code == "missing_patient"


@pytest.mark.parametrize(
    ("last", "missing", "numbers", "since", "expected_last", "expected_missing", "resolved"),
    [
        (0, [], [1, 2], 2, 2, [], []),
        (3, [], [6], 6, 6, [Gap(4, 5)], []),
        (6, [Gap(4, 5, 7)], [4], None, 6, [Gap(5, 5, 7)], []),
        (6, [Gap(5, 5, 7)], [5], None, 6, [], [7]),
        (6, [], [], 9, 9, [Gap(7, 9)], []),  # a heartbeat reveals 3 events never sent to us
        (6, [], [6], 6, 6, [], []),  # a redelivery
        (2, [Gap(1, 1, 3), Gap(2, 2, 4)], [1, 2], None, 2, [], [3, 4]),
        (0, [], [10**9], None, 10**9, [Gap(1, 10**9 - 1)], []),  # no enumeration of huge gaps
    ],
)
def test_track_event_numbers(
    last: int,
    missing: list[Gap],
    numbers: list[int],
    since: int | None,
    expected_last: int,
    expected_missing: list[Gap],
    resolved: list[int],
) -> None:
    update = track_event_numbers(
        last_seen=last, missing=missing, numbers=numbers, events_since=since
    )
    assert update.last_seen == expected_last
    assert update.missing == expected_missing
    assert update.resolved_exception_ids == resolved
