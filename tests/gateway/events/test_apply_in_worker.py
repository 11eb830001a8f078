"""GATEWAY_APPLY_EVENTS_AFTER_ACK=false: the receiving process only stores and
acknowledges; the worker's sweep applies (one statement leases a batch)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.runtime import Runtime
from gateway.settings import Settings
from tests.support.events_env import (
    add_remote_patient_id,
    case_of,
    hl7_message,
    new_patient,
    send_event,
)
from tests.support.inbox import apply_pending


@pytest.fixture
def settings(database_url: str, profiles_dir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        profiles_dir=profiles_dir,
        run_worker=False,
        apply_events_after_ack=False,
        _env_file=None,  # type: ignore[call-arg]
    )


async def test_events_wait_for_the_worker(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await new_patient(client, admin_headers)
    await add_remote_patient_id(runtime, patient.patient_id, "e-8")
    r = await send_event(
        client,
        admin_headers,
        patient,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
    )
    hl7 = hl7_message("ADT^A08", control_id="W-1", pid3="e-8^^^TESTEHR^PI")
    ack = await client.post(
        "/v1/hl7v2",
        content=hl7.encode(),
        headers={**admin_headers, "Content-Type": "application/hl7-v2"},
    )
    assert "MSA|AA|W-1" in ack.text
    status = (
        await client.get(f"/v1/messages/{r.json()['message_id']}", headers=admin_headers)
    ).json()
    assert status["status"] == "received"
    assert (await case_of(client, admin_headers, patient.case_id))["state"] == "intake_received"
    assert await apply_pending(runtime) == 2
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "awaiting_review"
    assert [e["channel"] for e in case["history"]][-2:] == ["events", "hl7v2"]
    assert await apply_pending(runtime) == 0


async def test_a_claimed_batch_is_applied_together_with_each_message_its_outcome(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """On PostgreSQL the worker applies a claimed batch in one savepoint
    (:func:`gateway.events.apply.apply_prepared_batch`); on SQLite message by message.
    Either way each message gets its own outcome: an event recorded in a case's history,
    one that moves a case, and one whose patient is unknown (failed, in the exceptions
    queue)."""
    from sqlalchemy import event, select

    from gateway.db.models import ExceptionRecord
    from tests.support.events_env import Patient

    a = await new_patient(client, admin_headers)
    b = await new_patient(client, admin_headers)
    nobody = Patient("-", "no-such-patient", "-")
    recorded = await send_event(
        client, admin_headers, a, "result_available", occurred_at="2026-11-24T10:00:00Z"
    )
    moved = await send_event(
        client,
        admin_headers,
        b,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T10:01:00Z",
    )
    unmatched = await send_event(
        client, admin_headers, nobody, "result_available", occurred_at="2026-11-24T10:02:00Z"
    )
    seen: list[str] = []

    def record(*args: object) -> None:
        seen.append(str(args[2]))

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", record)
    try:
        assert await apply_pending(runtime) == 3
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", record)
    if runtime.engine.dialect.name == "postgresql":
        assert len([s for s in seen if s.startswith("SAVEPOINT")]) == 1, seen
    statuses = {}
    for r in (recorded, moved, unmatched):
        body = (
            await client.get(f"/v1/messages/{r.json()['message_id']}", headers=admin_headers)
        ).json()
        statuses[r.json()["message_id"]] = (body["status"], body["result"]["outcome"])
    assert list(statuses.values()) == [
        ("processed", "recorded"),
        ("processed", "applied"),
        ("failed", "unmatched_patient"),
    ]
    assert (await case_of(client, admin_headers, a.case_id))["history"][-1]["type"] == (
        "result_available"
    )
    assert (await case_of(client, admin_headers, b.case_id))["state"] == "awaiting_review"
    async with runtime.sessionmaker() as session:
        kinds = (
            await session.scalars(
                select(ExceptionRecord.kind).where(
                    ExceptionRecord.inbound_message_id == unmatched.json()["message_id"]
                )
            )
        ).all()
    assert kinds == ["unmatched_patient"]


async def test_a_batch_the_database_refuses_is_applied_message_by_message(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If applying the batch together fails (here: made to), its savepoint is rolled back
    and each message is applied alone: nothing is lost or applied twice."""
    from gateway.events import apply

    async def refused(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the batch was refused")

    monkeypatch.setattr(apply, "apply_prepared_batch", refused)
    a = await new_patient(client, admin_headers)
    sent = [
        await send_event(
            client, admin_headers, a, "result_available", occurred_at=f"2026-11-24T10:0{i}:00Z"
        )
        for i in range(3)
    ]
    assert await apply_pending(runtime) == 3
    history = (await case_of(client, admin_headers, a.case_id))["history"]
    assert [e["type"] for e in history].count("result_available") == 3
    for r in sent:
        body = (
            await client.get(f"/v1/messages/{r.json()['message_id']}", headers=admin_headers)
        ).json()
        assert (body["status"], body["result"]["outcome"]) == ("processed", "recorded")
    assert await apply_pending(runtime) == 0
