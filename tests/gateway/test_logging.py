"""No PHI in logs: every log line of a full run (intake, a rejected intake, a Stripe
checkout, clinical events, deliveries to a local EHR, one of them rejected with an
OperationOutcome that repeats patient data) is captured, and the synthetic patient's
name, phone (raw and E.164), email, birth date and street never appear in it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.worker import delivery_worker
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests import samples
from tests.support.api import EXTERNAL_ID_SYSTEM, signed_stripe
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV, profiles_with_target

FIRST, LAST = "Zebulon", "Quixotehart"
PHONE_RAW, PHONE_E164 = "(415) 555-2671", "+14155552671"
EMAIL = "zebulon.quixotehart@example.com"
BIRTH_RAW, BIRTH_ISO = "04/12/1988", "1988-04-12"
STREET = "742 Evergreen Terrace"

PHI = [
    FIRST,
    LAST,
    PHONE_RAW,
    "415-555-2671",
    "4155552671",
    PHONE_E164,
    EMAIL,
    BIRTH_RAW,
    BIRTH_ISO,
    STREET,
]


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


def the_patient() -> dict[str, object]:
    body = samples.intake()
    body["patient"].update(
        first_name=FIRST,
        last_name=LAST,
        phone=PHONE_RAW,
        email=EMAIL.upper(),
        birth_date=BIRTH_RAW,
        address={"line1": STREET, "city": "Springfield", "state": "Oregon", "postal_code": "97477"},
    )
    return body


async def full_run(
    client: httpx.AsyncClient, runtime: Runtime, headers: dict[str, str], ehr: LocalEhr
) -> None:
    intake = the_patient()
    r = await client.post("/v1/intake-submissions", json=intake, headers=headers)
    assert r.status_code == 202, r.text

    rejected = the_patient()
    rejected["patient"]["address"]["state"] = "Oregn"  # type: ignore[index]
    rejected["patient"]["phone"] = "415-555-26"  # type: ignore[index]
    r = await client.post("/v1/intake-submissions", json=rejected, headers=headers)
    assert r.status_code == 422

    external_id = intake["patient"]["external_id"]  # type: ignore[index]
    event = samples.stripe_event()
    session = event["data"]["object"]  # type: ignore[index]
    session["customer_details"].update(
        name=f"{FIRST} {LAST}",
        email=EMAIL,
        phone=PHONE_E164,
        address={
            "line1": STREET,
            "city": "Springfield",
            "state": "OR",
            "postal_code": "97477",
            "country": "US",
        },
    )
    session["metadata"] = {
        "plan": "glp1-semaglutide-starter",
        "patient_external_id": external_id,
        "intake_submission_id": intake["submission_id"],
    }
    payload, stripe_headers = signed_stripe(event)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=stripe_headers)
    assert r.status_code == 200, r.text
    bad_signature = {**stripe_headers, "Stripe-Signature": "t=1,v1=00"}
    assert (
        await client.post("/v1/webhooks/stripe", content=payload, headers=bad_signature)
    ).status_code == 400

    # The EHR takes the intake and refuses the MedicationRequest, repeating patient data
    # in its OperationOutcome (EHRs do).
    ehr.reject_when(
        lambda res: res.get("resourceType") == "MedicationRequest",
        422,
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "business-rule",
                    "diagnostics": f"{FIRST} {LAST} ({BIRTH_ISO}, {PHONE_E164}) has no PCP",
                }
            ],
        },
    )
    worker = delivery_worker(runtime)
    try:
        for _ in range(5):
            if await worker.run_once() == 0:
                break
    finally:
        await worker.aclose()
    assert ehr.count("Patient") == 1

    patient = {"system": EXTERNAL_ID_SYSTEM, "value": external_id}
    for i, (etype, detail) in enumerate([("provider_assigned", None), ("decision", "approved")]):
        body = {
            "event_id": f"e-{i}",
            "source": "ehr",
            "type": etype,
            "occurred_at": f"2026-11-24T10:0{i}:00Z",
            "patient": patient,
        }
        if detail:
            body["status"] = detail
        assert (await client.post("/v1/events", json=body, headers=headers)).status_code == 202
    unknown = {
        "event_id": "e-x",
        "source": "ehr",
        "type": "shipped",
        "occurred_at": "2026-11-24T10:05:00Z",
        "patient": {"system": "urn:x", "value": EMAIL},
    }
    assert (await client.post("/v1/events", json=unknown, headers=headers)).status_code == 202
    r = await client.get(
        "/v1/cases", params={"patient": f"{EXTERNAL_ID_SYSTEM}|{external_id}"}, headers=headers
    )
    assert r.json()[0]["state"] == "approved"


async def test_a_full_run_logs_no_phi(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    settings: Settings,
    runtime: Runtime,
    admin_headers: dict[str, str],
    ehr: tuple[LocalEhr, RunningEhr],
) -> None:
    caplog.set_level(logging.DEBUG)
    debug_settings = settings.model_copy(update={"log_level": "debug"})
    # Built here, while capsys captures: structlog writes JSON lines to this sys.stdout.
    gateway = create_app(debug_settings, runtime=runtime, run_worker=False)
    async with (
        gateway.router.lifespan_context(gateway),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://gw.test"
        ) as client,
    ):
        await full_run(client, runtime, admin_headers, ehr[0])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    events = {line["event"] for line in lines}
    # the capture saw the whole run
    assert {
        "ingest.stored",
        "ingest.rejected",
        "stripe.bad_signature",
        "delivery.delivered",
        "delivery.dead_lettered",
        "events.received",
        "events.unmatched_patient",
        "case.event",
    } <= events
    text = "\n".join([captured.out, captured.err, caplog.text]).casefold()
    leaked = [value for value in PHI if value.casefold() in text]
    assert leaked == []


async def test_an_unexpected_error_is_a_500_problem_and_its_message_reaches_no_log(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    settings: Settings,
    runtime: Runtime,
) -> None:
    """An exception's message can hold PHI (a driver error quotes its parameters): the
    gateway logs its type and frames only, and must not hand it on to the server, which
    would log it whole."""
    gateway = create_app(settings, runtime=runtime, run_worker=False)

    async def boom() -> None:
        raise ValueError(f"cannot store {FIRST} {LAST} born {BIRTH_ISO}")

    gateway.add_api_route("/v1/boom", boom, methods=["GET"])
    async with (
        gateway.router.lifespan_context(gateway),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://gw.test"
        ) as client,
    ):
        r = await client.get("/v1/boom")  # raises here if the exception escapes the app
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["detail"] == "an unexpected error occurred; it has been logged"
    captured = capsys.readouterr()
    (failure,) = [json.loads(x) for x in captured.out.splitlines() if '"request.failed"' in x]
    assert (failure["path"], failure["error_type"]) == ("/v1/boom", "ValueError")
    text = "\n".join([captured.out, captured.err, caplog.text, r.text])
    assert FIRST not in text and BIRTH_ISO not in text
