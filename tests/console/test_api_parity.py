"""``/v1`` routes of the console's actions: assign, override, pause and resume, rotating a
subscriber's secret; each audited as the API client."""

from __future__ import annotations

import httpx

from gateway.db.models import AuditEntry, Case, CaseEvent, ExceptionRecord, Subscriber, TargetState
from gateway.runtime import Runtime
from tests.conftest import ApiKeyFactory
from tests.console.conftest import seed
from tests.support.api import bearer, rows


async def test_assign_an_exception(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    headers = bearer(await make_api_key("ops:admin", name="ops-bot"))
    url = f"/v1/ops/exceptions/{seeded.exception_id}/assign"
    answer = await client.post(url, json={"assignee": "alice"}, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["assigned_to"] == "alice"
    listed = await client.get("/v1/ops/exceptions?assigned_to=alice", headers=headers)
    assert [e["id"] for e in listed.json()["items"]] == [seeded.exception_id]
    assert (await client.get("/v1/ops/exceptions?assigned_to=-", headers=headers)).json()[
        "items"
    ] == []
    unassigned = await client.post(url, json={"assignee": None}, headers=headers)
    assert unassigned.json()["assigned_to"] is None
    reader = bearer(await make_api_key("ops:read"))
    assert (await client.post(url, json={"assignee": "bob"}, headers=reader)).status_code == 403
    audits = await rows(runtime, AuditEntry, AuditEntry.action == "assign")
    assert {a.actor for a in audits} == {"ops-bot"}


async def test_assign_a_resolved_exception_is_a_conflict(
    client: httpx.AsyncClient, admin_headers: dict[str, str], runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    base = f"/v1/ops/exceptions/{seeded.exception_id}"
    await client.post(f"{base}/resolve", json={"note": "done"}, headers=admin_headers)
    answer = await client.post(f"{base}/assign", json={"assignee": "x"}, headers=admin_headers)
    assert answer.status_code == 409
    assert answer.headers["content-type"] == "application/problem+json"
    [row] = await rows(runtime, ExceptionRecord)
    assert row.assigned_to is None


async def test_override_a_case(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    headers = bearer(await make_api_key("ops:admin", name="ops-bot"))
    url = f"/v1/cases/{seeded.case_id}/override"
    answer = await client.post(
        url, json={"state": "shipped", "reason": "pharmacy confirmed by phone"}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "case_id": seeded.case_id,
        "from_state": "awaiting_review",
        "to_state": "shipped",
        "within_workflow": False,
    }
    [case] = await rows(runtime, Case)
    assert case.state == "shipped"
    [event] = await rows(runtime, CaseEvent, CaseEvent.type == "override")
    assert (event.detail, event.principal) == ("outside_workflow", "client:ops-bot")
    same = await client.post(url, json={"state": "shipped", "reason": "x"}, headers=headers)
    assert same.status_code == 422
    assert same.json()["errors"][0]["code"] == "same_state"
    unknown = await client.post(url, json={"state": "nowhere", "reason": "x"}, headers=headers)
    assert unknown.status_code == 422
    missing = await client.post(
        "/v1/cases/nope/override", json={"state": "paid", "reason": "x"}, headers=headers
    )
    assert missing.status_code == 404


async def test_pause_and_resume_a_target(
    client: httpx.AsyncClient, admin_headers: dict[str, str], runtime: Runtime
) -> None:
    paused = await client.post(
        "/v1/ops/targets/ehr/example-ehr/pause",
        json={"reason": "maintenance"},
        headers=admin_headers,
    )
    assert paused.status_code == 200, paused.text
    assert paused.json()["paused"]["reason"] == "maintenance"
    [state] = await rows(runtime, TargetState)
    assert state.paused_at is not None
    resumed = await client.post("/v1/ops/targets/ehr/example-ehr/resume", headers=admin_headers)
    assert resumed.json()["paused"] is None
    unknown = await client.post(
        "/v1/ops/targets/ehr/nope/pause", json={"reason": "x"}, headers=admin_headers
    )
    assert unknown.status_code == 404
    actions = [
        a.action for a in await rows(runtime, AuditEntry, AuditEntry.entity_type == "Target")
    ]
    assert actions == ["pause", "resume"]


async def test_a_paused_target_is_not_claimed() -> None:
    from datetime import UTC, datetime

    from gateway.db.models import TargetState
    from gateway.delivery.circuit import gate

    now = datetime(2026, 1, 1, tzinfo=UTC)
    state = TargetState(kind="ehr", target="t", circuit="closed", paused_at=now)
    assert gate(state, None, now=now, max_concurrent=4, uses_token=False).claim is False
    state.paused_at = None
    assert gate(state, None, now=now, max_concurrent=4, uses_token=False).claim is True


async def test_rotate_a_subscriber_secret(
    client: httpx.AsyncClient, admin_headers: dict[str, str], runtime: Runtime
) -> None:
    created = await client.post(
        "/v1/ops/subscribers",
        json={"name": "crm", "url": "http://127.0.0.1:9/h", "event_types": ["case.*"]},
        headers=admin_headers,
    )
    assert created.status_code == 201, created.text
    first = created.json()["secret"]
    rotated = await client.post(
        f"/v1/ops/subscribers/{created.json()['id']}/rotate-secret", headers=admin_headers
    )
    assert rotated.status_code == 200
    assert rotated.json()["secret"].startswith("whsec_") and rotated.json()["secret"] != first
    [row] = await rows(runtime, Subscriber)
    assert row.secret == rotated.json()["secret"]
    assert (
        await client.post("/v1/ops/subscribers/999/rotate-secret", headers=admin_headers)
    ).status_code == 404
