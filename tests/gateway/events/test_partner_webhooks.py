"""POST /v1/partners/{partner}/webhooks: signatures (Standard Webhooks, HMAC-SHA256), the
status table, dedupe, and patient matching with learned partner ids."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
from sqlalchemy import select

from gateway.db.models import ExceptionRecord, InboundMessage
from gateway.runtime import Runtime
from tests.support.events_env import (
    PHARMACY_ENV,
    beacon_headers,
    case_of,
    new_patient,
    pharmacy_webhook,
    send_event,
    standard_webhook_headers,
)

PHARMACY = "/v1/partners/sunrise-pharmacy/webhooks"
BEACON = "/v1/partners/beacon-provider-network/webhooks"


async def _count_messages(runtime: Runtime) -> int:
    async with runtime.sessionmaker() as session:
        return len(
            (
                await session.scalars(
                    select(InboundMessage.id).where(InboundMessage.channel == "partner")
                )
            ).all()
        )


async def test_good_signature_is_stored_and_applied(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    patient = await new_patient(client, admin_headers)
    body = json.dumps(
        {
            "event_id": "bc-1",
            "event": "consult.assigned",
            "occurred_at": 1795521600,  # 2026-11-24T12:00:00Z
            "consult": {"id": "c1"},
            "patient": {"external_id": patient.external_id},
        }
    ).encode()
    await send_event(
        client,
        admin_headers,
        patient,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
    )
    r = await client.post(BEACON, content=body, headers=beacon_headers(body))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "received"
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "in_review"
    assert (case["history"][-1]["source"], case["history"][-1]["sender"]) == (
        "provider_network",
        "beacon-provider-network",
    )
    again = await client.post(BEACON, content=body, headers=beacon_headers(body))
    assert again.status_code == 202 and again.json()["duplicate"] is True


@pytest.mark.parametrize(
    ("make_headers", "reason"),
    [
        (
            lambda b: {**beacon_headers(b), "X-Beacon-Signature": "sha256=" + "0" * 64},
            "invalid_signature",
        ),
        (lambda b: beacon_headers(b, secret="another-secret"), "invalid_signature"),
        # 30 s past the 300 s tolerance: a loaded machine may take seconds to answer.
        (lambda b: beacon_headers(b, at=time.time() - 330), "stale_signature"),
        (lambda b: beacon_headers(b, at=time.time() + 330), "stale_signature"),
        (lambda b: {"content-type": "application/json"}, "missing_signature"),
        (lambda b: {**beacon_headers(b), "X-Beacon-Signature": "sha256=zz"}, "invalid_signature"),
    ],
)
async def test_bad_or_stale_hmac_signatures_are_refused(
    client: httpx.AsyncClient, runtime: Runtime, make_headers: object, reason: str
) -> None:
    body = json.dumps(
        {"event_id": "bc-2", "event": "consult.assigned", "occurred_at": 1, "patient": {}}
    ).encode()
    r = await client.post(BEACON, content=body, headers=make_headers(body))  # type: ignore[operator]
    assert r.status_code == 401
    assert [e["code"] for e in r.json()["errors"]] == [reason]
    # a header problem names the header, not a body pointer (issue 15)
    [error] = r.json()["errors"]
    assert error["header"] == "X-Beacon-Signature" and "pointer" not in error
    assert await _count_messages(runtime) == 0


async def test_tampered_body_fails_the_standard_webhooks_signature(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = pharmacy_webhook("pt-1", "shipped")
    headers = standard_webhook_headers(body)
    tampered = body.replace(b"shipped", b"delivered")
    assert (await client.post(PHARMACY, content=tampered, headers=headers)).status_code == 401
    reserialized = json.dumps(json.loads(body), indent=2).encode()
    assert (await client.post(PHARMACY, content=reserialized, headers=headers)).status_code == 401
    stale = standard_webhook_headers(body, at=time.time() - 600)
    r = await client.post(PHARMACY, content=body, headers=stale)
    assert r.status_code == 401 and r.json()["errors"][0]["code"] == "stale_signature"
    assert await _count_messages(runtime) == 0


async def test_a_rotated_signature_list_with_a_malformed_entry_still_verifies(
    client: httpx.AsyncClient,
) -> None:
    # the reference library raises on "v1,not-base64" before trying the valid signature
    body = pharmacy_webhook("pt-1", "label_created")
    headers = standard_webhook_headers(body)
    headers["webhook-signature"] = "v1,not-base64!! garbage " + headers["webhook-signature"]
    r = await client.post(PHARMACY, content=body, headers=headers)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "ignored"


async def test_verified_but_unmappable_webhook_is_acknowledged_and_kept(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = pharmacy_webhook(None, "teleported")
    r = await client.post(PHARMACY, content=body, headers=standard_webhook_headers(body))
    assert r.status_code == 202
    assert r.json()["status"] == "failed"
    assert {p["code"] for p in r.json()["problems"]} == {"unmapped_status", "missing_patient"}
    async with runtime.sessionmaker() as session:
        [exc] = (await session.scalars(select(ExceptionRecord))).all()
    assert exc.kind == "unmappable_input" and exc.sender == "sunrise-pharmacy"
    assert exc.inbound_message_id == r.json()["message_id"]


async def test_webhook_without_event_id_is_rejected_and_kept(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = json.dumps(
        {"type": "prescription.status_changed", "data": {"status": "shipped"}}
    ).encode()
    r = await client.post(PHARMACY, content=body, headers=standard_webhook_headers(body))
    assert r.status_code == 422
    async with runtime.sessionmaker() as session:
        [exc] = (await session.scalars(select(ExceptionRecord))).all()
    assert (exc.kind, exc.channel, exc.sender) == ("rejected_input", "partner", "sunrise-pharmacy")


async def test_partner_ids_are_learned_and_match_later_events(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    patient = await new_patient(client, admin_headers)
    for event in ("payment_completed", "provider_assigned"):
        await send_event(
            client,
            admin_headers,
            patient,
            event,
            source="checkout" if event.startswith("pay") else "ehr",
            occurred_at="2026-11-24T09:00:00Z",
        )
    await send_event(
        client,
        admin_headers,
        patient,
        "decision",
        detail="approved",
        occurred_at="2026-11-24T10:00:00Z",
    )
    await send_event(
        client, admin_headers, patient, "prescription_sent", occurred_at="2026-11-24T11:00:00Z"
    )
    first = pharmacy_webhook(
        patient.external_id,
        "received",
        pharmacy_patient_id="pp-99",
        created_at="2026-11-24T12:00:00Z",
    )
    assert (
        await client.post(PHARMACY, content=first, headers=standard_webhook_headers(first))
    ).status_code == 202
    # later the pharmacy only sends its own id
    later = pharmacy_webhook(
        None, "dispensed", pharmacy_patient_id="pp-99", created_at="2026-11-24T13:00:00Z"
    )
    r = await client.post(PHARMACY, content=later, headers=standard_webhook_headers(later))
    assert r.status_code == 202
    assert (await case_of(client, admin_headers, patient.case_id))["state"] == "dispensed"


async def test_unknown_partner_and_missing_secret(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = pharmacy_webhook("pt-1", "shipped")
    assert (await client.post("/v1/partners/nobody/webhooks", content=body)).status_code == 404
    # the EHR HL7 feed is a partner without webhooks
    assert (
        await client.post("/v1/partners/test-ehr-hl7/webhooks", content=body)
    ).status_code == 404
    monkeypatch.setenv(PHARMACY_ENV, "whsec_" + base64.b64encode(b"short").decode())
    r = await client.post(PHARMACY, content=body, headers=standard_webhook_headers(body))
    assert r.status_code == 503


async def test_a_webhook_whose_event_is_hours_ahead_is_kept_not_applied(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """Issue 15: beyond the partner's max_future (5 minutes) the event is refused."""
    patient = await new_patient(client, admin_headers)
    body = json.dumps(
        {
            "event_id": "bc-future",
            "event": "consult.assigned",
            "occurred_at": int(time.time()) + 3 * 3600,
            "consult": {"id": "c9"},
            "patient": {"external_id": patient.external_id},
        }
    ).encode()
    r = await client.post(BEACON, content=body, headers=beacon_headers(body))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "failed"
    assert [p["code"] for p in r.json()["problems"]] == ["future_timestamp"]
    async with runtime.sessionmaker() as session:
        [exc] = (await session.scalars(select(ExceptionRecord))).all()
    assert exc.kind == "unmappable_input" and exc.sender == "beacon-provider-network"
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "intake_received"
