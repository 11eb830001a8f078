"""The inbox's leases: a message stored and leased by the receiving process is applied by
the worker when that process does not apply it within its lease, and the late process
then applies nothing twice; an ops retry claims a message by id."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import httpx

from gateway.clock import FastForwardClock
from gateway.db.models import InboundMessage
from gateway.db.uow import unit_of_work
from gateway.events import service
from gateway.events.apply import EventApplier
from gateway.runtime import Runtime
from tests.support.events_env import case_of, new_patient
from tests.support.inbox import apply_pending


async def test_a_process_that_lost_its_lease_does_not_apply_the_message_twice(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await new_patient(client, admin_headers)
    raw = json.dumps(
        {
            "event_id": f"ev-{uuid.uuid4().hex[:8]}",
            "source": "checkout",
            "type": "payment_completed",
            "occurred_at": "2026-11-24T09:00:00Z",
            "patient": patient.identifier,
        }
    ).encode()
    clock = FastForwardClock()
    runtime.clock = clock
    async with unit_of_work(runtime.write_session) as session:  # as the request does
        received = await service.receive_event(
            session, runtime, raw=raw, content_type="application/json", actor="test"
        )
    assert received.message is not None and received.prepared is not None
    assert await apply_pending(runtime) == 0  # leased to the receiving process

    clock.advance(service.LEASE + timedelta(seconds=1))  # ... which stalls past its lease
    assert await apply_pending(runtime) == 1  # the worker takes it over
    late = await EventApplier.for_runtime(runtime).apply_received(
        received.message, prepared=received.prepared
    )

    assert late == "skipped"
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "awaiting_review"
    assert [e["type"] for e in case["history"]].count("payment_completed") == 1
    async with runtime.sessionmaker() as session:
        row = await session.get(InboundMessage, received.message.id)
    assert row is not None
    assert (row.status, row.attempts, row.locked_by) == ("processed", 2, None)


async def test_an_ops_retry_claims_the_message_by_id_once(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await new_patient(client, admin_headers)
    raw = json.dumps(
        {
            "event_id": "ev-retry-1",
            "source": "checkout",
            "type": "payment_completed",
            "occurred_at": "2026-11-24T09:00:00Z",
            "patient": patient.identifier,
        }
    ).encode()
    runtime.settings.apply_events_after_ack = False  # stored only: nobody holds it
    async with unit_of_work(runtime.write_session) as session:
        received = await service.receive_event(
            session, runtime, raw=raw, content_type="application/json", actor="test"
        )
    applier = EventApplier.for_runtime(runtime, worker="ops")

    assert await applier.process(received.message_id or "") == "processed"
    assert await applier.process(received.message_id or "") == "skipped"  # applied already
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "awaiting_review"
