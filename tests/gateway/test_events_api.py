"""POST /v1/events: acknowledged once stored, applied to the patient's case after;
duplicates, unknown patients, ownership and transitions the workflow refuses."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest

from gateway.db.models import CaseEvent, ExceptionRecord, InboundMessage
from gateway.db.types import utcnow
from gateway.runtime import Runtime
from tests import samples
from tests.support.api import EXTERNAL_ID_SYSTEM, count, rows
from tests.support.inbox import run_timers


@pytest.fixture
async def patient(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> dict[str, Any]:
    """A patient whose case is ``awaiting_review`` (intake, then checkout)."""
    intake = samples.intake()
    r = await client.post("/v1/intake-submissions", json=intake, headers=admin_headers)
    assert r.status_code == 202, r.text
    external_id = intake["patient"]["external_id"]
    r = await client.post(
        "/v1/checkouts",
        json=samples.canonical_checkout(patient_external_id=external_id),
        headers=admin_headers,
    )
    assert r.json()["case"]["state"] == "awaiting_review", r.text
    return {
        "identifier": {"system": EXTERNAL_ID_SYSTEM, "value": external_id},
        "case_id": r.json()["case"]["id"],
    }


def event(patient: dict[str, Any], event_id: str, etype: str, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "source": "ehr",
        "type": etype,
        "occurred_at": "2026-11-24T10:00:00Z",
        "patient": patient["identifier"],
        **fields,
    }


async def send(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> dict[str, Any]:
    r = await client.post("/v1/events", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


async def case_of(
    client: httpx.AsyncClient, headers: dict[str, str], patient: dict[str, Any]
) -> dict[str, Any]:
    r = await client.get(f"/v1/cases/{patient['case_id']}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_an_event_is_acknowledged_and_moves_the_case(
    client: httpx.AsyncClient, admin_headers: dict[str, str], patient: dict[str, Any]
) -> None:
    ack = await send(client, admin_headers, event(patient, "e-1", "provider_assigned"))
    assert ack["event_id"] == "e-1"
    assert ack["status"] == "received"
    assert ack["status_url"].endswith(f"/v1/messages/{ack['message_id']}")
    case = await case_of(client, admin_headers, patient)
    assert case["state"] == "in_review"
    last = case["history"][-1]
    assert (last["type"], last["from_state"], last["to_state"], last["outcome"]) == (
        "provider_assigned",
        "awaiting_review",
        "in_review",
        "applied",
    )
    assert last["message_id"] == ack["message_id"]
    message = (await client.get(f"/v1/messages/{ack['message_id']}", headers=admin_headers)).json()
    assert message["status"] == "processed"
    assert message["result"]["outcome"] == "applied"


async def test_a_decision_may_be_sent_under_the_key_decision(
    client: httpx.AsyncClient, admin_headers: dict[str, str], patient: dict[str, Any]
) -> None:
    await send(client, admin_headers, event(patient, "e-1", "decision", decision="approved"))
    assert (await case_of(client, admin_headers, patient))["state"] == "approved"


async def test_a_duplicate_event_is_a_no_op(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    patient: dict[str, Any],
) -> None:
    body = event(patient, "e-1", "provider_assigned")
    first = await send(client, admin_headers, body)
    again = await send(client, admin_headers, body)
    assert again["duplicate"] is True
    assert again["message_id"] == first["message_id"]
    assert await count(runtime, InboundMessage, InboundMessage.channel == "events") == 1
    assert await count(runtime, CaseEvent, CaseEvent.event_id == "e-1") == 1
    assert (await case_of(client, admin_headers, patient))["state"] == "in_review"


async def test_the_same_event_id_from_another_sender_is_another_event(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    patient: dict[str, Any],
) -> None:
    await send(client, admin_headers, event(patient, "e-1", "provider_assigned"))
    other = await send(
        client, admin_headers, event(patient, "e-1", "provider_assigned", source="provider_network")
    )
    assert "duplicate" not in other
    assert await count(runtime, InboundMessage, InboundMessage.channel == "events") == 2


async def test_an_event_for_an_unknown_patient_goes_to_the_exceptions_queue(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    body = {
        "event_id": "e-404",
        "source": "ehr",
        "type": "provider_assigned",
        "occurred_at": "2026-11-24T10:00:00Z",
        "patient": {"system": EXTERNAL_ID_SYSTEM, "value": "nobody"},
    }
    ack = await send(client, admin_headers, body)
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.inbound_message_id) == ("unmatched_patient", ack["message_id"])
    assert record.problems[0]["code"] == "unmatched_patient"
    (message,) = await rows(runtime, InboundMessage)
    assert message.status == "failed"


async def test_an_event_from_a_sender_that_does_not_own_it_goes_to_the_exceptions_queue(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    patient: dict[str, Any],
) -> None:
    ack = await send(
        client,
        admin_headers,
        event(patient, "rx-1", "decision", status="approved", source="pharmacy"),
    )
    case = await case_of(client, admin_headers, patient)
    assert case["state"] == "awaiting_review"
    assert case["history"][-1]["outcome"] == "rejected"
    records = await rows(runtime, ExceptionRecord)
    assert [(r.kind, r.case_id, r.inbound_message_id) for r in records] == [
        ("not_owner", patient["case_id"], ack["message_id"])
    ]


async def test_a_transition_the_workflow_does_not_allow_goes_to_the_exceptions_queue(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    patient: dict[str, Any],
) -> None:
    await send(client, admin_headers, event(patient, "ship-1", "shipped", source="pharmacy"))
    case = await case_of(client, admin_headers, patient)
    assert case["state"] == "awaiting_review"
    # held for the workflow's reorder window, in case an earlier event is on its way
    assert case["history"][-1]["outcome"] == "pending"
    assert await rows(runtime, ExceptionRecord) == []
    await run_timers(runtime, now=utcnow() + timedelta(minutes=11))
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.case_id) == ("transition_not_allowed", patient["case_id"])
    message = (await rows(runtime, InboundMessage, InboundMessage.channel == "events"))[0]
    assert message.status == "failed"


async def test_a_late_event_is_recorded_without_moving_the_case_back(
    client: httpx.AsyncClient, admin_headers: dict[str, str], patient: dict[str, Any]
) -> None:
    await send(
        client,
        admin_headers,
        event(
            patient,
            "e-2",
            "decision",
            status="more_info_needed",
            occurred_at="2026-11-24T11:00:00Z",
        ),
    )
    await send(
        client,
        admin_headers,
        event(patient, "e-1", "provider_assigned", occurred_at="2026-11-24T10:00:00Z"),
    )
    case = await case_of(client, admin_headers, patient)
    assert case["state"] == "more_info_needed"
    outcomes = {e["event_id"]: e["outcome"] for e in case["history"]}
    assert (outcomes["e-2"], outcomes["e-1"]) == ("applied", "late")


async def test_an_event_naming_another_patients_case_goes_to_the_exceptions_queue(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    patient: dict[str, Any],
) -> None:
    await send(
        client, admin_headers, event(patient, "e-1", "provider_assigned", case_id="not-this-case")
    )
    (record,) = await rows(runtime, ExceptionRecord)
    assert record.kind == "unknown_case"
    assert (await case_of(client, admin_headers, patient))["state"] == "awaiting_review"


async def test_an_invalid_event_is_422_and_kept_for_review(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    body = {"event_id": "e 1", "source": "EHR", "type": "decision", "occurred_at": "yesterday"}
    r = await client.post("/v1/events", json=body, headers=admin_headers)
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} == {
        "event_id",
        "source",
        "occurred_at",
        "patient",
    }
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.channel) == ("rejected_input", "events")
    assert await count(runtime, InboundMessage) == 0


async def test_a_client_restricted_to_a_sender_cannot_speak_for_another(
    client: httpx.AsyncClient,
    runtime: Runtime,
    make_api_key: Any,
    patient: dict[str, Any],
) -> None:
    pharmacy = {
        "Authorization": f"Bearer {await make_api_key('events:write', event_sources=['pharmacy'])}"
    }
    # the pharmacy's key claiming to be the EHR: refused before anything is stored
    r = await client.post(
        "/v1/events", json=event(patient, "p-1", "provider_assigned"), headers=pharmacy
    )
    assert r.status_code == 403, r.text
    assert r.json()["errors"][0]["code"] == "source_not_allowed"
    assert await count(runtime, InboundMessage, InboundMessage.channel == "events") == 0
    # as itself it is accepted (the ownership matrix then decides what it may say)
    as_pharmacy = {**event(patient, "p-2", "dispensed"), "source": "pharmacy"}
    r = await client.post("/v1/events", json=as_pharmacy, headers=pharmacy)
    assert r.status_code == 202, r.text
