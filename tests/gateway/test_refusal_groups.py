"""Issue 15: repeated 400/415/422 refusals of one client for one reason are one ops
exception with a count, and every payload is still kept (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy import func, select

from gateway.db.models import ExceptionPayload, ExceptionRecord
from gateway.runtime import Runtime
from tests import samples
from tests.conftest import ApiKeyFactory


def _bad_intake(n: int) -> dict[str, Any]:
    body = samples.intake()
    body["submission_id"] = f"sub-bad-{n}"  # every payload differs ...
    body["patient"]["phone"] = "not a phone"  # ... the reason does not
    return body


async def _open_rejections(client: httpx.AsyncClient, headers: dict[str, str]) -> list[Any]:
    r = await client.get("/v1/ops/exceptions", params={"kind": "rejected_input"}, headers=headers)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def test_repeated_refusals_are_one_exception_with_every_payload(
    client: httpx.AsyncClient,
    runtime: Runtime,
    make_api_key: ApiKeyFactory,
    admin_headers: dict[str, str],
) -> None:
    app = {"Authorization": f"Bearer {await make_api_key('intake:write', name='noisy-app')}"}
    for n in range(3):
        r = await client.post("/v1/intake-submissions", json=_bad_intake(n), headers=app)
        assert r.status_code == 422
    [group] = await _open_rejections(client, admin_headers)
    assert (group["sender"], group["occurrences"]) == ("noisy-app", 3)
    assert group["last_seen_at"] >= group["created_at"]
    for n in range(3):
        r = await client.get(
            f"/v1/ops/exceptions/{group['id']}/payloads/{n + 1}", headers=admin_headers
        )
        assert r.status_code == 200, r.text
        assert json.loads(r.content)["submission_id"] == f"sub-bad-{n}"
    first = await client.get(f"/v1/ops/exceptions/{group['id']}/payload", headers=admin_headers)
    assert json.loads(first.content)["submission_id"] == "sub-bad-0"
    missing = await client.get(
        f"/v1/ops/exceptions/{group['id']}/payloads/4", headers=admin_headers
    )
    assert missing.status_code == 404
    async with runtime.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(ExceptionRecord)) == 1
        assert await session.scalar(select(func.count()).select_from(ExceptionPayload)) == 2


async def test_another_client_or_another_reason_is_another_exception(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, admin_headers: dict[str, str]
) -> None:
    one = {"Authorization": f"Bearer {await make_api_key('intake:write', name='app-one')}"}
    two = {"Authorization": f"Bearer {await make_api_key('intake:write', name='app-two')}"}
    assert (
        await client.post("/v1/intake-submissions", json=_bad_intake(1), headers=one)
    ).status_code == 422
    assert (
        await client.post("/v1/intake-submissions", json=_bad_intake(2), headers=two)
    ).status_code == 422
    not_json = await client.post(
        "/v1/intake-submissions", content=b"{", headers={**one, "Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    groups = await _open_rejections(client, admin_headers)
    assert sorted((g["sender"], g["problems"][0]["code"], g["occurrences"]) for g in groups) == [
        ("app-one", "invalid_json", 1),
        ("app-one", "invalid_phone", 1),
        ("app-two", "invalid_phone", 1),
    ]


async def test_a_resolved_group_is_not_reopened(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, admin_headers: dict[str, str]
) -> None:
    app = {"Authorization": f"Bearer {await make_api_key('intake:write', name='fixed-app')}"}
    await client.post("/v1/intake-submissions", json=_bad_intake(1), headers=app)
    [group] = await _open_rejections(client, admin_headers)
    r = await client.post(
        f"/v1/ops/exceptions/{group['id']}/resolve",
        json={"note": "told them"},
        headers=admin_headers,
    )
    assert r.status_code == 200, r.text
    await client.post("/v1/intake-submissions", json=_bad_intake(2), headers=app)
    [new] = await _open_rejections(client, admin_headers)
    assert new["id"] != group["id"] and new["occurrences"] == 1
