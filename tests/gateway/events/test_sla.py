"""SLA timers: overdue cases are flagged once, listed and announced to subscribers."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from gateway.clock import FastForwardClock
from gateway.db.models import Delivery
from gateway.runtime import Runtime
from tests.support.events_env import case_of, events_profiles, new_patient, send_event
from tests.support.inbox import run_timers


@pytest.fixture
def profiles_dir(tmp_path: Path, secrets_env: None) -> Path:
    return events_profiles(
        tmp_path / "profiles",
        workflow={"sla": [{"name": "quick_intake", "state": "intake_received", "within": "PT1H"}]},
    )


async def test_overdue_cases_are_flagged_listed_and_announced(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    clock = FastForwardClock()
    runtime.clock = clock
    r = await client.post(
        "/v1/ops/subscribers",
        json={
            "name": "ops-queue",
            "url": "http://127.0.0.1:9/hooks",
            "event_types": ["case.overdue"],
        },
        headers=admin_headers,
    )
    assert r.status_code == 201, r.text
    late = await new_patient(client, admin_headers)
    on_time = await new_patient(client, admin_headers)
    await send_event(
        client,
        admin_headers,
        on_time,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
    )
    assert await run_timers(runtime) == 0  # within the hour
    clock.advance(timedelta(hours=1, seconds=1))
    overdue = (
        await client.get("/v1/cases", params={"overdue": "true"}, headers=admin_headers)
    ).json()
    assert [c["id"] for c in overdue] == [late.case_id]
    assert overdue[0]["sla"]["timer"] == "quick_intake" and overdue[0]["sla"]["flagged_at"] is None
    not_overdue = (
        await client.get("/v1/cases", params={"overdue": "false"}, headers=admin_headers)
    ).json()
    assert [c["id"] for c in not_overdue] == [on_time.case_id]
    assert await run_timers(runtime) == 1
    assert await run_timers(runtime) == 0  # flagged once
    flagged = await case_of(client, admin_headers, late.case_id)
    assert flagged["sla"]["flagged_at"] is not None
    async with runtime.sessionmaker() as session:
        rows = (await session.scalars(select(Delivery).where(Delivery.kind == "webhook"))).all()
    assert [(d.target, d.ordering_key, d.payload["type"]) for d in rows] == [
        ("ops-queue", late.case_id, "case.overdue")
    ]
    assert rows[0].payload["data"]["overdue"]["timer"] == "quick_intake"
