"""A case walked through the whole journey over every inbound channel, with the ops
subscriber receiving each state change exactly once, in order, signed so that it can
verify it with the ``standardwebhooks`` library (SQLite and PostgreSQL).

intake (API) -> paid (Stripe) -> delivered (worker -> local FHIR server) -> provider
assigned (FHIR notification, full-resource) -> approved (FHIR notification, id-only, read
back from the EHR) -> prescription sent (HL7 RDE^O11 over MLLP) -> dispensed and shipped
(pharmacy webhooks, Standard Webhooks) -> refill requested (HL7 RDE^O11 RF over HTTP).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
from hl7.mllp import open_hl7_connection
from sqlalchemy import func, select

from gateway.cli import stripe_signature_header
from gateway.clock import FastForwardClock
from gateway.db.models import Delivery
from gateway.delivery.worker import DeliveryWorker
from gateway.ehr.factory import EhrClients
from gateway.events.apply import apply_received
from gateway.hl7.mllp import MllpServer
from gateway.hl7.service import Hl7Reply
from gateway.runtime import Runtime
from gateway.worker import delivery_worker, ehr_clients
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests import samples
from tests.support import notifications as n
from tests.support.delivery import skip_to_next_due
from tests.support.ehr import EhrFactory
from tests.support.events_env import (
    BEACON_ENV,
    BEACON_SECRET,
    NOTIFY_ENV,
    NOTIFY_SECRET,
    PHARMACY_ENV,
    PHARMACY_SECRET,
    TARGET,
    Subscriber,
    events_profiles,
    hl7_message,
    pharmacy_webhook,
    remote_patient_id,
    run_subscriber,
    standard_webhook_headers,
)
from tests.support.inbox import apply_pending

STRIPE_SECRET = "whsec_test_secret_for_tests_only"
NOTIFY = {"Authorization": f"Bearer {NOTIFY_SECRET}", "Content-Type": "application/fhir+json"}


@pytest.fixture
async def ehr(make_ehr: EhrFactory) -> AsyncIterator[tuple[LocalEhr, RunningEhr]]:
    fake = make_ehr(client_id="gateway", client_secret="s3cret")
    async with run_ehr_async(fake) as running:
        yield fake, running


@pytest.fixture
def profiles_dir(
    tmp_path: Path, ehr: tuple[LocalEhr, RunningEhr], monkeypatch: pytest.MonkeyPatch
) -> Path:
    for env, value in (
        ("TEST_EHR_CLIENT_SECRET", "s3cret"),
        (NOTIFY_ENV, NOTIFY_SECRET),
        (PHARMACY_ENV, PHARMACY_SECRET),
        (BEACON_ENV, BEACON_SECRET),
    ):
        monkeypatch.setenv(env, value)
    return events_profiles(
        tmp_path / "profiles",
        fhir_base=ehr[1].fhir_base,
        token_url=ehr[1].token_url,
        enabled=True,
    )


async def drain(worker: DeliveryWorker, clients: EhrClients, runtime: Runtime) -> None:
    """Deliver, apply pending messages (reading from the EHR), until nothing is left
    (skipping the clock over short retry backoffs)."""
    for _ in range(100):
        done = await worker.run_once()
        done += await apply_pending(runtime, clients=clients)
        if done:
            continue
        async with runtime.sessionmaker() as session:
            waiting = await session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.status.in_(("pending", "in_flight")))
            )
        if not waiting:
            return
        assert isinstance(runtime.clock, FastForwardClock)
        await skip_to_next_due(runtime, runtime.clock)
    raise AssertionError("the outbox did not drain")


@pytest.mark.slow
async def test_the_whole_journey_reaches_the_subscriber_once_in_order(
    client: httpx.AsyncClient,
    runtime: Runtime,
    ehr: tuple[LocalEhr, RunningEhr],
    admin_headers: dict[str, str],
    capfd: pytest.CaptureFixture[str],
) -> None:
    fake, _ = ehr
    subscriber = Subscriber(secret="")
    clients = ehr_clients(runtime)
    worker = delivery_worker(runtime, clients=clients)

    async def apply(reply: Hl7Reply) -> object:
        assert reply.message is not None
        return await apply_received(runtime, reply.message, prepared=reply.prepared)

    mllp = MllpServer(runtime, port=0, after_store=apply, allow_plaintext=True)
    await mllp.start()
    try:
        async with run_subscriber(subscriber) as url:
            r = await client.post(
                "/v1/ops/subscribers",
                json={
                    "name": "crm",
                    "url": url,
                    "event_types": ["case.*"],
                    "retry": {"base_delay_s": 0.01, "max_delay_s": 0.05},
                },
                headers=admin_headers,
            )
            assert r.status_code == 201
            subscriber.secret = r.json()["secret"]

            # intake, then payment (Stripe), both delivered to the EHR
            intake = samples.intake()
            r = await client.post("/v1/intake-submissions", json=intake, headers=admin_headers)
            assert r.status_code == 202, r.text
            case_id = r.json()["case"]["id"]
            patient_id = r.json()["patient"]["id"]
            await drain(worker, clients, runtime)
            event = samples.stripe_event()
            event["data"]["object"]["metadata"] = {
                "plan": "glp1-semaglutide-starter",
                "patient_external_id": intake["patient"]["external_id"],
                "intake_submission_id": intake["submission_id"],
            }
            payload = json.dumps(event).encode()
            headers = {
                "Stripe-Signature": stripe_signature_header(STRIPE_SECRET, payload),
                "Content-Type": "application/json",
            }
            assert (
                await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
            ).status_code == 200
            subscriber.fail_next = 1  # one webhook has to be retried: still received once
            await drain(worker, clients, runtime)
            ehr_patient = await remote_patient_id(runtime, patient_id)
            assert ehr_patient is not None
            [proposal] = fake.resources("MedicationRequest")

            # provider assigned: full-resource notification of the review Task
            [task] = fake.seed(
                n.task(
                    "review-1",
                    ehr_patient,
                    status="accepted",
                    focus=f"MedicationRequest/{proposal['id']}",
                )
            )
            body = n.bundle(
                "event-notification",
                events_since=1,
                events=[(1, "2026-11-24T10:00:00Z", "Task/review-1")],
                resources=[task],
            )
            assert (
                await client.post(f"/v1/ehr/{TARGET}/notifications", json=body, headers=NOTIFY)
            ).status_code == 202

            # approved: id-only notification; the worker reads the Task from the EHR
            fake.seed(
                n.task(
                    "review-1",
                    ehr_patient,
                    status="completed",
                    business_status="approved",
                    focus=f"MedicationRequest/{proposal['id']}",
                )
            )
            body = n.bundle(
                "event-notification",
                events_since=2,
                events=[(2, "2026-11-24T11:00:00Z", "Task/review-1")],
                id_only=["Task/review-1"],
            )
            assert (
                await client.post(f"/v1/ehr/{TARGET}/notifications", json=body, headers=NOTIFY)
            ).status_code == 202
            await drain(worker, clients, runtime)

            # prescription sent: HL7 over MLLP, the EHR's Patient id and its MRN
            reader, writer = await open_hl7_connection("127.0.0.1", mllp.port)
            rde = hl7_message(
                "RDE^O11",
                control_id="RX-100",
                pid3=f"{ehr_patient}^^^TESTEHR^PI~MRN-77^^^TESTEHR^MR",
                orc="ORC|NW|PL-100|||IP||||20261124120000-0500",
            )
            writer.writemessage(hl7.parse(rde))
            ack = await reader.readmessage()
            writer.close()
            await writer.wait_closed()
            assert str(ack.segment("MSA")[1]) == "AA"
            await mllp.close()

            # dispensed and shipped: pharmacy webhooks, found by the MRN learned from HL7
            for status, at in (
                ("dispensed", "2026-11-25T15:00:00Z"),
                ("shipped", "2026-11-26T09:00:00Z"),
            ):
                hook = pharmacy_webhook(None, status, mrn="MRN-77", created_at=at)
                r = await client.post(
                    "/v1/partners/sunrise-pharmacy/webhooks",
                    content=hook,
                    headers=standard_webhook_headers(hook),
                )
                assert r.status_code == 202, r.text
                # the pharmacy retries the same webhook: nothing changes twice
                again = await client.post(
                    "/v1/partners/sunrise-pharmacy/webhooks",
                    content=hook,
                    headers=standard_webhook_headers(hook),
                )
                assert again.json()["duplicate"] is True

            # refill requested: HL7 from the pharmacy over HTTP
            refill = hl7_message(
                "RDE^O11",
                control_id="RF-1",
                facility="SUNRISE-RX",
                pid3="MRN-77^^^EXAMPLEEHR^MR",
                orc="ORC|RF|PL-100|FL-1||IP||||20261127080000-0600",
            ).replace("EHRAPP", "RXSYS")
            r = await client.post(
                "/v1/hl7v2",
                content=refill.encode(),
                headers={**admin_headers, "Content-Type": "application/hl7-v2"},
            )
            assert "MSA|AA|RF-1" in r.text
            await drain(worker, clients, runtime)

        case = (await client.get(f"/v1/cases/{case_id}", headers=admin_headers)).json()
        assert case["state"] == "refill_pending"
        moves = [
            (e["from_state"], e["to_state"]) for e in case["history"] if e["outcome"] == "applied"
        ]
        assert moves == [
            (None, "intake_received"),
            ("intake_received", "awaiting_review"),
            ("awaiting_review", "in_review"),
            ("in_review", "approved"),
            ("approved", "prescribed"),
            ("prescribed", "dispensed"),
            ("dispensed", "shipped"),
            ("shipped", "refill_pending"),
        ]
        senders = [e["sender"] for e in case["history"] if e["outcome"] == "applied"]
        assert senders == [
            "intake",
            "checkout",
            TARGET,
            TARGET,
            "test-ehr-hl7",
            "sunrise-pharmacy",
            "sunrise-pharmacy",
            "sunrise-pharmacy",
        ]
        assert [e["type"] for e in case["history"]].count("ehr_delivered") == 2
        assert (await client.get("/v1/ops/exceptions", headers=admin_headers)).json()["items"] == []

        # the subscriber got every change exactly once, in order, and verified each
        assert subscriber.rejected == 0
        got: list[dict[str, Any]] = [r.payload for r in subscriber.received]
        assert [(p["type"], p["data"]["to_state"]) for p in got] == [
            ("case.opened", "intake_received"),
            ("case.state_changed", "awaiting_review"),
            ("case.state_changed", "in_review"),
            ("case.state_changed", "approved"),
            ("case.state_changed", "prescribed"),
            ("case.state_changed", "dispensed"),
            ("case.state_changed", "shipped"),
            ("case.state_changed", "refill_pending"),
        ]
        assert len({p["id"] for p in got}) == len(got)
        assert [p["data"]["sequence"] for p in got] == sorted(p["data"]["sequence"] for p in got)
        assert all(p["data"]["case_id"] == case_id for p in got)
        assert subscriber.attempts == len(got) + 1
    finally:
        await mllp.close()
        await worker.aclose()
    logs = capfd.readouterr()
    text = logs.out + logs.err
    assert "case.opened" in text  # the logs were captured
    for phi in (
        "Jordan",
        "Rivera",
        "1988-04-12",
        "4155552671",
        "jordan.rivera",
        "DOE^JANE",
        "JANE",
        "MRN-77",
    ):
        assert phi not in text, phi
