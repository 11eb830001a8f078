"""End to end: intake and Stripe checkout in, FHIR to a local test EHR out, a clinical
event back, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.cli import stripe_signature_header
from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests import samples
from tests.support.delivery import drain
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV, profiles_with_target

STRIPE_SECRET = "whsec_test_secret_for_tests_only"


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


def signed(event: dict[str, object]) -> tuple[bytes, dict[str, str]]:
    payload = json.dumps(event).encode()
    return payload, {
        "Stripe-Signature": stripe_signature_header(STRIPE_SECRET, payload),
        "Content-Type": "application/json",
    }


@pytest.mark.slow
async def test_intake_checkout_delivered_once_and_case_moves(
    client: httpx.AsyncClient,
    runtime: Runtime,
    ehr: tuple[LocalEhr, RunningEhr],
    admin_headers: dict[str, str],
) -> None:
    fake, _ = ehr
    worker = delivery_worker(runtime)
    try:
        intake = samples.intake()
        r = await client.post("/v1/intake-submissions", json=intake, headers=admin_headers)
        assert r.status_code == 202, r.text
        assert [d["target"] for d in r.json()["deliveries"]] == ["test-ehr"]
        await drain(runtime, worker)
        assert fake.count("Patient") == 1
        assert fake.count("QuestionnaireResponse") == 1
        assert fake.count("Provenance") == 1

        event = samples.stripe_event()
        session = event["data"]["object"]  # type: ignore[index]
        session["metadata"] = {  # type: ignore[index]
            "plan": "glp1-semaglutide-starter",
            "patient_external_id": intake["patient"]["external_id"],
            "intake_submission_id": intake["submission_id"],
        }
        payload, headers = signed(event)
        for _ in range(5):  # Stripe retries the same event: one delivery, one MedicationRequest
            r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
            assert r.status_code == 200, r.text
            await drain(runtime, worker)
        assert fake.count("Patient") == 1
        assert fake.count("MedicationRequest") == 1
        mr = fake.resources("MedicationRequest")[0]
        patient = fake.resources("Patient")[0]
        qr = fake.resources("QuestionnaireResponse")[0]
        assert mr["subject"]["reference"] == f"Patient/{patient['id']}"
        assert mr["supportingInformation"][0]["reference"] == f"QuestionnaireResponse/{qr['id']}"
        assert (mr["status"], mr["intent"]) == ("draft", "proposal")
        assert qr["questionnaire"].endswith("glp1-weight-management|1")

        status = (
            await client.get(
                r.json()["status_url"].replace("http://127.0.0.1:8000", ""), headers=admin_headers
            )
        ).json()
        assert [d["status"] for d in status["deliveries"]] == ["delivered"]

        ident = {
            "system": "https://fhir-gateway.example.org/sid/external-patient-id",
            "value": intake["patient"]["external_id"],
        }
        for i, (etype, detail) in enumerate(
            [("provider_assigned", None), ("decision", "approved")]
        ):
            ev = {
                "event_id": f"ehr-{i}",
                "source": "ehr",
                "type": etype,
                "status": detail,
                "occurred_at": f"2026-11-24T10:0{i}:00Z",
                "patient": ident,
            }
            r = await client.post(
                "/v1/events",
                json={k: v for k, v in ev.items() if v is not None},
                headers=admin_headers,
            )
            assert r.status_code == 202, r.text
        cases = (
            await client.get(
                "/v1/cases",
                params={"patient": f"{ident['system']}|{ident['value']}"},
                headers=admin_headers,
            )
        ).json()
        assert len(cases) == 1
        assert cases[0]["state"] == "approved"
        types = [e["type"] for e in cases[0]["history"]]
        assert types.count("ehr_delivered") == 2
    finally:
        await worker.aclose()


@pytest.mark.slow
async def test_lost_response_is_retried_without_duplicates(
    client: httpx.AsyncClient,
    runtime: Runtime,
    ehr: tuple[LocalEhr, RunningEhr],
    admin_headers: dict[str, str],
) -> None:
    fake, _ = ehr
    fake.hang_fhir(
        1, seconds=3
    )  # longer than the target's 2 s timeout: the EHR stores it, we time out
    worker = delivery_worker(runtime)
    try:
        r = await client.post(
            "/v1/intake-submissions", json=samples.intake(), headers=admin_headers
        )
        assert r.status_code == 202
        await drain(runtime, worker)  # the timed-out attempt, then its retry (time skipped)
        # the retry's conditional creates match what the first attempt stored
        assert fake.count("Patient") == 1
        assert fake.count("QuestionnaireResponse") == 1
        assert fake.count("Provenance") == 1
    finally:
        await worker.aclose()
