"""The workflow engine through the API: occurrence order, duplicates, ownership, late and
held events, unmatched patients, SLA timers (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import select

from gateway.db.models import ExceptionRecord
from gateway.db.types import utcnow
from gateway.runtime import Runtime
from tests.support.events_env import Patient, case_of, new_patient, send_event
from tests.support.inbox import run_timers


async def _exceptions(runtime: Runtime, **where: str) -> list[ExceptionRecord]:
    async with runtime.sessionmaker() as session:
        stmt = select(ExceptionRecord).order_by(ExceptionRecord.id)
        for key, value in where.items():
            stmt = stmt.where(getattr(ExceptionRecord, key) == value)
        return list((await session.scalars(stmt)).all())


async def _approved(client: httpx.AsyncClient, headers: dict[str, str]) -> Patient:
    patient = await new_patient(client, headers)
    await send_event(
        client,
        headers,
        patient,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
    )
    await send_event(
        client, headers, patient, "provider_assigned", occurred_at="2026-11-24T10:00:00Z"
    )
    await send_event(
        client, headers, patient, "decision", detail="approved", occurred_at="2026-11-24T11:00:00Z"
    )
    assert (await case_of(client, headers, patient.case_id))["state"] == "approved"
    return patient


async def test_out_of_order_events_are_applied_in_order_of_occurrence(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await _approved(client, admin_headers)
    # the pharmacy's "dispensed" overtakes the EHR's "prescription sent"
    await send_event(
        client,
        admin_headers,
        patient,
        "dispensed",
        source="pharmacy",
        occurred_at="2026-11-24T13:00:00Z",
    )
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "approved"
    assert case["history"][-1]["outcome"] == "pending"
    assert case["history"][-1]["hold_until"] is not None
    await send_event(
        client, admin_headers, patient, "prescription_sent", occurred_at="2026-11-24T12:00:00Z"
    )
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "dispensed"
    tail = [(e["type"], e["from_state"], e["to_state"], e["outcome"]) for e in case["history"][-2:]]
    assert tail == [
        ("prescription_sent", "approved", "prescribed", "applied"),
        ("dispensed", "prescribed", "dispensed", "applied"),
    ]
    assert await _exceptions(runtime) == []


async def test_a_duplicate_event_is_a_no_op(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    patient = await new_patient(client, admin_headers)
    await send_event(
        client,
        admin_headers,
        patient,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
        event_id="pay-1",
    )
    again = await send_event(
        client,
        admin_headers,
        patient,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
        event_id="pay-1",
    )
    assert again.json()["duplicate"] is True
    case = await case_of(client, admin_headers, patient.case_id)
    assert [e["event_id"] for e in case["history"]].count("pay-1") == 1
    assert case["state"] == "awaiting_review"


async def test_an_event_from_a_sender_that_does_not_own_it_is_refused(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await new_patient(client, admin_headers)
    await send_event(
        client,
        admin_headers,
        patient,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
    )
    await send_event(
        client,
        admin_headers,
        patient,
        "decision",
        detail="approved",
        source="pharmacy",
        occurred_at="2026-11-24T10:00:00Z",
    )
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "awaiting_review"
    assert case["history"][-1]["outcome"] == "rejected"
    [exc] = await _exceptions(runtime, kind="not_owner")
    assert exc.case_id == patient.case_id and exc.sender == "pharmacy"
    assert "does not own" in exc.problems[0]["message"]


async def test_a_late_event_is_recorded_but_never_moves_the_case_back(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await _approved(client, admin_headers)
    await send_event(
        client,
        admin_headers,
        patient,
        "decision",
        detail="more_info_needed",
        occurred_at="2026-11-24T10:30:00Z",
    )
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "approved"
    late = next(e for e in case["history"] if e["detail"] == "more_info_needed")
    assert late["outcome"] == "late"
    # history is in order of occurrence, not of arrival
    assert [e["occurred_at"] for e in case["history"]] == sorted(
        e["occurred_at"] for e in case["history"]
    )
    assert await _exceptions(runtime) == []


async def test_a_held_event_goes_to_the_exceptions_queue_when_the_window_closes(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await _approved(client, admin_headers)
    await send_event(
        client,
        admin_headers,
        patient,
        "shipped",
        source="pharmacy",
        occurred_at="2026-11-24T13:00:00Z",
    )
    assert await run_timers(runtime) == 0  # still inside the window
    assert await run_timers(runtime, now=utcnow() + timedelta(minutes=11)) >= 1
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "approved"
    assert case["history"][-1]["outcome"] == "rejected"
    [exc] = await _exceptions(runtime, kind="transition_not_allowed")
    assert "reorder window" in exc.problems[0]["message"]


async def test_unmatched_patient_goes_to_the_exceptions_queue_with_what_was_tried(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    ghost = Patient("none", "nobody-here", "none")
    r = await send_event(
        client, admin_headers, ghost, "provider_assigned", occurred_at="2026-11-24T10:00:00Z"
    )
    [exc] = await _exceptions(runtime, kind="unmatched_patient")
    assert exc.inbound_message_id == r.json()["message_id"]
    assert (
        "tried: identifier https://fhir-gateway.example.org/sid/external-patient-id"
        in exc.problems[0]["message"]
    )
    assert "nobody-here" not in exc.problems[0]["message"]
    status = (
        await client.get(f"/v1/messages/{exc.inbound_message_id}", headers=admin_headers)
    ).json()
    assert status["status"] == "failed"


async def test_ehr_delivery_stops_the_delivery_timer(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    patient = await new_patient(client, admin_headers)
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["sla"]["timer"] == "intake_not_delivered"
    await send_event(
        client,
        admin_headers,
        patient,
        "ehr_delivered",
        source="gateway",
        occurred_at="2026-11-24T09:00:00Z",
    )
    assert (await case_of(client, admin_headers, patient.case_id))["sla"] is None
    await send_event(
        client,
        admin_headers,
        patient,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:05:00Z",
    )
    case = await case_of(client, admin_headers, patient.case_id)
    assert (
        case["sla"]["timer"] == "payment_not_delivered"
    )  # a new state, a new delivery to wait for
