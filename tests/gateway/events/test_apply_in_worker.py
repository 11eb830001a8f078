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
