"""``/v1/ops/deliveries``, ``/v1/ops/targets``, ``/metrics`` and the deliveries CLI."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from typer.testing import CliRunner

from gateway.cli import app as cli_app
from gateway.db.engine import make_engine, make_sessionmaker
from gateway.db.models import AuditEntry, Delivery, DeliveryAttempt, TargetState
from gateway.db.types import utcnow
from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from testkit.ehr import LocalEhr, RunningEhr
from tests.conftest import ApiKeyFactory
from tests.gateway.delivery.conftest import TargetFactory
from tests.support.delivery import drain, submit_intakes

OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "invalid", "diagnostics": "Patient.gender"}],
}


def _row(i: int, **fields: Any) -> Delivery:
    now = utcnow()
    values: dict[str, Any] = {
        "kind": "ehr",
        "target": "acme",
        "ordering_key": f"patient-{i}",
        "resource_refs": [f"Patient/p{i}"],
        "status": "dead",
        "attempts": 1,
        "available_at": now,
        "created_at": now - timedelta(minutes=10 - i),
        "dead_reason": "rejected",
        "last_error": "EHR answered 422 (error/invalid)",
        "last_status_code": 422,
        "operation_outcome": OUTCOME,
    }
    values.update(fields)
    return Delivery(**values)


async def seed(sessionmaker: Any) -> list[int]:
    """Dead letters of two targets and kinds, a review item, and a delivered row."""
    async with sessionmaker() as session:
        rows = [
            _row(0),
            _row(1),
            _row(2, target="other"),
            _row(3, kind="webhook", target="ops-crm", operation_outcome=None, last_status_code=500),
            _row(4, status="review", dead_reason="multiple_matches", review={"matches": []}),
            _row(5, status="delivered", dead_reason=None),
        ]
        session.add_all(rows)
        await session.flush()
        session.add(
            DeliveryAttempt(
                delivery_id=rows[0].id,
                attempt=1,
                worker="w",
                started_at=utcnow(),
                duration_ms=42,
                status_code=422,
                outcome="permanent",
                error="EHR answered 422 (error/invalid)",
            )
        )
        await session.commit()
        return [r.id for r in rows]


async def test_ops_routes_need_their_scopes(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    reader = {"Authorization": f"Bearer {await make_api_key('ops:read')}"}
    intake = {"Authorization": f"Bearer {await make_api_key('intake:write')}"}

    assert (await client.get("/v1/ops/deliveries")).status_code == 401
    assert (await client.get("/v1/ops/deliveries", headers=intake)).status_code == 403
    assert (await client.get("/v1/ops/targets", headers=intake)).status_code == 403
    assert (await client.get("/v1/ops/deliveries", headers=reader)).status_code == 200
    replay = await client.post("/v1/ops/deliveries/replay", json={"ids": [1]}, headers=reader)
    assert replay.status_code == 403


async def test_dead_letters_are_listed_with_reason_attempts_error_and_outcome(
    runtime: Runtime, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    ids = await seed(runtime.sessionmaker)

    dead = (await client.get("/v1/ops/deliveries", headers=admin_headers)).json()
    acme = (
        await client.get("/v1/ops/deliveries", params={"target": "acme"}, headers=admin_headers)
    ).json()
    review = (
        await client.get("/v1/ops/deliveries", params={"status": "review"}, headers=admin_headers)
    ).json()
    webhooks = (
        await client.get("/v1/ops/deliveries", params={"kind": "webhook"}, headers=admin_headers)
    ).json()
    page = (
        await client.get("/v1/ops/deliveries", params={"limit": 2}, headers=admin_headers)
    ).json()
    rest = (
        await client.get(
            "/v1/ops/deliveries",
            params={"limit": 2, "after_id": page["next_after_id"]},
            headers=admin_headers,
        )
    ).json()

    assert dead["total"] == 4
    first = dead["deliveries"][0]
    assert (first["id"], first["reason"], first["attempts"], first["last_status_code"]) == (
        ids[0],
        "rejected",
        1,
        422,
    )
    assert first["operation_outcome"] == OUTCOME
    assert first["last_error"] == "EHR answered 422 (error/invalid)"
    assert [d["id"] for d in acme["deliveries"]] == ids[:2]
    assert [d["id"] for d in review["deliveries"]] == [ids[4]]
    assert [d["id"] for d in webhooks["deliveries"]] == [ids[3]]
    assert [d["id"] for d in page["deliveries"] + rest["deliveries"]] == ids[:4]
    assert rest["next_after_id"] is None


async def test_one_delivery_with_its_attempts(
    runtime: Runtime, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    ids = await seed(runtime.sessionmaker)

    found = await client.get(f"/v1/ops/deliveries/{ids[0]}", headers=admin_headers)
    missing = await client.get("/v1/ops/deliveries/999999", headers=admin_headers)

    assert found.status_code == 200
    assert [
        (a["attempt"], a["status_code"], a["outcome"]) for a in found.json()["attempt_log"]
    ] == [(1, 422, "permanent")]
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


async def test_replay_by_ids_puts_dead_and_review_back_and_audits_it(
    runtime: Runtime, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    ids = await seed(runtime.sessionmaker)

    response = await client.post(
        "/v1/ops/deliveries/replay",
        json={"ids": [ids[0], ids[4], ids[5]]},  # dead, review, delivered
        headers=admin_headers,
    )

    assert response.status_code == 200
    assert response.json() == {
        "matched": 3,
        "replayed": 2,
        "ids": [ids[0], ids[4]],
        "next_after_id": None,
    }
    async with runtime.sessionmaker() as session:
        rows = {r.id: r for r in await session.scalars(select(Delivery))}
        audit = list(await session.scalars(select(AuditEntry).where(AuditEntry.action == "replay")))
    for i in (ids[0], ids[4]):
        assert (rows[i].status, rows[i].attempts, rows[i].replay_count) == ("pending", 0, 1)
        assert rows[i].replayed_at is not None and rows[i].dead_reason is None
    assert rows[ids[5]].status == "delivered"
    assert sorted(int(a.entity_id) for a in audit) == [ids[0], ids[4]]
    assert {a.actor for a in audit} == {a.actor for a in audit} and len(
        {a.actor for a in audit}
    ) == 1


async def test_replay_by_filter(
    runtime: Runtime, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    ids = await seed(runtime.sessionmaker)

    response = await client.post(
        "/v1/ops/deliveries/replay",
        json={"filter": {"target": "acme", "reason": "rejected"}, "limit": 1},
        headers=admin_headers,
    )
    more = await client.post(
        "/v1/ops/deliveries/replay",
        json={"filter": {"target": "acme", "reason": "rejected"}, "limit": 5},
        headers=admin_headers,
    )

    assert response.json()["ids"] == [ids[0]]
    assert response.json()["next_after_id"] == ids[0]  # limit reached: there may be more
    assert more.json()["ids"] == [ids[1]]
    assert more.json()["next_after_id"] is None


@pytest.mark.parametrize(
    "body", [{}, {"ids": [1], "filter": {"target": "acme"}}, {"filter": {"status": ["pending"]}}]
)
async def test_replay_needs_ids_or_a_dead_or_review_filter(
    client: httpx.AsyncClient, admin_headers: dict[str, str], body: dict[str, Any]
) -> None:
    response = await client.post("/v1/ops/deliveries/replay", json=body, headers=admin_headers)

    assert response.status_code == 422


async def test_targets_show_queue_circuit_token_and_last_success(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    ehr: tuple[LocalEhr, RunningEhr],
    use_target: TargetFactory,
) -> None:
    fake, running = ehr
    use_target(running)
    await submit_intakes(client, admin_headers, 2)
    worker = delivery_worker(runtime)
    try:
        await drain(runtime, worker)
    finally:
        await worker.aclose()
    fake.reject_when(lambda r: r["resourceType"] == "Patient", 422)
    await submit_intakes(client, admin_headers, 1)
    async with runtime.sessionmaker() as session:
        session.add(
            _row(
                9,
                kind="webhook",
                target="ops-crm",
                status="pending",
                created_at=utcnow() - timedelta(seconds=90),
            )
        )
        session.add(
            TargetState(
                kind="webhook",
                target="ops-crm",
                circuit="open",
                consecutive_failures=5,
                probe_failures=0,
                window_started_at=utcnow() - timedelta(seconds=5),
                window_calls=8,
                window_failures=6,
                open_reason="failure rate 75% over 8 calls in the last 30 s",
                next_probe_at=utcnow() + timedelta(seconds=20),
            )
        )
        await session.commit()

    targets = {
        t["name"]: t for t in (await client.get("/v1/ops/targets", headers=admin_headers)).json()
    }

    ehr_target = targets["test-ehr"]
    assert ehr_target["kind"] == "ehr" and ehr_target["configured"] is True
    assert ehr_target["queue"]["pending"] == 1 and ehr_target["queue"]["depth"] == 1
    assert ehr_target["queue"]["oldest_pending_age_s"] >= 0
    assert ehr_target["circuit"]["state"] == "closed"
    assert ehr_target["token"]["state"] == "valid"
    assert ehr_target["token"]["expires_at"] is not None
    assert ehr_target["token"]["last_error"] is None
    assert ehr_target["last_success_at"] is not None
    webhook = targets["ops-crm"]
    assert (webhook["kind"], webhook["configured"], webhook["token"]) == ("webhook", False, None)
    assert webhook["circuit"]["state"] == "open"
    assert webhook["circuit"]["failure_rate"] == 0.75
    assert webhook["circuit"]["window_calls"] == 8
    assert webhook["circuit"]["reason"] == "failure rate 75% over 8 calls in the last 30 s"
    assert webhook["circuit"]["next_trial_at"] is not None
    assert webhook["circuit"]["trials"] == {"succeeded": 0, "failed": 0}
    assert ehr_target["circuit"]["failure_rate"] == 0.0
    assert ehr_target["circuit"]["reason"] is None
    assert webhook["queue"]["oldest_pending_age_s"] >= 90


async def test_metrics_expose_counters_histograms_and_database_gauges(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    ehr: tuple[LocalEhr, RunningEhr],
    use_target: TargetFactory,
) -> None:
    _fake, running = ehr
    use_target(running)

    def sample(text: str, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    before = (await client.get("/metrics")).text
    await submit_intakes(client, admin_headers, 2)
    queued = (await client.get("/metrics")).text
    worker = delivery_worker(runtime)
    try:
        await drain(runtime, worker)
    finally:
        await worker.aclose()
    after = (await client.get("/metrics")).text

    key = {"kind": "ehr", "target": "test-ehr"}
    assert sample(queued, "fhir_gateway_delivery_queue_depth", **key) == 2
    assert sample(after, "fhir_gateway_delivery_queue_depth", **key) == 0
    delivered = "fhir_gateway_deliveries_total"
    assert (
        sample(after, delivered, outcome="delivered", **key)
        - sample(before, delivered, outcome="delivered", **key)
        == 2
    )
    assert sample(after, "fhir_gateway_delivery_attempt_seconds_count", **key) >= 2
    assert sample(after, "fhir_gateway_intake_to_ehr_seconds_count", target="test-ehr") >= 2
    assert (
        sample(
            after, "fhir_gateway_oauth_token_requests_total", target="test-ehr", outcome="success"
        )
        >= 1
    )
    assert sample(after, "fhir_gateway_circuit_state", state="closed", **key) == 1
    assert sample(after, "fhir_gateway_circuit_state", state="open", **key) == 0
    assert sample(after, "fhir_gateway_circuit_failure_rate", **key) == 0.0
    assert "fhir_gateway_circuit_failure_rate" in after
    assert sample(after, "fhir_gateway_oauth_token_expires_in_seconds", target="test-ehr") > 200
    assert sample(after, "fhir_gateway_oauth_auth_circuit_open", target="test-ehr") == 0
    assert "fhir_gateway_delivery_oldest_pending_age_seconds" in after
    assert "fhir_gateway_deliveries_dead" in after


async def test_delivery_logs_carry_no_phi(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    ehr: tuple[LocalEhr, RunningEhr],
    use_target: TargetFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run with deliveries, a dead letter (its OperationOutcome echoing the patient's
    name) and a timeout: the logs carry ids, never the synthetic patient's details."""
    fake, running = ehr
    use_target(running)
    [intake] = await submit_intakes(client, admin_headers, 1)
    patient = intake["patient"]
    fake.fail_fhir(1, 500)
    leaky = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": str(patient)}],
    }
    fake.reject_when(lambda r: r["resourceType"] == "QuestionnaireResponse", 422, leaky)
    await submit_intakes(client, admin_headers, 1)
    capsys.readouterr()
    worker = delivery_worker(runtime)
    try:
        await drain(runtime, worker)
    finally:
        await worker.aclose()
    logs = capsys.readouterr().out

    assert "delivery.dead_lettered" in logs
    assert "delivery.attempt_failed" in logs
    for value in (
        patient["email"].strip(),
        patient["email"].strip().lower(),
        "Rivera",
        "Jordan",
        "1988-04-12",
        "04/12/1988",
        "5552671",
        "555-2671",
        "Market St",
    ):
        assert value not in logs, value


