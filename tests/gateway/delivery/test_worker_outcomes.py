"""The delivery worker against the local EHR (real HTTP, real token endpoint, a real FHIR server):
permanent rejections, retries honouring Retry-After, token failures that spend no
attempts, and per-patient ordering. SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.db.models import Delivery, DeliveryAttempt
from gateway.db.types import utcnow
from gateway.delivery.worker import DeliveryWorker
from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests import samples
from tests.support.api import count, rows
from tests.support.delivery import drain
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV, profiles_with_target

REJECTION = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "business-rule",
            "diagnostics": "This EHR requires a birth date on every Patient",
        }
    ],
}


@pytest.fixture
async def ehr(make_ehr: EhrFactory) -> AsyncIterator[LocalEhr]:
    fake = make_ehr(client_id="gateway", client_secret="s3cret")
    async with run_ehr_async(fake) as running:
        fake.running = running  # type: ignore[attr-defined]
        yield fake


@pytest.fixture
def profiles_dir(tmp_path: Path, ehr: LocalEhr, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    running: RunningEhr = ehr.running  # type: ignore[attr-defined]
    return profiles_with_target(tmp_path / "profiles", running)


@pytest.fixture
async def worker(runtime: Runtime) -> AsyncIterator[DeliveryWorker]:
    w = delivery_worker(runtime, concurrency=4)
    try:
        yield w
    finally:
        await w.aclose()


async def intake(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any] | None = None
) -> dict[str, Any]:
    r = await client.post("/v1/intake-submissions", json=body or samples.intake(), headers=headers)
    assert r.status_code == 202, r.text
    assert len(r.json()["deliveries"]) == 1
    return r.json()  # type: ignore[no-any-return]


async def delivery(runtime: Runtime, delivery_id: int) -> Delivery:
    (row,) = await rows(runtime, Delivery, Delivery.id == delivery_id)
    return row


def transactions(ehr: LocalEhr) -> list[int]:
    """Statuses of the transaction POSTs the EHR answered, in order."""
    return [r.status for r in ehr.requests if r.method == "POST" and r.path.rstrip("/") == "/fhir"]


async def test_a_4xx_with_an_operation_outcome_is_dead_lettered_at_once(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: LocalEhr,
    worker: DeliveryWorker,
) -> None:
    ehr.reject_when(lambda r: r.get("resourceType") == "Patient", 422, REJECTION)
    out = await intake(client, admin_headers)
    assert await worker.run_once() == 1
    row = await delivery(runtime, out["deliveries"][0]["id"])
    assert (row.status, row.attempts, row.dead_reason, row.last_status_code) == (
        "dead",
        1,
        "rejected",
        422,
    )
    # the EHR's OperationOutcome is kept as it answered (it locates the failing entry)
    assert row.operation_outcome is not None
    (issue,) = row.operation_outcome["issue"]
    assert (issue["severity"], issue["code"]) == ("error", "business-rule")
    assert issue["diagnostics"].endswith("This EHR requires a birth date on every Patient")
    (attempt,) = await rows(runtime, DeliveryAttempt)
    assert (attempt.outcome, attempt.status_code) == ("permanent", 422)
    assert await worker.run_once() == 0  # never retried
    assert transactions(ehr) == [422]
    assert ehr.count("Patient") == 0
    status = await client.get(f"/v1/messages/{out['message_id']}", headers=admin_headers)
    assert [d["status"] for d in status.json()["deliveries"]] == ["dead"]


@pytest.mark.parametrize("status", [503, 429])
async def test_a_retryable_answer_with_retry_after_is_retried_and_delivered_once(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: LocalEhr,
    worker: DeliveryWorker,
    status: int,
) -> None:
    ehr.fail_fhir(1, status, retry_after=1)
    out = await intake(client, admin_headers)
    assert await worker.run_once() == 1
    row = await delivery(runtime, out["deliveries"][0]["id"])
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, status)
    assert row.last_attempt_at is not None
    assert row.available_at - row.last_attempt_at >= timedelta(seconds=1)  # Retry-After
    assert await worker.run_once() == 0  # not before Retry-After

    await drain(runtime, worker)  # skips ahead to the Retry-After
    row = await delivery(runtime, row.id)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 2, 200)
    assert transactions(ehr) == [status, 200]
    assert (ehr.count("Patient"), ehr.count("QuestionnaireResponse"), ehr.count("Provenance")) == (
        1,
        1,
        1,
    )
    outcomes = [
        a.outcome for a in await rows(runtime, DeliveryAttempt, order_by=DeliveryAttempt.id)
    ]
    assert outcomes == ["transient", "delivered"]


async def test_a_refused_client_secret_spends_no_delivery_attempts(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: LocalEhr,
    worker: DeliveryWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, "not-the-secret")
    out = await intake(client, admin_headers)
    before = utcnow()
    assert await worker.run_once() == 1
    row = await delivery(runtime, out["deliveries"][0]["id"])
    assert (row.status, row.attempts) == ("pending", 0)
    assert row.last_error is not None and "token endpoint refused the client (401" in row.last_error
    assert row.available_at > before + timedelta(
        seconds=1
    )  # waits (backed off), instead of burning tries
    assert await count(runtime, DeliveryAttempt) == 0
    assert transactions(ehr) == []  # nothing was sent to the FHIR server
    assert [t.status for t in ehr.token_requests] == [401]
    assert await worker.run_once() == 0
    assert len(ehr.token_requests) == 1


async def test_one_patients_deliveries_go_in_order(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: LocalEhr,
    worker: DeliveryWorker,
) -> None:
    body = samples.intake()
    first = await intake(client, admin_headers, body)
    r = await client.post(
        "/v1/checkouts",
        json=samples.canonical_checkout(
            patient_external_id=body["patient"]["external_id"],
            intake_submission_id=body["submission_id"],
        ),
        headers=admin_headers,
    )
    second = r.json()
    assert second["patient"] == first["patient"]
    ehr.fail_fhir(1, 503)  # the first delivery fails once
    assert await worker.run_once() == 1  # the second waits behind the first, though due
    d1 = await delivery(runtime, first["deliveries"][0]["id"])
    d2 = await delivery(runtime, second["deliveries"][0]["id"])
    assert (d1.status, d1.attempts) == ("pending", 1)
    assert (d2.status, d2.attempts) == ("pending", 0)

    await drain(runtime, worker)
    d1 = await delivery(runtime, d1.id)
    d2 = await delivery(runtime, d2.id)
    assert d1.status == d2.status == "delivered"
    assert d1.delivered_at is not None and d2.delivered_at is not None
    assert d1.delivered_at < d2.delivered_at
    assert transactions(ehr) == [503, 200, 200]
    assert ehr.count("Patient") == 1
    # the MedicationRequest went second, so it points at the EHR's QuestionnaireResponse
    (mr,) = ehr.resources("MedicationRequest")
    (qr,) = ehr.resources("QuestionnaireResponse")
    (patient,) = ehr.resources("Patient")
    assert mr["supportingInformation"] == [{"reference": f"QuestionnaireResponse/{qr['id']}"}]
    assert mr["subject"] == {"reference": f"Patient/{patient['id']}"}


async def test_a_failing_patient_does_not_hold_back_another(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: LocalEhr,
    worker: DeliveryWorker,
) -> None:
    # a 500 fails this delivery only; its Retry-After sets this row's retry time (a 429 or
    # 503 with Retry-After would pause the whole target: the EHR asking everyone to wait)
    ehr.fail_fhir(1, 500, retry_after=60)
    stuck = await intake(client, admin_headers)
    assert await worker.run_once() == 1
    other = await intake(client, admin_headers)
    assert await worker.run_once() == 1
    assert (await delivery(runtime, other["deliveries"][0]["id"])).status == "delivered"
    assert (await delivery(runtime, stuck["deliveries"][0]["id"])).status == "pending"


async def test_the_token_is_reused_and_fetched_again_once_after_a_401(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: LocalEhr,
    worker: DeliveryWorker,
) -> None:
    await intake(client, admin_headers)
    await intake(client, admin_headers)
    await drain(runtime, worker)
    assert [t.status for t in ehr.token_requests] == [200]  # cached across deliveries

    ehr.revoke_all_tokens()  # the FHIR server now answers 401 to the cached token
    out = await intake(client, admin_headers)
    await drain(runtime, worker)
    row = await delivery(runtime, out["deliveries"][0]["id"])
    assert (row.status, row.attempts) == ("delivered", 1)
    assert [t.status for t in ehr.token_requests] == [200, 200]
    assert transactions(ehr)[-2:] == [401, 200]


async def test_a_corrected_intake_updates_the_ehrs_questionnaire_response(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: LocalEhr,
    worker: DeliveryWorker,
) -> None:
    body = samples.intake()
    await intake(client, admin_headers, body)
    await drain(runtime, worker)
    (before,) = ehr.resources("QuestionnaireResponse")
    corrected = {**body, "answers": {**body["answers"], "weight_lb": 205}}
    out = await intake(client, admin_headers, corrected)
    assert out["status"] == "amended"
    await drain(runtime, worker)
    (after,) = ehr.resources("QuestionnaireResponse")  # updated, not a second one
    assert after["id"] == before["id"]
    assert after["status"] == "amended"
    assert after["meta"]["versionId"] != before["meta"]["versionId"]
    weight = next(i for i in after["item"] if i["linkId"] == "body-weight")
    assert weight["answer"][0]["valueQuantity"]["value"] == 205
    assert ehr.count("Patient") == 1
