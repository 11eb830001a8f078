"""The audit trail an auditor can use (issue 11): every read and write of PHI recorded as
an IHE BALP AuditEvent, searchable at ``GET /fhir/AuditEvent`` within a second, in a hash
chain that ``fhir-gateway audit verify`` checks; a full flow (intake, checkout, events,
delivery to an EHR, reads) leaves a chain that verifies, and tampering is found."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import httpx
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import select, text

from gateway.audit import chain
from gateway.db.models import ApiClient, AuditEntry
from gateway.db.types import utcnow
from gateway.runtime import Runtime
from tests import samples
from tests.conftest import ApiKeyFactory
from tests.support.api import bearer

STRIPE_SECRET = "whsec_test_secret_for_tests_only"
EXTERNAL = "https://fhir-gateway.example.org/sid/external-patient-id"


async def seal_all(runtime: Runtime) -> None:
    async with runtime.write_session() as session:
        while await chain.seal(session):
            pass
        await session.commit()


async def verify(runtime: Runtime) -> chain.Verification:
    async with runtime.sessionmaker() as session:
        return await chain.verify(session)


async def intake(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    body = samples.intake()
    r = await client.post("/v1/intake-submissions", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return {"body": body, "out": r.json()}


# --------------------------------------------------------------------------- search


async def test_reading_a_patient_is_searchable_within_a_second(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    reader = await make_api_key("intake:write", "fhir:read", name="reader-app")
    auditor = bearer(await make_api_key("audit:read", name="auditor"))
    done = await intake(client, bearer(reader))
    patient_id = done["out"]["patient"]["id"]

    started = time.monotonic()
    r = await client.get(f"/fhir/Patient/{patient_id}", headers=bearer(reader))
    assert r.status_code == 200
    while True:
        found = await client.get(
            "/fhir/AuditEvent",
            params={"patient": f"Patient/{patient_id}", "action": "R", "agent": "reader-app"},
            headers=auditor,
        )
        assert found.status_code == 200, found.text
        if found.json()["entry"]:
            break
        assert time.monotonic() - started < 1.0, "the read is not in the audit trail after 1 s"
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    (entry,) = found.json()["entry"]
    event = entry["resource"]
    AuditEvent.model_validate(event)
    assert event["action"] == "R" and event["outcome"] == "0"
    assert event["subtype"][0] == {
        "system": "http://hl7.org/fhir/restful-interaction",
        "code": "read",
    }
    client_agent = event["agent"][0]
    assert client_agent["requestor"] is True and client_agent["who"]["display"] == "reader-app"
    assert client_agent["network"]["address"]  # the peer's address
    assert event["entity"][0]["what"] == {"reference": f"Patient/{patient_id}"}
    assert event["entity"][0]["role"]["code"] == "1"  # BALP entity[patient]

    today = utcnow().date().isoformat()
    dated = await client.get(
        "/fhir/AuditEvent",
        params=[("patient", patient_id), ("date", f"ge{today}"), ("date", "lt2999-01-01")],
        headers=auditor,
    )
    assert len(dated.json()["entry"]) >= 2  # the intake's creates and the read
    none = await client.get(
        "/fhir/AuditEvent", params={"patient": patient_id, "date": "lt2000"}, headers=auditor
    )
    assert none.json()["entry"] == []


async def test_audit_search_needs_its_scope_and_answers_operation_outcomes(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    reader = bearer(await make_api_key("fhir:read", "ops:admin"))
    auditor = bearer(await make_api_key("audit:read"))
    assert (await client.get("/fhir/AuditEvent")).status_code == 401
    r = await client.get("/fhir/AuditEvent", headers=reader)
    assert r.status_code == 403
    assert r.json()["resourceType"] == "OperationOutcome"
    r = await client.get(
        "/fhir/AuditEvent",
        params={"date": "yesterday", "action": "X", "_count": "9999999999999"},
        headers=auditor,
    )
    assert r.status_code == 400
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert len(outcome["issue"]) == 3


async def test_paging_follows_next_links(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    reader = bearer(await make_api_key("intake:write", "fhir:read", name="pager"))
    auditor = bearer(await make_api_key("audit:read"))
    done = await intake(client, reader)
    for _ in range(3):
        await client.get(f"/fhir/Patient/{done['out']['patient']['id']}", headers=reader)
    url = "/fhir/AuditEvent?agent=pager&action=R&_count=2"
    ids: list[str] = []
    while url:
        page = (await client.get(url, headers=auditor)).json()
        ids += [e["resource"]["id"] for e in page["entry"]]
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = nxt[0].replace(runtime.settings.public_base_url, "") if nxt else ""
    assert len(ids) == len(set(ids)) == 3


# --------------------------------------------------------------------------- the chain


async def test_changed_deleted_and_truncated_entries_are_found(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    done = await intake(client, admin_headers)
    await client.get(f"/fhir/Patient/{done['out']['patient']['id']}", headers=admin_headers)
    await seal_all(runtime)
    assert (await verify(runtime)).ok
    async with runtime.sessionmaker() as session:
        seqs = list(await session.scalars(select(AuditEntry.seq).order_by(AuditEntry.seq)))
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 4

    async with runtime.write_session() as session:
        await session.execute(
            text("UPDATE audit_log SET actor = 'someone-else' WHERE seq = :s"), {"s": seqs[1]}
        )
        await session.execute(text("DELETE FROM audit_log WHERE seq = :s"), {"s": seqs[2]})
        await session.execute(text("DELETE FROM audit_log WHERE seq = :s"), {"s": seqs[-1]})
        await session.commit()
    problems = (await verify(runtime)).problems
    assert {p["problem"] for p in problems} == {
        "the entry does not match its hash",
        f"entries {seqs[2]}..{seqs[2]} are missing",
        f"the head names entry {seqs[-1]}; the chain ends at {seqs[-2]}",
    }


async def test_purging_past_retention_keeps_the_rest_verifiable(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    await intake(client, admin_headers)
    await seal_all(runtime)
    async with runtime.sessionmaker() as session:
        total = len(list(await session.scalars(select(AuditEntry.id))))
    later = utcnow()
    await asyncio.sleep(0.01)
    await intake(client, admin_headers)  # newer entries, kept
    await seal_all(runtime)
    async with runtime.write_session() as session:
        deleted = await chain.purge(session, before=later)
        await session.commit()
    assert deleted == total
    result = await verify(runtime)
    assert result.ok, result.problems
    assert result.anchor_seq == total and result.checked > 0


async def test_concurrent_requests_seal_into_one_unbroken_chain(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    done = await intake(client, admin_headers)
    patient = done["out"]["patient"]["id"]

    async def reads() -> None:
        for _ in range(5):
            assert (
                await client.get(f"/fhir/Patient/{patient}", headers=admin_headers)
            ).status_code == 200

    async def sealer() -> None:
        for _ in range(10):
            await seal_all(runtime)
            await asyncio.sleep(0)

    await asyncio.gather(reads(), reads(), sealer())
    await seal_all(runtime)
    result = await verify(runtime)
    assert result.ok, result.problems
    assert result.unsealed == 0


# --------------------------------------------------------------------------- who, and when


async def test_last_used_at_is_written_at_most_once_a_minute(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    key = await make_api_key("cases:read", name="busy-client")
    for _ in range(5):
        assert (await client.get("/v1/cases", headers=bearer(key))).status_code == 200
    async with runtime.sessionmaker() as session:
        first = await session.scalar(
            select(ApiClient.last_used_at).where(ApiClient.name == "busy-client")
        )
    assert first is not None and utcnow() - first < timedelta(seconds=30)
    runtime.auth_cache._touched.clear()
    assert (await client.get("/v1/cases", headers=bearer(key))).status_code == 200
    async with runtime.sessionmaker() as session:
        again = await session.scalar(
            select(ApiClient.last_used_at).where(ApiClient.name == "busy-client")
        )
    assert again == first  # within the minute: the row is not written again


async def test_exception_payload_reads_and_previews_are_audited(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    key = bearer(
        await make_api_key("intake:write", "ops:admin", "profiles:write", name="ops-person")
    )
    r = await client.post("/v1/intake-submissions", json={"submission_id": "broken"}, headers=key)
    assert r.status_code == 422
    listed = (await client.get("/v1/ops/exceptions", headers=key)).json()
    exception_id = listed["items"][0]["id"]
    assert (
        await client.get(f"/v1/ops/exceptions/{exception_id}/payload", headers=key)
    ).status_code == 200
    r = await client.post("/v1/profiles/preview", json={"input": samples.intake()}, headers=key)
    assert r.status_code == 200, r.text
    async with runtime.sessionmaker() as session:
        rows = list(
            await session.scalars(select(AuditEntry).where(AuditEntry.actor == "ops-person"))
        )
    assert {(r.action, r.entity_type) for r in rows} >= {
        ("read", "ExceptionPayload"),
        ("preview", "Profile"),
    }


# --------------------------------------------------------------------------- refusals


async def test_a_known_client_refused_by_a_route_is_in_the_audit_trail(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    writer = bearer(await make_api_key("intake:write", name="intake-app"))
    auditor = bearer(await make_api_key("audit:read", name="auditor"))

    r = await client.get("/fhir/Patient/some-patient?name=Smith", headers=writer)
    assert r.status_code == 403
    r = await client.get("/v1/ops/exceptions", headers=writer)
    assert r.status_code == 403
    # No key, a wrong key: answered 401 and not recorded (anyone can send them).
    assert (await client.get("/v1/ops/exceptions")).status_code == 401
    bad = bearer("fgw_not_a_key")
    assert (await client.get("/v1/ops/exceptions", headers=bad)).status_code == 401

    found = await client.get("/fhir/AuditEvent", params={"agent": "intake-app"}, headers=auditor)
    assert found.status_code == 200, found.text
    events = [e["resource"] for e in found.json()["entry"]]
    assert len(events) == 2
    for event in events:
        AuditEvent.model_validate(event)
        assert event["outcome"] == "4" and event["action"] == "E"
        assert event["subtype"][0]["code"] == "refuse"
    routes = sorted(
        entity["what"]["identifier"]["value"]
        for e in events
        for entity in e["entity"]
        if "what" in entity
    )
    assert routes == ["GET /fhir/Patient/some-patient", "GET /v1/ops/exceptions"]
    # The query string (which may name a patient) is not kept.
    assert "Smith" not in str(events)
    async with runtime.sessionmaker() as session:
        refused = (
            await session.scalars(select(AuditEntry).where(AuditEntry.action == "refuse"))
        ).all()
    assert len(refused) == 2 and {row.actor for row in refused} == {"intake-app"}
    await seal_all(runtime)
    assert (await verify(runtime)).ok
