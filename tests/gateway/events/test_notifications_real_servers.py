"""Notifications as real FHIR servers send them (HAPI FHIR, Medplum, Aidbox, Firely, Smile
CDR, Epic/Oracle Health backport implementations): R4B/R5 ``subscription-notification``
Bundles with a ``SubscriptionStatus``, ``Content-Type`` with ``fhirVersion``, ``empty``
payloads, and the classic R4 rest-hook (the bare resource, or an empty ping)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from gateway.db.models import Case, ExceptionRecord, InboundMessage
from gateway.runtime import Runtime
from tests.gateway.events.test_notifications import _in_review_ready
from tests.support import notifications as n
from tests.support.events_env import NOTIFY_SECRET, TARGET, case_of, events_profiles

URL = f"/v1/ehr/{TARGET}/notifications"
HEADERS = {
    "Authorization": f"Bearer {NOTIFY_SECRET}",
    "Content-Type": "application/fhir+json; fhirVersion=4.0",
}


@pytest.fixture
def profiles_dir(tmp_path: Path, secrets_env: None) -> Path:
    return events_profiles(
        tmp_path / "profiles",
        fhir_base="http://127.0.0.1:9/fhir",
        token_url="http://127.0.0.1:9/token",
    )


def r4b_notification(
    notification_type: str,
    *,
    events_since: str,
    events: list[tuple[str, str]] = (),  # type: ignore[assignment]
    resources: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """An R4B / R5 notification: ``subscription-notification`` Bundle, ``SubscriptionStatus``."""
    status: dict[str, Any] = {
        "resourceType": "SubscriptionStatus",
        "id": str(uuid.uuid4()),
        "status": "active",
        "type": notification_type,
        "eventsSinceSubscriptionStart": events_since,
        "subscription": {"reference": n.SUBSCRIPTION},
        "topic": n.TOPIC,
    }
    if events:
        status["notificationEvent"] = [
            {"eventNumber": num, "focus": {"reference": focus}} for num, focus in events
        ]
    entries = [{"fullUrl": f"urn:uuid:{status['id']}", "resource": status}]
    entries += [
        {
            "fullUrl": f"https://ehr.example.org/fhir/{r['resourceType']}/{r['id']}",
            "resource": r,
            "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            "response": {"status": "200"},
        }
        for r in resources
    ]
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "subscription-notification",
        "timestamp": "2026-11-24T16:00:00Z",
        "entry": entries,
    }


async def count(runtime: Runtime, model: Any) -> int:
    async with runtime.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_r4b_handshake_and_heartbeat_change_nothing(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    for kind in ("handshake", "heartbeat"):
        r = await client.post(URL, json=r4b_notification(kind, events_since="0"), headers=HEADERS)
        assert r.status_code == 200, r.text
        assert r.json()["type"] == kind
    assert await count(runtime, InboundMessage) == 0
    assert await count(runtime, ExceptionRecord) == 0


async def test_r4b_event_notification_moves_the_case(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await _in_review_ready(client, runtime, admin_headers, "e-1")
    body = r4b_notification(
        "event-notification",
        events_since="1",
        events=[("1", "Task/t1")],
        resources=[n.task("t1", "e-1", status="accepted")],
    )
    r = await client.post(URL, json=body, headers=HEADERS)
    assert r.status_code == 202, r.text
    assert (await case_of(client, admin_headers, patient.case_id))["state"] == "in_review"


async def test_a_bare_resource_from_a_classic_r4_rest_hook_is_refused_clearly(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    r = await client.post(URL, json=n.task("t1", "e-1", status="accepted"), headers=HEADERS)
    assert r.status_code == 422
    [problem] = r.json()["errors"]
    assert problem["code"] == "not_a_notification_bundle"
    assert "Task" in problem["detail"] and "Backport" in problem["detail"]


async def test_an_empty_ping_from_a_classic_r4_rest_hook_is_refused_clearly(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    r = await client.post(URL, content=b"", headers={"Authorization": HEADERS["Authorization"]})
    assert r.status_code == 422
    [problem] = r.json()["errors"]
    assert problem["code"] == "empty_notification"
    assert "Backport" in problem["detail"]


async def test_an_empty_payload_event_is_kept_as_an_exception_that_says_why(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = n.bundle("event-notification", events_since=1, events=[(1, None, None)])
    r = await client.post(URL, json=body, headers=HEADERS)
    assert r.status_code == 202, r.text
    async with runtime.sessionmaker() as session:
        [exc] = (await session.scalars(select(ExceptionRecord))).all()
    assert exc.problems[0]["code"] == "missing_focus"
    assert "id-only" in exc.problems[0]["message"]
    assert await count(runtime, Case) == 0


async def test_a_fhir_server_that_accepts_fhir_json_gets_an_operation_outcome(
    client: httpx.AsyncClient,
) -> None:
    """HAPI FHIR's rest-hook client sends ``Accept: application/fhir+json``."""
    accept = {"Accept": "application/fhir+xml;q=1.0, application/fhir+json;q=1.0"}
    r = await client.post(URL, content=b"", headers={**HEADERS, **accept})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/fhir+json")
    [issue] = r.json()["issue"]
    assert issue["diagnostics"] == "empty_notification" and "Backport" in issue["details"]["text"]
    r = await client.post(URL, json=n.bundle("heartbeat"), headers={"Authorization": "x", **accept})
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"


async def test_a_classic_rest_hook_writing_to_endpoint_type_id_is_refused_clearly(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    """HAPI FHIR's R4 rest-hook with a payload PUTs the resource to ``[endpoint]/Task/t1``."""
    body = n.task("t1", "e-1", status="accepted")
    r = await client.put(f"{URL}/Task/t1", json=body, headers=HEADERS)
    assert r.status_code == 422
    [problem] = r.json()["errors"]
    assert problem["code"] == "classic_rest_hook" and "Backport" in problem["detail"]
    assert await count(runtime, ExceptionRecord) == 0  # unauthenticated: nothing kept
    r = await client.put("/v1/ehr/nope/notifications/Task/t1", json=body, headers=HEADERS)
    assert r.status_code == 404
