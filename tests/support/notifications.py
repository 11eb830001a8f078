"""Notification Bundles as an EHR sends them (Subscriptions R5 Backport IG, R4 shape)."""

from __future__ import annotations

import uuid
from typing import Any

SUBSCRIPTION = "https://ehr.example.org/fhir/Subscription/telehealth-tasks"
TOPIC = "https://ehr.example.org/fhir/SubscriptionTopic/task-changes"


def status_parameters(
    notification_type: str,
    *,
    events_since: int | None,
    events: list[tuple[int, str | None, str | None]] = (),  # type: ignore[assignment]
    status: str = "active",
    subscription: str = SUBSCRIPTION,
) -> dict[str, Any]:
    """The R4 ``Parameters`` status (backport-subscription-status-r4); events are
    ``(event number, timestamp, focus reference)``."""
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": subscription}},
        {"name": "topic", "valueCanonical": TOPIC},
        {"name": "status", "valueCode": status},
        {"name": "type", "valueCode": notification_type},
    ]
    if events_since is not None:
        params.append({"name": "events-since-subscription-start", "valueString": str(events_since)})
    for number, timestamp, focus in events:
        parts: list[dict[str, Any]] = [{"name": "event-number", "valueString": str(number)}]
        if timestamp:
            parts.append({"name": "timestamp", "valueInstant": timestamp})
        if focus:
            parts.append({"name": "focus", "valueReference": {"reference": focus}})
        params.append({"name": "notification-event", "part": parts})
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {
            "profile": [
                "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
            ]
        },
        "parameter": params,
    }


def bundle(
    notification_type: str,
    *,
    events_since: int | None = None,
    events: list[tuple[int, str | None, str | None]] = (),  # type: ignore[assignment]
    resources: list[dict[str, Any]] = (),  # type: ignore[assignment]
    id_only: list[str] = (),  # type: ignore[assignment]
    status: str = "active",
    subscription: str = SUBSCRIPTION,
    base: str = "https://ehr.example.org/fhir",
) -> dict[str, Any]:
    """A notification Bundle (``history``): the status first, then full resources
    (``full-resource``) or only their URLs (``id-only``)."""
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": status_parameters(
                notification_type,
                events_since=events_since,
                events=list(events),
                status=status,
                subscription=subscription,
            ),
            "request": {"method": "GET", "url": f"{subscription}/$status"},
            "response": {"status": "200"},
        }
    ]
    for resource in resources:
        url = f"{base}/{resource['resourceType']}/{resource['id']}"
        entries.append(
            {
                "fullUrl": url,
                "resource": resource,
                "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
                "response": {"status": "200"},
            }
        )
    for ref in id_only:
        entries.append(
            {
                "fullUrl": f"{base}/{ref}",
                "request": {"method": "PUT", "url": ref},
                "response": {"status": "200"},
            }
        )
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": "2026-11-24T16:00:00Z",
        "entry": entries,
    }


def task(
    task_id: str,
    patient: str,
    *,
    status: str,
    business_status: str | None = None,
    version: str = "1",
    focus: str | None = None,
) -> dict[str, Any]:
    """A review Task (``code`` approve) for ``Patient/<patient>``."""
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "id": task_id,
        "meta": {"versionId": version, "lastUpdated": "2026-11-24T15:59:00Z"},
        "status": status,
        "intent": "order",
        "code": {
            "coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "approve"}]
        },
        "for": {"reference": f"Patient/{patient}"},
        "authoredOn": "2026-11-24T14:00:00Z",
    }
    if business_status:
        resource["businessStatus"] = {"text": business_status}
    if focus:
        resource["focus"] = {"reference": focus}
    return resource


def medication_order(request_id: str, patient: str, *, version: str = "1") -> dict[str, Any]:
    """A signed prescription (MedicationRequest, active order) for ``Patient/<patient>``."""
    return {
        "resourceType": "MedicationRequest",
        "id": request_id,
        "meta": {"versionId": version, "lastUpdated": "2026-11-24T17:00:00Z"},
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1991306"}]
        },
        "subject": {"reference": f"Patient/{patient}"},
        "requester": {"display": "Dr. Example"},
        "authoredOn": "2026-11-24T17:00:00Z",
    }
