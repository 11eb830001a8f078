"""Recording a batch of events (``record_events``, the delivery worker's
``ehr_delivered``) gives what applying them one by one gives: history rows, duplicates,
SLA timers stopped, state changes and refusals through the same rules, per-case order
(SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx

from gateway.db.models import Case
from gateway.db.types import utcnow
from gateway.runtime import Runtime
from gateway.subscribers.service import enqueue_case_webhook
from gateway.workflow.batch import record_events
from gateway.workflow.service import EventInput
from tests.support.events_env import case_of, new_patient


def _delivered(patient_id: str, message: str, at: datetime) -> EventInput:
    return EventInput(
        source="gateway",
        event_id=f"ehr_delivered:test-ehr:{message}",
        type="ehr_delivered",
        detail=None,
        occurred_at=at,
        patient_id=patient_id,
        message_id=None,
    )


async def _record(runtime: Runtime, events: list[EventInput]) -> list[tuple[str, str | None]]:
    workflow = runtime.profiles.current.workflow_or_raise
    async with runtime.write_session() as session:
        results = await record_events(session, workflow, events, notify=enqueue_case_webhook)
        await session.commit()
    return [(r.outcome, r.case_id) for r in results]


async def test_a_batch_records_stops_timers_and_skips_duplicates(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    a = await new_patient(client, admin_headers)
    b = await new_patient(client, admin_headers)
    async with runtime.sessionmaker() as session:
        case_a = await session.get(Case, a.case_id)
        assert case_a is not None and case_a.sla_timer == "intake_not_delivered"
    now = utcnow()
    results = await _record(
        runtime,
        [
            _delivered(a.patient_id, "m-a", now),
            _delivered(b.patient_id, "m-b", now),
            _delivered(a.patient_id, "m-a", now),  # the same event twice in one batch
            _delivered("no-such-patient", "m-x", now),
        ],
    )
    assert results == [
        ("recorded", a.case_id),
        ("recorded", b.case_id),
        ("duplicate", a.case_id),
        ("no_case", None),
    ]
    # a later batch with the same event: a duplicate again
    assert await _record(runtime, [_delivered(b.patient_id, "m-b", now)]) == [
        ("duplicate", b.case_id)
    ]
    for patient in (a, b):
        case = await case_of(client, admin_headers, patient.case_id)
        assert case["state"] == "intake_received"
        types = [e["type"] for e in case["history"]]
        assert types.count("ehr_delivered") == 1
        assert case["history"][-1]["outcome"] == "recorded"
        assert case["history"][-1]["from_state"] == case["history"][-1]["to_state"]
    async with runtime.sessionmaker() as session:
        case_a = await session.get(Case, a.case_id)
        assert case_a is not None
        assert case_a.sla_timer is None and case_a.sla_due_at is None


async def test_events_that_move_a_case_keep_their_order_in_a_batch(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await new_patient(client, admin_headers)
    now = utcnow()
    paid = EventInput(
        source="checkout",
        event_id="pay-1",
        type="payment_completed",
        detail=None,
        occurred_at=now - timedelta(seconds=5),
        patient_id=patient.patient_id,
    )
    refused = EventInput(  # checkout does not own decisions: refused, as one by one
        source="checkout",
        event_id="bad-1",
        type="decision",
        detail="approved",
        occurred_at=now - timedelta(seconds=3),
        patient_id=patient.patient_id,
    )
    results = await _record(
        runtime, [paid, _delivered(patient.patient_id, "m-1", now - timedelta(seconds=4)), refused]
    )
    assert [r for r, _ in results] == ["applied", "recorded", "rejected"]
    case = await case_of(client, admin_headers, patient.case_id)
    tail = [(e["type"], e["from_state"], e["to_state"], e["outcome"]) for e in case["history"][-3:]]
    assert tail == [
        ("payment_completed", "intake_received", case["state"], "applied"),
        ("ehr_delivered", case["state"], case["state"], "recorded"),
        ("decision", case["state"], case["state"], "rejected"),
    ]


async def test_a_mixed_batch_leaves_the_same_timers_and_history_as_one_by_one(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """A delivery (stops the intake timer), a payment that moves the case (starts the
    payment-delivery timer) and a second delivery (stops it) in one batch, against the
    same three applied one by one to another patient: same outcomes, states, timers."""
    from gateway.workflow.service import apply_event

    batched = await new_patient(client, admin_headers)
    single = await new_patient(client, admin_headers)
    now = utcnow()

    def events(patient_id: str) -> list[EventInput]:
        return [
            _delivered(patient_id, f"{patient_id}-m1", now - timedelta(seconds=6)),
            EventInput(
                source="checkout",
                event_id=f"{patient_id}-pay",
                type="payment_completed",
                detail=None,
                occurred_at=now - timedelta(seconds=5),
                patient_id=patient_id,
            ),
            _delivered(patient_id, f"{patient_id}-m2", now - timedelta(seconds=4)),
        ]

    got = await _record(runtime, events(batched.patient_id))
    workflow = runtime.profiles.current.workflow_or_raise
    one_by_one = []
    for event in events(single.patient_id):
        async with runtime.write_session() as session:
            result = await apply_event(session, workflow, event, notify=enqueue_case_webhook)
            await session.commit()
        one_by_one.append(result.outcome)
    assert [r for r, _ in got] == one_by_one == ["recorded", "applied", "recorded"]
    async with runtime.sessionmaker() as session:
        a = await session.get(Case, batched.case_id)
        b = await session.get(Case, single.case_id)
        assert a is not None and b is not None
        assert (
            (a.state, a.sla_timer)
            == (b.state, b.sla_timer)
            == (
                "awaiting_review",
                "review_overdue",
            )
        )
    for patient in (batched, single):
        case = await case_of(client, admin_headers, patient.case_id)
        assert [(e["type"], e["outcome"]) for e in case["history"][-3:]] == [
            ("ehr_delivered", "recorded"),
            ("payment_completed", "applied"),
            ("ehr_delivered", "recorded"),
        ]


async def test_timers_stopped_by_the_batch_need_no_history_read(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """A case whose only running timer waits for ``ehr_delivered`` is stopped by the
    batch's own event: its history is not read again, and the case row is written once."""
    from sqlalchemy import event

    a = await new_patient(client, admin_headers)
    seen: list[str] = []

    def record(*args: object) -> None:
        seen.append(str(args[2]))

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", record)
    try:
        results = await _record(runtime, [_delivered(a.patient_id, "m-once", utcnow())])
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", record)
    assert results == [("recorded", a.case_id)]
    reads = [s for s in seen if s.startswith("SELECT") and "FROM case_events" in s]
    assert len(reads) == 1, reads  # the duplicates check only, no SLA history query
    assert len([s for s in seen if s.startswith("UPDATE cases")]) == 1, seen
    async with runtime.sessionmaker() as session:
        case = await session.get(Case, a.case_id)
        assert case is not None and case.sla_timer is None and case.sla_due_at is None
