"""POST /v1/ehr/{target}/notifications: FHIR Subscription notifications (Backport IG) from
the test EHR, full-resource and id-only (read from a real local FHIR server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.clock import FastForwardClock
from gateway.db.models import ExceptionRecord, InboundMessage
from gateway.runtime import Runtime
from gateway.worker import ehr_clients
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests.support import notifications as n
from tests.support.ehr import EhrFactory
from tests.support.events_env import (
    NOTIFY_SECRET,
    TARGET,
    Patient,
    add_remote_patient_id,
    case_of,
    events_profiles,
    new_patient,
    send_event,
)
from tests.support.inbox import apply_pending

URL = f"/v1/ehr/{TARGET}/notifications"
AUTH = {"Authorization": f"Bearer {NOTIFY_SECRET}", "Content-Type": "application/fhir+json"}


@pytest.fixture
async def ehr(make_ehr: EhrFactory) -> AsyncIterator[tuple[LocalEhr, RunningEhr]]:
    fake = make_ehr(client_id="gateway", client_secret="s3cret")
    async with run_ehr_async(fake) as running:
        yield fake, running


@pytest.fixture
def profiles_dir(
    tmp_path: Path,
    secrets_env: None,
    ehr: tuple[LocalEhr, RunningEhr],
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    monkeypatch.setenv("TEST_EHR_CLIENT_SECRET", "s3cret")
    return events_profiles(
        tmp_path / "profiles", fhir_base=ehr[1].fhir_base, token_url=ehr[1].token_url
    )


async def _post(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.post(URL, json=body, headers=AUTH)


async def _in_review_ready(
    client: httpx.AsyncClient, runtime: Runtime, headers: dict[str, str], remote_id: str
) -> Patient:
    patient = await new_patient(client, headers)
    await send_event(
        client,
        headers,
        patient,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
    )
    await add_remote_patient_id(runtime, patient.patient_id, remote_id)
    return patient


async def _exceptions(runtime: Runtime, kind: str) -> list[ExceptionRecord]:
    async with runtime.sessionmaker() as session:
        return list(
            (
                await session.scalars(select(ExceptionRecord).where(ExceptionRecord.kind == kind))
            ).all()
        )


async def test_handshake_and_heartbeat_track_the_subscription(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await _post(client, n.bundle("handshake", events_since=0, status="requested"))
    assert r.status_code == 200 and r.json()["type"] == "handshake"
    r = await _post(client, n.bundle("heartbeat", events_since=0))
    assert r.status_code == 200 and r.json()["gaps"] == []
    [sub] = (await client.get("/v1/ops/fhir-subscriptions", headers=admin_headers)).json()
    assert sub["subscription"] == "Subscription/telehealth-tasks"
    assert sub["status"] == "active" and sub["handshake_at"] and sub["heartbeat_at"]


async def test_full_resource_notification_moves_the_case(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await _in_review_ready(client, runtime, admin_headers, "e-1")
    body = n.bundle(
        "event-notification",
        events_since=1,
        events=[(1, "2026-11-24T10:00:00Z", "Task/t1")],
        resources=[n.task("t1", "e-1", status="accepted")],
    )
    r = await _post(client, body)
    assert r.status_code == 202, r.text
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "in_review"
    event = case["history"][-1]
    assert (event["sender"], event["channel"], event["event_id"], event["reference"]) == (
        TARGET,
        "fhir-notification",
        "Task/t1/_history/1",
        "Task/t1",
    )
    # the EHR delivers the same notification again: acknowledged, applied once
    again = await _post(client, body)
    assert again.status_code == 202 and again.json()["duplicate"] is True
    assert len((await case_of(client, admin_headers, patient.case_id))["history"]) == len(
        case["history"]
    )


async def _id_only_approval(
    client: httpx.AsyncClient,
    runtime: Runtime,
    headers: dict[str, str],
    fake: LocalEhr,
    remote_patient: str,
    task: str,
) -> tuple[Patient, httpx.Response]:
    """A patient in review, the EHR's Task approving it, and an id-only notification of
    the Task posted (the focus must be read from the EHR)."""
    [ehr_patient] = fake.seed({"resourceType": "Patient", "id": remote_patient, "gender": "female"})
    fake.seed(n.task(task, ehr_patient["id"], status="completed", business_status="approved"))
    patient = await _in_review_ready(client, runtime, headers, remote_patient)
    ref = f"Task/{task}"
    body = n.bundle("event-notification", events_since=1, events=[(1, None, ref)], id_only=[ref])
    return patient, await _post(client, body)


async def test_id_only_notification_reads_the_focus_from_the_ehr(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: tuple[LocalEhr, RunningEhr],
) -> None:
    fake, _ = ehr
    patient, r = await _id_only_approval(client, runtime, admin_headers, fake, "e-77", "t-9")
    assert r.status_code == 202, r.text
    # the API process has no EHR client: the message waits for the worker
    status = (
        await client.get(f"/v1/messages/{r.json()['message_id']}", headers=admin_headers)
    ).json()
    assert status["status"] == "received"
    clients = ehr_clients(runtime)  # the worker's: it reads id-only focus resources
    try:
        assert await apply_pending(runtime, clients=clients) == 1
    finally:
        await clients.aclose()
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "approved"
    assert ("GET", "/fhir/Task/t-9", 200) in fake.requests
    assert len(fake.token_requests) == 1


async def test_id_only_focus_the_ehr_does_not_have_is_an_exception(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    body = n.bundle(
        "event-notification", events_since=1, events=[(1, None, "Task/gone")], id_only=["Task/gone"]
    )
    r = await _post(client, body)
    clients = ehr_clients(runtime)
    try:
        await apply_pending(runtime, clients=clients)
    finally:
        await clients.aclose()
    [exc] = await _exceptions(runtime, "unmappable_input")
    assert exc.inbound_message_id == r.json()["message_id"]
    assert exc.problems[0]["code"] == "focus_unreadable"


async def test_a_gap_in_event_numbers_is_an_exception_until_the_events_arrive(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    await _in_review_ready(client, runtime, admin_headers, "e-5")

    def note(number: int) -> dict[str, Any]:
        return n.bundle(
            "event-notification",
            events_since=number,
            events=[(number, None, f"Encounter/en{number}")],
            resources=[
                {
                    "resourceType": "Encounter",
                    "id": f"en{number}",
                    "status": "finished",
                    "class": {"code": "VR"},
                    "subject": {"reference": "Patient/e-5"},
                }
            ],
        )

    assert (await _post(client, note(1))).json()["gaps"] == []
    r = await _post(client, note(4))
    assert r.json()["gaps"] == [{"first": 2, "last": 3}]
    [gap] = await _exceptions(runtime, "events_gap")
    assert gap.status == "open" and "2..3" in gap.problems[0]["message"]
    # a heartbeat that says more events happened than we saw
    assert (await _post(client, n.bundle("heartbeat", events_since=6))).json()["gaps"] == [
        {"first": 5, "last": 6}
    ]
    await _post(client, note(2))
    await _post(client, note(3))
    gaps = {g.id: g for g in await _exceptions(runtime, "events_gap")}
    assert gaps[gap.id].status == "resolved" and gaps[gap.id].resolved_by == "gateway"
    assert sum(1 for g in gaps.values() if g.status == "open") == 1
    [sub] = (await client.get("/v1/ops/fhir-subscriptions", headers=admin_headers)).json()
    assert sub["last_event_number"] == 6
    assert [(m["first"], m["last"]) for m in sub["missing"]] == [(5, 6)]


async def test_wrong_credentials_are_refused_and_nothing_is_stored(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = n.bundle("handshake", events_since=0)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = await client.post(URL, json=body, headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/v1/ops/fhir-subscriptions", headers=admin_headers)).json() == []
    assert (
        await client.post("/v1/ehr/example-ehr/notifications", json=body, headers=AUTH)
    ).status_code == 503
    assert (
        await client.post("/v1/ehr/nope/notifications", json=body, headers=AUTH)
    ).status_code == 404


async def test_malformed_bundle_is_refused_and_kept(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = n.bundle("event-notification", events_since=1, events=[(1, None, "Task/t1")])
    body["type"] = "collection"
    r = await _post(client, body)
    assert r.status_code == 422
    assert {e["code"] for e in r.json()["errors"]} == {"not_history"}
    [kept] = await _exceptions(runtime, "rejected_input")
    assert kept.channel == "fhir-notification" and kept.payload is not None


async def test_an_unreachable_ehr_is_retried_with_backoff_then_kept_as_an_exception(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: tuple[LocalEhr, RunningEhr],
) -> None:
    fake, _ = ehr
    _, r = await _id_only_approval(client, runtime, admin_headers, fake, "e-3", "t-3")
    message_id = r.json()["message_id"]
    clock = FastForwardClock()
    runtime.clock = clock
    fake.fail_fhir(10_000, 503)  # the EHR's FHIR API is down
    clients = ehr_clients(runtime)
    try:
        assert await apply_pending(runtime, clients=clients) == 0  # back in the queue
        first = await _message(runtime, message_id)
        assert (first.status, first.attempts, first.locked_by) == ("received", 1, None)
        assert first.available_at is not None and first.available_at > clock.now()
        reads = len(fake.requests)
        assert await apply_pending(runtime, clients=clients) == 0  # not due: the EHR is left alone
        assert len(fake.requests) == reads
        for _ in range(7):  # full-jitter backoff, skipped over; the 8th failure gives up
            row = await _message(runtime, message_id)
            assert row.available_at is not None
            clock.advance(max(0.0, (row.available_at - clock.now()).total_seconds()) + 0.001)
            await apply_pending(runtime, clients=clients)
    finally:
        await clients.aclose()

    row = await _message(runtime, message_id)
    assert (row.status, row.attempts) == ("failed", 8)
    [exc] = await _exceptions(runtime, "processing_error")
    assert exc.inbound_message_id == message_id
    assert exc.problems[0]["code"] == "retries_exhausted"
    assert len([r for r in fake.requests if r.path == "/fhir/Task/t-3"]) == 8


async def _message(runtime: Runtime, message_id: str) -> InboundMessage:
    async with runtime.sessionmaker() as session:
        row = await session.get(InboundMessage, message_id)
    assert row is not None
    return row
