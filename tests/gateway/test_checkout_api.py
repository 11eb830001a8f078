"""POST /v1/checkouts: the canonical checkout, unpaid checkouts, and matching the
checkout's patient to the intake's (one canonical Patient whichever arrives first)."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.db.models import Case, ExceptionRecord, FhirResource, InboundMessage
from gateway.runtime import Runtime
from tests import samples
from tests.support.api import EXTERNAL_ID_SYSTEM, count, rows


async def post_intake(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> dict[str, Any]:
    r = await client.post("/v1/intake-submissions", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


async def post_checkout(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> dict[str, Any]:
    r = await client.post("/v1/checkouts", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


async def fhir(client: httpx.AsyncClient, headers: dict[str, str], ref: str) -> dict[str, Any]:
    r = await client.get(f"/fhir/{ref}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def ref_of(out: dict[str, Any], resource_type: str) -> str:
    return next(r["reference"] for r in out["resources"] if r["resourceType"] == resource_type)


async def patients(runtime: Runtime) -> int:
    return await count(runtime, FhirResource, FhirResource.resource_type == "Patient")


async def test_a_paid_checkout_creates_patient_medication_request_and_provenance(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    out = await post_checkout(client, admin_headers, samples.canonical_checkout())
    assert out["status"] == "accepted"
    assert sorted(r["resourceType"] for r in out["resources"]) == [
        "MedicationRequest",
        "Patient",
        "Provenance",
    ]
    assert out["case"]["state"] == "paid"
    mr = await fhir(client, admin_headers, ref_of(out, "MedicationRequest"))
    assert (mr["status"], mr["intent"]) == ("draft", "proposal")
    assert mr["subject"]["reference"] == out["patient"]["reference"]
    assert mr["medicationCodeableConcept"]["coding"][0]["code"] == "1991306"


async def test_the_same_checkout_again_creates_nothing_new(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    body = samples.canonical_checkout()
    first = await post_checkout(client, admin_headers, body)
    before = await count(runtime, FhirResource)
    again = await post_checkout(client, admin_headers, body)
    assert again["replayed"] is True
    assert again["resources"] == first["resources"]
    assert await count(runtime, FhirResource) == before


async def test_an_unknown_plan_is_422_and_kept_for_review(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    r = await client.post(
        "/v1/checkouts",
        json=samples.canonical_checkout(plan="glp1-platinum"),
        headers=admin_headers,
    )
    assert r.status_code == 422
    assert [(e["field"], e["code"]) for e in r.json()["errors"]] == [("plan", "unknown_plan")]
    assert await count(runtime, FhirResource) == 0
    assert await count(runtime, InboundMessage) == 0
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.channel) == ("rejected_input", "checkout")


async def test_an_unpaid_checkout_waits_for_payment_without_resources(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    out = await post_checkout(
        client, admin_headers, samples.canonical_checkout(payment_status="unpaid")
    )
    assert out["status"] == "awaiting_payment"
    assert "resources" not in out
    assert await count(runtime, FhirResource) == 0
    assert await count(runtime, Case) == 0
    (message,) = await rows(runtime, InboundMessage)
    assert message.status == "ignored"


async def test_checkout_matches_the_intake_patient_by_external_id(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    intake = samples.intake()
    created = await post_intake(client, admin_headers, intake)
    checkout = samples.canonical_checkout(patient_external_id=intake["patient"]["external_id"])
    out = await post_checkout(client, admin_headers, checkout)  # a different email
    assert out["patient"] == created["patient"]
    assert await patients(runtime) == 1
    mr = await fhir(client, admin_headers, ref_of(out, "MedicationRequest"))
    assert mr["subject"]["reference"] == created["patient"]["reference"]


async def test_checkout_matches_the_intake_patient_by_submission_id(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    intake = samples.intake()
    created = await post_intake(client, admin_headers, intake)
    checkout = samples.canonical_checkout(intake_submission_id=intake["submission_id"])
    out = await post_checkout(client, admin_headers, checkout)
    assert out["patient"] == created["patient"]
    assert await patients(runtime) == 1
    mr = await fhir(client, admin_headers, ref_of(out, "MedicationRequest"))
    assert mr["supportingInformation"] == [{"reference": ref_of(created, "QuestionnaireResponse")}]


async def test_checkout_matches_the_intake_patient_by_normalized_email(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    intake = samples.intake()
    intake["patient"]["email"] = " Sam.Lee+gw@Example.com"
    created = await post_intake(client, admin_headers, intake)
    checkout = samples.canonical_checkout()
    checkout["customer"]["email"] = "SAM.LEE+GW@example.COM  "
    out = await post_checkout(client, admin_headers, checkout)
    assert out["patient"] == created["patient"]
    assert await patients(runtime) == 1
    patient = await fhir(client, admin_headers, created["patient"]["reference"])
    assert [t["value"] for t in patient["telecom"] if t["system"] == "email"] == [
        "sam.lee+gw@example.com"
    ]


async def test_checkout_with_unrelated_keys_is_another_patient(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    created = await post_intake(client, admin_headers, samples.intake())
    out = await post_checkout(client, admin_headers, samples.canonical_checkout())
    assert out["patient"] != created["patient"]
    assert await patients(runtime) == 2


async def test_checkout_first_then_intake_is_one_patient_with_intake_demographics(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    intake = samples.intake()
    checkout = samples.canonical_checkout(patient_external_id=intake["patient"]["external_id"])
    checkout["customer"]["name"] = "J. Rivera-Smith"
    paid = await post_checkout(client, admin_headers, checkout)
    assert paid["case"]["state"] == "paid"
    created = await post_intake(client, admin_headers, intake)
    assert created["patient"] == paid["patient"]
    assert await patients(runtime) == 1
    patient = await fhir(client, admin_headers, created["patient"]["reference"])
    assert patient["name"] == [{"use": "official", "family": "Rivera", "given": ["Jordan"]}]
    assert (patient["gender"], patient["birthDate"]) == ("female", "1988-04-12")
    assert patient["address"][0]["use"] == "home"
    assert {"system": EXTERNAL_ID_SYSTEM, "value": intake["patient"]["external_id"]} in patient[
        "identifier"
    ]
    # one case, moved on by the intake
    assert created["case"] == {"id": paid["case"]["id"], "state": "awaiting_review"}
    assert await count(runtime, Case) == 1


async def test_a_checkout_with_a_foreign_billing_address_is_accepted(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    checkout = samples.canonical_checkout()
    checkout["customer"]["address"] = {
        "line1": "290 Bremner Blvd",
        "city": "Toronto",
        "state": "ON",
        "postal_code": "M5V 3L9",
        "country": "CA",
    }
    out = await post_checkout(client, admin_headers, checkout)
    patient = await fhir(client, admin_headers, out["patient"]["reference"])
    assert patient["address"][0] == {
        "use": "billing",
        "type": "both",
        "line": ["290 Bremner Blvd"],
        "city": "Toronto",
        "state": "ON",
        "postalCode": "M5V 3L9",
        "country": "CA",
    }
