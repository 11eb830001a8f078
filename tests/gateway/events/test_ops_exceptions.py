"""GET /v1/ops/exceptions with resolve and retry: what was refused is visible, and can be
applied again once the cause is fixed."""

from __future__ import annotations

import httpx
import yaml

from gateway.runtime import Runtime
from tests import samples
from tests.conftest import ApiKeyFactory
from tests.support.events_env import Patient, case_of, hl7_message, send_event


async def _items(client: httpx.AsyncClient, headers: dict[str, str], **params: str) -> list[dict]:
    r = await client.get("/v1/ops/exceptions", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def test_unmatched_patient_can_be_retried_once_the_patient_exists(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    early = Patient("?", "pt-arrives-later", "?")
    await send_event(
        client,
        admin_headers,
        early,
        "payment_completed",
        source="checkout",
        occurred_at="2026-11-24T09:00:00Z",
    )
    [exc] = await _items(client, admin_headers)
    assert exc["kind"] == "unmatched_patient" and exc["retryable"] is True
    # not retryable yet in effect: it fails again and a new exception appears
    r = await client.post(f"/v1/ops/exceptions/{exc['id']}/retry", headers=admin_headers)
    assert r.status_code == 202
    [again] = await _items(client, admin_headers)
    assert again["id"] != exc["id"]
    assert [e["retries"] for e in await _items(client, admin_headers, status="retried")] == [1]
    # the intake arrives; retry now applies the payment
    intake = samples.intake()
    intake["patient"]["external_id"] = "pt-arrives-later"
    created = (
        await client.post("/v1/intake-submissions", json=intake, headers=admin_headers)
    ).json()
    r = await client.post(f"/v1/ops/exceptions/{again['id']}/retry", headers=admin_headers)
    assert r.status_code == 202
    assert await _items(client, admin_headers) == []
    case = await case_of(client, admin_headers, created["case"]["id"])
    assert case["state"] == "awaiting_review"
    status = (
        await client.get(f"/v1/messages/{r.json()['message_id']}", headers=admin_headers)
    ).json()
    assert status["status"] == "processed"


async def test_hl7_from_an_unknown_facility_can_be_retried_after_the_profile_is_added(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    message = hl7_message(
        "ADT^A08", control_id="N-1", facility="NEWCLINIC", pid3="pt-9^^^TELEHEALTH"
    )
    r = await client.post(
        "/v1/hl7v2",
        content=message.encode(),
        headers={**admin_headers, "Content-Type": "application/hl7-v2"},
    )
    assert "MSA|AR|N-1" in r.text
    [exc] = await _items(client, admin_headers, channel="hl7v2")
    assert exc["kind"] == "hl7_rejected" and exc["has_payload"] and exc["retryable"]
    payload = await client.get(f"/v1/ops/exceptions/{exc['id']}/payload", headers=admin_headers)
    assert payload.content == message.encode()
    profile = {
        "kind": "partner",
        "name": "new-clinic",
        "source": "ehr",
        "hl7": {
            "facilities": ["NEWCLINIC"],
            "patient_identifiers": [
                {"authority": "TELEHEALTH", "system": "{base}/external-patient-id"}
            ],
            "messages": [{"message": "ADT^A08", "event": "demographics_updated"}],
        },
    }
    (runtime.profiles.current.root / "events" / "new-clinic.yaml").write_text(
        yaml.safe_dump(profile)
    )
    runtime.profiles.reload()
    r = await client.post(f"/v1/ops/exceptions/{exc['id']}/retry", headers=admin_headers)
    assert r.status_code == 202
    assert r.json()["ack_code"] == "AA" and r.json()["message_id"]
    # stored now, and applied (no patient pt-9: a new, visible reason)
    [left] = await _items(client, admin_headers)
    assert left["kind"] == "unmatched_patient" and left["message_id"] == r.json()["message_id"]


async def test_resolve_list_filters_and_scopes(
    client: httpx.AsyncClient, admin_headers: dict[str, str], make_api_key: ApiKeyFactory
) -> None:
    for i in range(3):
        ghost = Patient("?", f"ghost-{i}", "?")
        await send_event(
            client, admin_headers, ghost, "provider_assigned", occurred_at="2026-11-24T09:00:00Z"
        )
    reader = {"Authorization": f"Bearer {await make_api_key('ops:read')}"}
    page = (await client.get("/v1/ops/exceptions", params={"limit": 2}, headers=reader)).json()
    assert len(page["items"]) == 2 and page["next_before_id"] is not None
    rest = (
        await client.get(
            "/v1/ops/exceptions",
            params={"limit": 2, "before_id": page["next_before_id"]},
            headers=reader,
        )
    ).json()
    assert len(rest["items"]) == 1 and rest["next_before_id"] is None
    target = page["items"][0]["id"]
    assert (
        await client.post(f"/v1/ops/exceptions/{target}/resolve", json={}, headers=reader)
    ).status_code == 403
    assert (
        await client.get(f"/v1/ops/exceptions/{target}/payload", headers=reader)
    ).status_code == 403
    r = await client.post(
        f"/v1/ops/exceptions/{target}/resolve",
        json={"note": "duplicate patient merged"},
        headers=admin_headers,
    )
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["note"], r.json()["retryable"]) == (
        "resolved",
        "duplicate patient merged",
        False,
    )
    again = await client.post(
        f"/v1/ops/exceptions/{target}/resolve", json={}, headers=admin_headers
    )
    assert again.status_code == 409
    assert (
        await client.post(f"/v1/ops/exceptions/{target}/retry", headers=admin_headers)
    ).status_code == 409
    assert len(await _items(client, admin_headers)) == 2
    assert (
        len(await _items(client, admin_headers, status="resolved", kind="unmatched_patient")) == 1
    )
    assert (await client.get("/v1/ops/exceptions/999999", headers=admin_headers)).status_code == 404


async def test_rejected_input_cannot_be_retried_here(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.post(
        "/v1/events",
        content=b"{not json",
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    [exc] = await _items(client, admin_headers)
    assert exc["kind"] == "rejected_input" and exc["retryable"] is False
    r = await client.post(f"/v1/ops/exceptions/{exc['id']}/retry", headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["errors"][0]["code"] == "not_retryable"
