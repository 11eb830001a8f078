"""Ops subscribers: registration, and signed state-change webhooks through the outbox
(retries with backoff, dead letters, order per case) to a real local subscriber that
verifies them with the standardwebhooks library."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.clock import FastForwardClock
from gateway.db.models import Delivery, DeliveryAttempt
from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from tests.conftest import ApiKeyFactory
from tests.support.delivery import drain
from tests.support.events_env import Subscriber, new_patient, run_subscriber, send_event

FAST = {"base_delay_s": 0.01, "max_delay_s": 0.02, "max_attempts": 4, "max_age_s": 60}


@pytest.fixture
async def subscriber() -> AsyncIterator[tuple[Subscriber, str]]:
    sub = Subscriber(secret="")
    async with run_subscriber(sub) as url:
        yield sub, url


async def _register(
    client: httpx.AsyncClient, headers: dict[str, str], sub: Subscriber, url: str, **extra: Any
) -> dict[str, Any]:
    body = {"name": "crm", "url": url, "event_types": ["case.*"], "retry": FAST, **extra}
    r = await client.post("/v1/ops/subscribers", json=body, headers=headers)
    assert r.status_code == 201, r.text
    sub.secret = r.json()["secret"]
    return dict(r.json())


async def _deliveries(runtime: Runtime) -> list[Delivery]:
    async with runtime.sessionmaker() as session:
        return list(
            (
                await session.scalars(
                    select(Delivery).where(Delivery.kind == "webhook").order_by(Delivery.id)
                )
            ).all()
        )


async def test_register_list_and_deactivate(
    client: httpx.AsyncClient, admin_headers: dict[str, str], make_api_key: ApiKeyFactory
) -> None:
    r = await client.post(
        "/v1/ops/subscribers",
        json={
            "name": "portal",
            "url": "https://portal.example.com/hooks",
            "event_types": ["case.state_changed"],
        },
        headers=admin_headers,
    )
    assert r.status_code == 201
    created = r.json()
    assert created["secret"].startswith("whsec_")
    listed = (await client.get("/v1/ops/subscribers", headers=admin_headers)).json()
    assert [s["name"] for s in listed] == ["portal"] and "secret" not in listed[0]
    dup = await client.post(
        "/v1/ops/subscribers",
        json={"name": "portal", "url": "https://x.example.com", "event_types": ["*"]},
        headers=admin_headers,
    )
    assert dup.status_code == 409
    reader = {"Authorization": f"Bearer {await make_api_key('ops:read')}"}
    assert (await client.get("/v1/ops/subscribers", headers=reader)).status_code == 200
    assert (
        await client.delete(f"/v1/ops/subscribers/{created['id']}", headers=reader)
    ).status_code == 403
    assert (
        await client.delete(f"/v1/ops/subscribers/{created['id']}", headers=admin_headers)
    ).status_code == 204
    assert (await client.get("/v1/ops/subscribers", headers=admin_headers)).json()[0][
        "active"
    ] is False


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event_types": ["case.exploded"]}, "body.event_types"),
        ({"event_types": []}, "body.event_types"),
        ({"url": "ftp://files.example.com"}, "body.url"),
        ({"secret": "whsec_c2hvcnQ="}, "body.secret"),
        ({"secret": "plain-password-123"}, "body.secret"),
    ],
)
async def test_invalid_subscribers_are_refused_without_echo(
    client: httpx.AsyncClient, admin_headers: dict[str, str], change: dict[str, Any], field: str
) -> None:
    body = {"name": "crm", "url": "https://crm.example.com/hooks", "event_types": ["*"], **change}
    r = await client.post("/v1/ops/subscribers", json=body, headers=admin_headers)
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["errors"]] == [field]
    assert "plain-password-123" not in r.text


async def test_state_changes_are_signed_retried_and_sent_in_order(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    subscriber: tuple[Subscriber, str],
) -> None:
    sub, url = subscriber
    await _register(client, admin_headers, sub, url, event_types=["case.state_changed"])
    patient = await new_patient(client, admin_headers)  # case.opened: not asked for
    await send_event(
        client,
        admin_headers,
        patient,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
    )
    await send_event(
        client, admin_headers, patient, "provider_assigned", occurred_at="2026-11-24T10:00:00Z"
    )
    sub.fail_next = 2  # the first change fails twice: the second must wait behind it
    worker = delivery_worker(runtime, clock=FastForwardClock())
    try:
        await drain(runtime, worker)
    finally:
        await worker.aclose()
    assert sub.rejected == 0
    assert [
        (r.payload["data"]["from_state"], r.payload["data"]["to_state"]) for r in sub.received
    ] == [
        ("intake_received", "awaiting_review"),
        ("awaiting_review", "in_review"),
    ]
    first, second = sub.received
    assert first.payload["type"] == "case.state_changed"
    assert first.payload["data"]["case_id"] == patient.case_id
    assert first.payload["data"]["event"]["type"] == "payment_completed"
    assert first.headers["webhook-id"] == first.payload["id"]
    assert first.payload["data"]["sequence"] < second.payload["data"]["sequence"]
    assert sub.attempts == 4
    rows = await _deliveries(runtime)
    assert [(d.status, d.attempts) for d in rows] == [("delivered", 3), ("delivered", 1)]
    async with runtime.sessionmaker() as session:
        attempts = (
            await session.scalars(
                select(DeliveryAttempt.outcome).where(DeliveryAttempt.delivery_id == rows[0].id)
            )
        ).all()
    assert attempts == ["transient", "transient", "delivered"]


async def test_a_refusing_subscriber_dead_letters_without_blocking_the_case(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    subscriber: tuple[Subscriber, str],
) -> None:
    sub, url = subscriber
    await _register(client, admin_headers, sub, url)
    await new_patient(client, admin_headers)  # case.opened
    sub.fail_next, sub.fail_status = 1, 410
    worker = delivery_worker(runtime, clock=FastForwardClock())
    try:
        await drain(runtime, worker)
    finally:
        await worker.aclose()
    [row] = await _deliveries(runtime)
    assert (row.status, row.dead_reason, row.last_status_code) == ("dead", "rejected", 410)


async def test_webhooks_of_a_deactivated_subscriber_are_dead_lettered(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    subscriber: tuple[Subscriber, str],
) -> None:
    sub, url = subscriber
    created = await _register(client, admin_headers, sub, url)
    await new_patient(client, admin_headers)
    await client.delete(f"/v1/ops/subscribers/{created['id']}", headers=admin_headers)
    worker = delivery_worker(runtime, clock=FastForwardClock())
    try:
        await drain(runtime, worker)
    finally:
        await worker.aclose()
    assert sub.attempts == 0
    assert [(d.status, d.dead_reason) for d in await _deliveries(runtime)] == [
        ("dead", "subscriber_inactive")
    ]


async def test_a_subscriber_added_while_the_targets_are_cached_waits_then_is_served(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    subscriber: tuple[Subscriber, str],
) -> None:
    """The worker reuses its list of targets for up to a second between claim rounds: a
    subscriber registered meanwhile is not claimed from until the list is read again
    (``wake()``, or the second passes); its rows wait, pending, and are then delivered."""
    import asyncio

    sub, url = subscriber
    worker = delivery_worker(runtime, clock=FastForwardClock())
    try:
        assert await worker._claim_round(worker._free_slots()) == 0  # caches the targets
        await _register(client, admin_headers, sub, url)
        await new_patient(client, admin_headers)  # case.opened
        assert await worker._claim_round(worker._free_slots()) == 0  # cached: not seen yet
        assert [d.status for d in await _deliveries(runtime)] == ["pending"]
        worker.wake()
        assert await worker._claim_round(worker._free_slots()) == 1
        await asyncio.gather(*worker._running.values())
    finally:
        await worker.aclose()
    assert [d.status for d in await _deliveries(runtime)] == ["delivered"]
    assert len(sub.received) == 1


async def test_active_subscribers_are_read_once_per_transaction(runtime: Runtime) -> None:
    """A transaction that changes many cases (an import's batch, a worker's batch of
    events) reads the subscribers once; the next transaction reads them again and sees
    one added meanwhile. The secret is not read (nor decrypted) for it."""
    from sqlalchemy import event

    from gateway.db.models import Subscriber as SubscriberRow
    from gateway.db.types import utcnow
    from gateway.subscribers.service import active_subscribers

    def add(name: str) -> SubscriberRow:
        return SubscriberRow(
            name=name,
            url=f"https://{name}.example.com/hooks",
            secret="whsec_" + "A" * 44,
            event_types=["case.*"],
            active=True,
            created_at=utcnow(),
        )

    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM subscribers" in statement:
            seen.append(statement)

    async with runtime.sessionmaker() as session:
        session.add(add("crm"))
        await session.commit()
    event.listen(runtime.engine.sync_engine, "before_cursor_execute", count)
    try:
        async with runtime.sessionmaker() as session:
            first = await active_subscribers(session)
            async with session.begin_nested():
                again = await active_subscribers(session)
            assert [s.name for s in first] == [s.name for s in again] == ["crm"]
            assert len(seen) == 1 and "secret" not in seen[0]
            await session.commit()
            async with runtime.sessionmaker() as other:
                other.add(add("portal"))
                await other.commit()
            assert [s.name for s in await active_subscribers(session)] == ["crm", "portal"]
            assert len(seen) == 2
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", count)
