"""POST /v1/webhooks/stripe: signature checks, event types, retries of one event,
asynchronous payments and events that do not map."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import create_app
from gateway.cli import stripe_signature_header
from gateway.db.models import Case, ExceptionRecord, FhirResource, InboundMessage
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests import samples
from tests.support.api import STRIPE_SECRET, count, rows, signed_stripe, table_counts


def medication_requests(runtime: Runtime) -> object:
    return count(runtime, FhirResource, FhirResource.resource_type == "MedicationRequest")


async def test_a_signed_checkout_event_is_mapped(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    event = samples.stripe_event()
    payload, headers = signed_stripe(event)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["received"], out["event_type"], out["status"]) == (
        True,
        "checkout.session.completed",
        "accepted",
    )
    assert out["checkout_id"] == event["data"]["object"]["id"]  # type: ignore[index]
    assert sorted(x["resourceType"] for x in out["resources"]) == [
        "MedicationRequest",
        "Patient",
        "Provenance",
    ]
    (message,) = await rows(runtime, InboundMessage)
    assert (message.channel, message.external_id, message.status) == (
        "stripe",
        event["id"],
        "processed",
    )
    assert message.body == payload
    patient = (
        await client.get(f"/fhir/{out['patient']['reference']}", headers=admin_headers)
    ).json()
    assert {
        "system": "https://fhir-gateway.example.org/sid/stripe-customer",
        "value": "cus_QExampleCustomer1",
    } in patient["identifier"]


@pytest.mark.parametrize(
    "signature",
    [
        "t={t},v1=" + "0" * 64,
        "t={t}",
        "v1=abc",
        "garbage",
    ],
    ids=["wrong-digest", "no-v1", "no-timestamp", "garbage"],
)
async def test_a_bad_signature_is_400_and_nothing_is_stored(
    client: httpx.AsyncClient, runtime: Runtime, signature: str
) -> None:
    payload, headers = signed_stripe(samples.stripe_event())
    headers["Stripe-Signature"] = signature.format(t=int(time.time()))
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["code"] == "invalid_signature"
    counts = await table_counts(runtime)
    assert all(n == 0 for name, n in counts.items() if name != "api_clients"), counts


async def test_a_body_changed_after_signing_is_400(client: httpx.AsyncClient) -> None:
    payload, headers = signed_stripe(samples.stripe_event())
    tampered = payload.replace(b'"amount_total": 29900', b'"amount_total": 100')
    assert tampered != payload
    r = await client.post("/v1/webhooks/stripe", content=tampered, headers=headers)
    assert r.status_code == 400


async def test_a_signature_with_another_secret_is_400(client: httpx.AsyncClient) -> None:
    payload, headers = signed_stripe(samples.stripe_event(), secret="whsec_someone_else")
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 400


async def test_a_timestamp_older_than_300_seconds_is_400(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    payload, headers = signed_stripe(samples.stripe_event(), timestamp=int(time.time()) - 301)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 400
    assert r.json()["errors"][0]["code"] == "invalid_signature"
    assert await count(runtime, InboundMessage) == 0


async def test_a_timestamp_within_300_seconds_is_accepted(client: httpx.AsyncClient) -> None:
    payload, headers = signed_stripe(samples.stripe_event(), timestamp=int(time.time()) - 290)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200, r.text


async def test_a_timestamp_a_day_in_the_future_is_400(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    """The issue's finding: Stripe's library checks only the past; the tolerance holds in
    both directions."""
    payload, headers = signed_stripe(samples.stripe_event(), timestamp=int(time.time()) + 86_400)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 400
    assert r.json()["errors"][0]["code"] == "invalid_signature"
    assert await count(runtime, InboundMessage) == 0


async def test_a_timestamp_ahead_by_less_than_the_tolerance_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    """A sender's clock a little ahead of ours is within the window."""
    payload, headers = signed_stripe(samples.stripe_event(), timestamp=int(time.time()) + 290)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200, r.text


