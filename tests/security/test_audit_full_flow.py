"""Issue 11, done when: a full flow (intake, checkout, events, delivery to an EHR, reads)
leaves a verifiable audit chain, and each step is in it as an IHE BALP AuditEvent
(validated with fhir.resources R4B) naming the agent and the Patient."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from gateway.cli import stripe_signature_header
from gateway.clock import FastForwardClock
from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests import samples
from tests.conftest import ApiKeyFactory
from tests.security.test_audit_trail import EXTERNAL, STRIPE_SECRET, intake, seal_all, verify
from tests.support.api import bearer
from tests.support.delivery import drain
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV, profiles_with_target


@pytest.fixture
async def ehr(make_ehr: EhrFactory) -> AsyncIterator[tuple[LocalEhr, RunningEhr]]:
    fake = make_ehr(client_id="gateway", client_secret="s3cret")
    async with run_ehr_async(fake) as running:
        yield fake, running


@pytest.fixture
def profiles_dir(
    tmp_path: Path, ehr: tuple[LocalEhr, RunningEhr], monkeypatch: pytest.MonkeyPatch
) -> Path:
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    return profiles_with_target(tmp_path / "profiles", ehr[1])


@pytest.fixture
def runtime(runtime: Runtime) -> Runtime:
    runtime.clock = FastForwardClock()
    return runtime


@pytest.mark.slow
async def test_a_full_flow_leaves_a_verifiable_audit_chain(
    client: httpx.AsyncClient,
    runtime: Runtime,
    ehr: tuple[LocalEhr, RunningEhr],
    make_api_key: ApiKeyFactory,
) -> None:
    fake, _ = ehr
    key = await make_api_key(
        "intake:write", "events:write", "fhir:read", "cases:read", name="intake-app"
    )
    auditor = bearer(await make_api_key("audit:read", name="auditor"))
    headers = bearer(key)
    worker = delivery_worker(runtime)
    try:
        done = await intake(client, headers)
        patient_id = done["out"]["patient"]["id"]
        event = samples.stripe_event()
        event["data"]["object"]["metadata"] = {  # type: ignore[index]
            "plan": "glp1-semaglutide-starter",
            "patient_external_id": done["body"]["patient"]["external_id"],
            "intake_submission_id": done["body"]["submission_id"],
        }
        payload = json.dumps(event).encode()
        r = await client.post(
            "/v1/webhooks/stripe",
            content=payload,
            headers={
                "Stripe-Signature": stripe_signature_header(STRIPE_SECRET, payload),
                "Content-Type": "application/json",
            },
        )
        assert r.status_code == 200, r.text
        await drain(runtime, worker)
        assert fake.count("Patient") == 1
        r = await client.post(
            "/v1/events",
            json={
                "event_id": "ehr-1",
                "source": "ehr",
                "type": "provider_assigned",
                "occurred_at": "2026-11-24T10:00:00Z",
                "patient": {"system": EXTERNAL, "value": done["body"]["patient"]["external_id"]},
            },
            headers=headers,
        )
        assert r.status_code == 202, r.text
        assert (await client.get(f"/fhir/Patient/{patient_id}", headers=headers)).status_code == 200
        assert (
            await client.get(f"/v1/cases/{done['out']['case']['id']}", headers=headers)
        ).status_code == 200
        r = await client.get(
            "/v1/cases", params={"patient": f"Patient/{patient_id}"}, headers=headers
        )
        assert r.status_code == 200
    finally:
        await worker.aclose()

    await seal_all(runtime)
    result = await verify(runtime)
    assert result.ok, result.problems
    assert result.unsealed == 0 and result.checked > 10

    r = await client.get(
        "/fhir/AuditEvent",
        params={"patient": f"Patient/{patient_id}", "_count": "500"},
        headers=auditor,
    )
    assert r.status_code == 200, r.text
    events = [e["resource"] for e in r.json()["entry"]]
    for resource in events:
        AuditEvent.model_validate(resource)  # every one is a valid R4 AuditEvent
    seen = {(e["subtype"][0]["code"], e["agent"][0]["who"]["display"]) for e in events}
    assert ("create", "intake-app") in seen  # the intake's resources
    assert ("create", "stripe") in seen  # the checkout's MedicationRequest, signed by Stripe
    assert ("read", "intake-app") in seen  # the Patient and the case read
    assert ("search-type", "intake-app") in seen  # the cases listed
    assert ("event", "intake-app") in seen  # the clinical event applied to the case
    assert ("deliver", "worker") in seen  # the disclosure to the EHR
    assert all(e["entity"][0]["what"]["reference"] == f"Patient/{patient_id}" for e in events)
    chained = [e for e in events if "extension" in e]
    assert len(chained) == len(events)  # all sealed, each carrying seq, prevHash and hash
