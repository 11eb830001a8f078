"""Idempotency under concurrency: the same message several times at once, and an intake
and a checkout of one patient at once, give one set of resources and one Patient."""

from __future__ import annotations

import asyncio
import json

import httpx

from gateway.db.models import Case, FhirResource, InboundMessage
from gateway.runtime import Runtime
from tests import samples
from tests.support.api import count, signed_stripe


async def of_type(runtime: Runtime, resource_type: str) -> int:
    return await count(runtime, FhirResource, FhirResource.resource_type == resource_type)


async def test_the_same_intake_five_times_at_once_is_stored_once(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    raw = json.dumps(samples.intake())
    headers = {**admin_headers, "Content-Type": "application/json"}
    answers = await asyncio.gather(
        *(client.post("/v1/intake-submissions", content=raw, headers=headers) for _ in range(5))
    )
    assert [r.status_code for r in answers] == [202] * 5, [r.text for r in answers]
    assert len({r.json()["message_id"] for r in answers}) == 1
    assert await of_type(runtime, "Patient") == 1
    assert await of_type(runtime, "QuestionnaireResponse") == 1
    assert await count(runtime, Case) == 1


async def test_the_same_stripe_event_five_times_at_once_gives_one_medication_request(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    payload, headers = signed_stripe(samples.stripe_event())
    answers = await asyncio.gather(
        *(client.post("/v1/webhooks/stripe", content=payload, headers=headers) for _ in range(5))
    )
    assert [r.status_code for r in answers] == [200] * 5, [r.text for r in answers]
    assert await of_type(runtime, "MedicationRequest") == 1
    assert await of_type(runtime, "Patient") == 1
    assert await count(runtime, InboundMessage) == 1


async def test_an_intake_and_a_checkout_of_one_patient_at_once_give_one_patient(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    intake = samples.intake()
    checkout = samples.canonical_checkout(patient_external_id=intake["patient"]["external_id"])
    a, b = await asyncio.gather(
        client.post("/v1/intake-submissions", json=intake, headers=admin_headers),
        client.post("/v1/checkouts", json=checkout, headers=admin_headers),
    )
    assert (a.status_code, b.status_code) == (202, 202), (a.text, b.text)
    assert a.json()["patient"] == b.json()["patient"]
    assert await of_type(runtime, "Patient") == 1
    assert await count(runtime, Case) == 1


async def test_the_same_event_five_times_at_once_is_one_message(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    body = {
        "event_id": "e-1",
        "source": "ehr",
        "type": "provider_assigned",
        "occurred_at": "2026-11-24T10:00:00Z",
        "patient": {"system": "urn:example:mrn", "value": "123"},
    }
    answers = await asyncio.gather(
        *(client.post("/v1/events", json=body, headers=admin_headers) for _ in range(5))
    )
    assert [r.status_code for r in answers] == [202] * 5, [r.text for r in answers]
    assert len({r.json()["message_id"] for r in answers}) == 1
    assert await count(runtime, InboundMessage) == 1


def _without_replayed(body: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in body.items() if k != "replayed"}


async def test_concurrent_twins_all_get_the_stored_answer(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """The inbox row is claimed first (``INSERT ... ON CONFLICT DO NOTHING``): the twins
    wait for the winner's transaction at that insert (PostgreSQL; SQLite writers take
    turns), write nothing, and answer with the winner's stored answer (same resources, same deliveries, same case), for intakes and
    Stripe events alike."""
    raw = json.dumps(samples.intake())
    headers = {**admin_headers, "Content-Type": "application/json"}
    payload, stripe_headers = signed_stripe(samples.stripe_event())
    answers = await asyncio.gather(
        *(client.post("/v1/intake-submissions", content=raw, headers=headers) for _ in range(3)),
        *(
            client.post("/v1/webhooks/stripe", content=payload, headers=stripe_headers)
            for _ in range(3)
        ),
    )
    assert [r.status_code for r in answers] == [202] * 3 + [200] * 3, [r.text for r in answers]
    intakes, stripes = answers[:3], answers[3:]
    for group in (intakes, stripes):
        bodies = [_without_replayed(r.json()) for r in group]
        assert all(body == bodies[0] for body in bodies), bodies
        assert sum(1 for r in group if not r.json().get("replayed")) == 1
    assert await count(runtime, InboundMessage) == 2
    assert await of_type(runtime, "QuestionnaireResponse") == 1
    assert await of_type(runtime, "MedicationRequest") == 1


async def test_a_database_failure_after_the_resources_leaves_nothing_written(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """The database refuses the case (written after the resources, before the inbox
    row): the request fails, and none of what it wrote stays; sent again once the
    database accepts it, the submission is stored whole, once (PostgreSQL: a trigger)."""
    if runtime.engine.dialect.name != "postgresql":
        return
    from sqlalchemy import text

    from gateway.db.models import Delivery, PatientKey

    async with runtime.engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'refused by test'; END $$ LANGUAGE plpgsql"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER refuse BEFORE INSERT ON cases FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        )
    raw = json.dumps(samples.intake())
    headers = {**admin_headers, "Content-Type": "application/json"}
    failed = False
    try:
        r = await client.post("/v1/intake-submissions", content=raw, headers=headers)
        failed = r.status_code >= 500
    except Exception:  # the in-process transport raises what the app did not handle
        failed = True
    assert failed
    for model in (FhirResource, InboundMessage, PatientKey, Delivery):
        assert await count(runtime, model) == 0, model.__name__
    async with runtime.engine.begin() as conn:
        await conn.execute(text("DROP TRIGGER refuse ON cases"))
    r = await client.post("/v1/intake-submissions", content=raw, headers=headers)
    assert r.status_code == 202, r.text
    assert await of_type(runtime, "Patient") == 1
    assert await count(runtime, Case) == 1
    assert await count(runtime, InboundMessage) == 1