async def test_a_missing_signature_header_is_400(client: httpx.AsyncClient) -> None:
    payload, headers = signed_stripe(samples.stripe_event())
    del headers["Stripe-Signature"]
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 400
    assert r.json()["errors"] == [
        {
            "field": "Stripe-Signature",
            "header": "Stripe-Signature",
            "code": "missing_signature",
            "detail": "the Stripe-Signature header is required",
        }
    ]


@pytest.fixture
async def unconfigured_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app on the test database without GATEWAY_STRIPE_WEBHOOK_SECRET."""
    unconfigured = settings.model_copy(update={"stripe_webhook_secret": None})
    runtime = Runtime.create(unconfigured)
    app = create_app(unconfigured, runtime=runtime)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw.test"
            ) as http,
        ):
            yield http
    finally:
        await runtime.close()


async def test_without_a_configured_secret_the_webhook_is_503(
    unconfigured_client: httpx.AsyncClient, runtime: Runtime
) -> None:
    payload, headers = signed_stripe(samples.stripe_event())
    r = await unconfigured_client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "GATEWAY_STRIPE_WEBHOOK_SECRET" in r.json()["detail"]
    assert await count(runtime, InboundMessage) == 0


async def test_other_event_types_are_acknowledged_and_recorded_as_ignored(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    event = samples.stripe_event()
    event["type"] = "payment_intent.created"
    payload, headers = signed_stripe(event)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200
    assert r.json()["status"] == "ignored"
    assert r.json()["event_type"] == "payment_intent.created"
    (message,) = await rows(runtime, InboundMessage)
    assert (message.status, message.external_id) == ("ignored", event["id"])
    assert await count(runtime, FhirResource) == 0


async def test_the_same_event_five_times_gives_one_medication_request(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    payload, headers = signed_stripe(samples.stripe_event())
    answers = []
    for _ in range(5):
        r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert [a.get("replayed", False) for a in answers] == [False, True, True, True, True]
    assert {a["message_id"] for a in answers} == {answers[0]["message_id"]}
    assert await medication_requests(runtime) == 1
    assert await count(runtime, FhirResource, FhirResource.resource_type == "Patient") == 1
    assert await count(runtime, InboundMessage) == 1


async def test_resources_come_only_with_the_asynchronous_payment(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    completed = samples.stripe_event(payment_status="unpaid")
    payload, headers = signed_stripe(completed)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200
    assert r.json()["status"] == "awaiting_payment"
    assert await count(runtime, FhirResource) == 0
    assert await count(runtime, Case) == 0

    succeeded = json.loads(json.dumps(completed))
    succeeded["id"] = completed["id"] + "_paid"
    succeeded["type"] = "checkout.session.async_payment_succeeded"
    succeeded["data"]["object"]["payment_status"] = "paid"
    payload, headers = signed_stripe(succeeded)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200
    assert r.json()["status"] == "accepted"
    assert await medication_requests(runtime) == 1
    mr = (await rows(runtime, FhirResource, FhirResource.resource_type == "MedicationRequest"))[0]
    assert mr.resource["identifier"][0]["value"] == completed["data"]["object"]["id"]  # type: ignore[index]
    (case,) = await rows(runtime, Case)
    assert case.state == "paid"


async def test_an_event_that_does_not_map_is_acknowledged_and_kept_whole(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    event = samples.stripe_event()
    event["data"]["object"]["metadata"]["plan"] = "glp1-platinum"  # type: ignore[index]
    payload, headers = signed_stripe(event)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed"
    assert await count(runtime, FhirResource) == 0
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.channel) == ("unmappable_input", "stripe")
    assert record.payload == payload
    assert record.problems == [
        {"location": "plan", "code": "unknown_plan", "message": "no checkout profile has this plan"}
    ]
    (message,) = await rows(runtime, InboundMessage)
    assert message.status == "failed"
    assert record.inbound_message_id == message.id
    # Stripe retries it: still one message, one exception
    again = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert again.status_code == 200
    assert await count(runtime, ExceptionRecord) == 1


@pytest.mark.parametrize(
    "raw", [b"[1, 2]", b'"an event"', b"null"], ids=["array", "string", "null"]
)
async def test_a_signed_body_that_is_not_an_event_object_is_refused_and_kept(
    client: httpx.AsyncClient, runtime: Runtime, raw: bytes
) -> None:
    headers = {
        "Stripe-Signature": stripe_signature_header(STRIPE_SECRET, raw),
        "Content-Type": "application/json",
    }
    r = await client.post("/v1/webhooks/stripe", content=raw, headers=headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.channel, record.payload) == ("rejected_input", "stripe", raw)
    assert await count(runtime, InboundMessage) == 0


async def test_a_signed_body_that_is_not_json_is_400(client: httpx.AsyncClient) -> None:
    raw = b'{"id": "evt_1", "type": '
    headers = {
        "Stripe-Signature": stripe_signature_header(STRIPE_SECRET, raw),
        "Content-Type": "application/json",
    }
    r = await client.post("/v1/webhooks/stripe", content=raw, headers=headers)
    assert r.status_code == 400
    assert r.json()["errors"][0]["code"] == "invalid_json"


async def test_a_signed_checkout_event_with_a_malformed_session_is_kept_for_review(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    event = samples.stripe_event()
    event["data"] = "not a session"
    payload, headers = signed_stripe(event)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed"
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.payload) == ("unmappable_input", payload)
    assert {p["location"] for p in record.problems} >= {"checkout_id", "plan"}


def _v1(payload: bytes, t: int, secret: str = STRIPE_SECRET) -> str:
    return stripe_signature_header(secret, payload, timestamp=t).split(",", 1)[1]


@pytest.mark.parametrize(
    "header",
    [
        "t={t},v1={old},v1={good}",
        "t={t},v1={good},v1={old}",
        "t={t},v1={good},v0={zeros}",
        "t={t},v0={zeros},v1={good}",
    ],
    ids=["rotation-old-first", "rotation-new-first", "v0-after", "v0-before"],
)
async def test_signature_headers_stripe_sends_during_secret_rotation_verify(
    client: httpx.AsyncClient, header: str
) -> None:
    """While an endpoint secret is rolled, Stripe signs with both secrets (two ``v1=``);
    test-mode events may carry a ``v0=`` too. One matching ``v1`` is enough."""
    payload = json.dumps(samples.stripe_event()).encode()
    t = int(time.time())
    value = header.format(
        t=t,
        good=_v1(payload, t).removeprefix("v1="),
        old=_v1(payload, t, secret="whsec_previous_secret").removeprefix("v1="),
        zeros="0" * 64,
    )
    r = await client.post(
        "/v1/webhooks/stripe",
        content=payload,
        headers={"Stripe-Signature": value, "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "accepted"


@pytest.mark.parametrize(
    "encode",
    [
        lambda e: b"\xef\xbb\xbf" + json.dumps(e).encode(),
        lambda e: json.dumps(e, indent=2, ensure_ascii=False).encode(),
        lambda e: json.dumps(e, separators=(",", ":")).encode() + b"\n",
    ],
    ids=["utf8-bom", "pretty-printed", "compact-with-newline"],
)
async def test_the_signature_is_over_the_raw_bytes_whatever_their_layout(
    client: httpx.AsyncClient, runtime: Runtime, encode: object
) -> None:
    event = samples.stripe_event()
    event["data"]["object"]["customer_details"]["name"] = "Zo\u00eb O\u2019Connor-D\u00edaz"  # type: ignore[index]
    payload = encode(event)  # type: ignore[operator]
    r = await client.post(
        "/v1/webhooks/stripe",
        content=payload,
        headers={
            "Stripe-Signature": stripe_signature_header(STRIPE_SECRET, payload),
            "Content-Type": "application/json",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "accepted"
    (message,) = await rows(runtime, InboundMessage)
    assert message.body == payload  # kept byte for byte


@pytest.mark.parametrize(
    "event_type",
    ["invoice.paid", "customer.created", "checkout.session.expired", "charge.refunded"],
)
async def test_events_of_other_types_are_2xx_so_stripe_stops_retrying(
    client: httpx.AsyncClient, runtime: Runtime, event_type: str
) -> None:
    event = samples.stripe_event()
    event["type"] = event_type
    payload, headers = signed_stripe(event)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200
    assert r.json()["status"] == "ignored"
    assert await count(runtime, ExceptionRecord) == 0


async def test_a_checkout_that_fails_after_its_patient_was_matched_leaves_nothing_of_it(
    client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mapping runs in a savepoint: when its FHIR does not validate (a profile problem
    the loader did not catch), the patient it registered and its keys go with it; only
    the failed message and its exception stay."""
    from gateway.db.models import PatientKey
    from gateway.ingest import storage
    from mappers.errors import MappingErrors, Problem

    def refuse(resources: object) -> None:
        raise MappingErrors([Problem("MedicationRequest", "invalid_fhir", "refused by test")])

    monkeypatch.setattr(storage, "validate_resources", refuse)
    payload, headers = signed_stripe(samples.stripe_event())
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed"
    assert await count(runtime, PatientKey) == 0
    assert await count(runtime, FhirResource) == 0
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.problems[0]["code"]) == ("unmappable_input", "invalid_fhir")
    (message,) = await rows(runtime, InboundMessage)
    assert (message.status, message.id) == ("failed", record.inbound_message_id)