# --------------------------------------------------------------------------- the CLI


def _cli(database_url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", database_url)
    return CliRunner().invoke(cli_app, ["deliveries", *args])


def _seed_sync(database_url: str) -> list[int]:
    async def main() -> list[int]:
        engine = make_engine(database_url)
        try:
            return await seed(make_sessionmaker(engine))
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _statuses(database_url: str) -> dict[int, tuple[str, int]]:
    async def main() -> dict[int, tuple[str, int]]:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                return {
                    r.id: (r.status, r.replay_count)
                    for r in await session.scalars(select(Delivery))
                }
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_cli_lists_and_shows_dead_letters(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _seed_sync(database_url)

    listing = _cli(database_url, monkeypatch, "list", "--target", "acme")
    as_json = _cli(database_url, monkeypatch, "list", "--status", "review", "--json")
    shown = _cli(database_url, monkeypatch, "show", str(ids[0]))

    assert listing.exit_code == 0, listing.output
    lines = listing.stdout.strip().splitlines()
    assert [int(line.split("\t")[0]) for line in lines] == ids[:2]
    assert "rejected" in lines[0] and "error/invalid" in lines[0]
    assert [json.loads(line)["id"] for line in as_json.stdout.strip().splitlines()] == [ids[4]]
    assert json.loads(shown.stdout)["attempt_log"][0]["status_code"] == 422
    assert json.loads(shown.stdout)["tries"] == len(json.loads(shown.stdout)["attempt_log"])


def test_cli_replay_of_a_pending_delivery_says_why_nothing_was_replayed(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: not "replayed 0 deliveries: " with a dangling colon."""
    ids = _seed_sync(database_url)
    pending = _cli(database_url, monkeypatch, "replay", str(ids[3]))
    assert pending.exit_code == 0
    again = _cli(database_url, monkeypatch, "replay", str(ids[3]))  # now pending
    assert again.exit_code == 1
    assert "replayed nothing" in again.stdout
    assert f"delivery {ids[3]} left alone: it is pending" in again.stderr
    assert "deliveries: \n" not in again.output and not again.stdout.rstrip().endswith(":")
    missing = _cli(database_url, monkeypatch, "replay", "999999")
    assert "delivery 999999 left alone: no such delivery" in missing.stderr


def test_cli_replays_by_id_and_in_bulk(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _seed_sync(database_url)

    refused = _cli(database_url, monkeypatch, "replay")
    by_id = _cli(database_url, monkeypatch, "replay", str(ids[3]), str(ids[5]))
    dry = _cli(database_url, monkeypatch, "replay", "--target", "acme", "--dry-run")
    bulk = _cli(database_url, monkeypatch, "replay", "--all", "--batch", "1", "-y")

    assert refused.exit_code == 2
    assert by_id.exit_code == 0 and f"replayed 1 delivery: {ids[3]}" in by_id.output
    assert f"delivery {ids[5]} left alone: it is delivered" in by_id.output
    assert "2 deliveries match; nothing replayed (dry run)" in dry.output
    assert bulk.exit_code == 0, bulk.output
    assert "replayed 3 of 3 deliveries" in bulk.output
    statuses = _statuses(database_url)
    assert {i for i, (s, _) in statuses.items() if s == "pending"} == {
        ids[0],
        ids[1],
        ids[2],
        ids[3],
    }
    assert statuses[ids[4]] == ("review", 0)  # --status defaults to dead
    assert statuses[ids[5]] == ("delivered", 0)


async def test_targets_show_an_active_subscriber_as_configured(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    r = await client.post(
        "/v1/ops/subscribers",
        json={"name": "crm", "url": "http://127.0.0.1:9/hooks", "event_types": ["*"]},
        headers=admin_headers,
    )
    assert r.status_code == 201, r.text
    async with runtime.sessionmaker() as session:
        session.add(_row(1, kind="webhook", target="crm", status="dead"))
        await session.commit()

    def crm(targets: list[dict[str, Any]]) -> dict[str, Any]:
        (target,) = [t for t in targets if t["name"] == "crm"]
        return target

    targets = (await client.get("/v1/ops/targets", headers=admin_headers)).json()
    assert (crm(targets)["kind"], crm(targets)["configured"]) == ("webhook", True)
    r = await client.delete(f"/v1/ops/subscribers/{r.json()['id']}", headers=admin_headers)
    assert r.status_code in (200, 204), r.text
    targets = (await client.get("/v1/ops/targets", headers=admin_headers)).json()
    assert crm(targets)["configured"] is False  # deactivated