def _setup_mode_event(plan: str) -> dict[str, object]:
    """A Checkout Session in setup mode as Stripe sends it: no amount, no currency."""
    event = samples.stripe_event(
        mode="setup",
        payment_status="no_payment_required",
        amount_total=None,
        amount_subtotal=None,
        currency=None,
        payment_intent=None,
        setup_intent="seti_1QExampleSetupIntent",
    )
    event["data"]["object"]["metadata"]["plan"] = plan  # type: ignore[index]
    return event


@pytest.mark.parametrize(
    ("plan", "types"),
    [
        ("glp1-semaglutide-starter", ["MedicationRequest", "Patient", "Provenance"]),
        ("glp1-semaglutide-maintenance", ["Patient", "Provenance"]),
    ],
)
async def test_a_setup_mode_session_is_accepted_as_a_deferred_payment(
    client: httpx.AsyncClient, runtime: Runtime, plan: str, types: list[str]
) -> None:
    """It used to be answered 'failed' and put in the exceptions queue as "amount_total
    missing, currency missing". Each plan says whether it sends its MedicationRequest; the
    case opens in payment_deferred either way."""
    payload, headers = signed_stripe(_setup_mode_event(plan))
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["status"], out["payment"]) == ("accepted", "deferred")
    assert sorted(x["resourceType"] for x in out["resources"]) == types
    assert out["case"]["state"] == "payment_deferred"
    assert await count(runtime, ExceptionRecord) == 0
    (message,) = await rows(runtime, InboundMessage)
    assert message.status == "processed"


async def test_an_intake_after_a_deferred_payment_moves_the_case_to_review(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    event = _setup_mode_event("glp1-semaglutide-starter")
    payload, headers = signed_stripe(event)
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert r.json()["case"]["state"] == "payment_deferred"
    external_id = event["data"]["object"]["metadata"]["patient_external_id"]  # type: ignore[index]
    intake = samples.intake()
    intake["patient"]["external_id"] = external_id
    r = await client.post("/v1/intake-submissions", json=intake, headers=admin_headers)
    assert r.status_code == 202, r.text
    assert r.json()["case"]["state"] == "awaiting_review"


async def test_a_paid_checkout_says_it_was_paid(client: httpx.AsyncClient) -> None:
    payload, headers = signed_stripe(samples.stripe_event())
    r = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert (r.json()["status"], r.json()["payment"]) == ("accepted", "paid")
    assert r.json()["case"]["state"] == "paid"
