"""End to end (issue 16): a phased cutover against a local real FHIR server (Medplum).

Thousands of mixed historical records (intake submissions, canonical checkouts, Stripe
events, some bad) are imported while the target is in shadow mode (nothing written,
every resource a ``create``), the target is switched to live (a profile change, audited),
reconciliation finds every resource missing and requeues it, the worker delivers; the
import run again adds nothing; reconciliation finds zero mismatches; one resource edited
in the EHR is then the one difference reconciliation reports.

``MIGRATION_E2E_RECORDS`` sets the number of records. By default: on PostgreSQL, the
production database, 2,000 under ``CI=true`` (about 3 minutes on the 2-core machine)
and 500 on a laptop run; on SQLite, the same path, 300. The patients' names and birth
dates are drawn like a population's (:func:`testkit.samples.person`).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select

from gateway.db.models import AuditEntry, Delivery, ShadowResult
from gateway.db.types import utcnow
from gateway.imports.service import ImportSource, create_job, run_job
from gateway.ops import reconcile as rec
from gateway.runtime import Runtime
from gateway.worker import delivery_worker, ehr_clients
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests import samples
from tests.conftest import IN_CI
from tests.support.delivery import drain
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV, profiles_with_target

RECORDS = os.environ.get("MIGRATION_E2E_RECORDS")
TARGET = "test-ehr"


@pytest.fixture
async def ehr(make_ehr: EhrFactory) -> AsyncIterator[tuple[LocalEhr, RunningEhr]]:
    fake = make_ehr(client_id="gateway", client_secret="s3cret")
    async with run_ehr_async(fake) as running:
        yield fake, running


@pytest.fixture
def profiles_dir(
    tmp_path: Path, ehr: tuple[LocalEhr, RunningEhr], monkeypatch: pytest.MonkeyPatch
) -> Path:
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    # a generous timeout: reconciliation searches 40 identifiers at once on a busy machine
    return profiles_with_target(
        tmp_path / "profiles", ehr[1], extra={"mode": "shadow", "timeout_s": 30}
    )


def history(n: int) -> tuple[bytes, int]:
    """``n`` NDJSON records: 4 in 10 intakes, 3 canonical checkouts, 2 Stripe events,
    1 bad (not JSON, an intake that does not validate, an unknown plan, an unknown
    record, in turn). Returns (file content, bad records)."""
    lines: list[str] = []
    bad = 0
    for i in range(n):
        slot = i % 10
        if slot < 4:
            lines.append(json.dumps(samples.varied(samples.intake(), i)))
        elif slot < 7:
            lines.append(json.dumps(samples.varied(samples.canonical_checkout(), i)))
        elif slot < 9:
            lines.append(json.dumps(samples.varied(samples.stripe_event(), i)))
        else:
            bad += 1
            kind = (i // 10) % 4
            if kind == 0:
                lines.append('{"submission_id": "broken",')
            elif kind == 1:
                record = samples.intake()
                record["patient"]["birth_date"] = "someday"
                lines.append(json.dumps(record))
            elif kind == 2:
                lines.append(json.dumps(samples.canonical_checkout(plan="no-such-plan")))
            else:
                lines.append(json.dumps({"hello": "world"}))
    return ("\n".join(lines) + "\n").encode(), bad


async def import_file(runtime: Runtime, path: Path) -> dict[str, int]:
    source = ImportSource(name=path.name, path=path)
    async with runtime.sessionmaker() as session:
        job = await create_job(
            session,
            source="legacy-stack",
            notify=False,
            actor="test",
            csv_profile=None,
            files=[source],
        )
        await session.commit()
    return await run_job(runtime, job.id, [source], batch_size=250)


async def reconcile(
    runtime: Runtime, *, requeue: bool = False, since: datetime | None = None
) -> rec.Report:
    clients = ehr_clients(runtime)
    try:
        target = runtime.profiles.current.ehr[TARGET]
        async with runtime.write_session() as session:
            report = await rec.reconcile(
                session,
                clients.client_for(target),
                target,
                runtime.profiles.current,
                provenance_tag_system=runtime.systems.provenance,
                since=since,
            )
            if requeue:
                await rec.requeue(session, target, report.items, now=runtime.clock.now())
            await session.commit()
        return report
    finally:
        await clients.aclose()


async def rows(runtime: Runtime, stmt: Any) -> list[Any]:
    async with runtime.sessionmaker() as session:
        return list((await session.execute(stmt)).all())


async def scalar(runtime: Runtime, stmt: Any) -> Any:
    async with runtime.sessionmaker() as session:
        return await session.scalar(stmt)


@pytest.mark.slow
async def test_phased_cutover_shadow_then_live_then_reconciled(
    client: httpx.AsyncClient,
    runtime: Runtime,
    ehr: tuple[LocalEhr, RunningEhr],
    admin_headers: dict[str, str],
    profiles_dir: Path,
    tmp_path: Path,
) -> None:
    fake, _ = ehr
    postgres = runtime.engine.dialect.name == "postgresql"
    n = int(RECORDS or ((2000 if IN_CI else 500) if postgres else 300))
    content, bad = history(n)
    path = tmp_path / "history.ndjson"
    path.write_bytes(content)

    # 1. shadow: everything maps and is compared with the EHR; nothing is written
    counts = await import_file(runtime, path)
    assert counts["read"] == n
    assert counts["refused"] == bad
    assert counts["mapped"] == n - bad
    worker = delivery_worker(runtime, concurrency=8)
    try:
        await drain(runtime, worker, rounds=2000)
        statuses = dict(
            await rows(runtime, select(Delivery.status, func.count()).group_by(Delivery.status))
        )
        assert statuses == {"shadowed": n - bad}, statuses
        assert fake.count("Patient") == 0
        creates = await scalar(
            runtime,
            select(func.count()).select_from(ShadowResult).where(ShadowResult.outcome == "create"),
        )
        assert creates > 0
        assert (
            await scalar(
                runtime,
                select(func.count())
                .select_from(ShadowResult)
                .where(ShadowResult.outcome != "create"),
            )
            == 0
        )
        targets = (await client.get("/v1/ops/targets", headers=admin_headers)).json()
        [mine] = [t for t in targets if t["name"] == TARGET]
        assert mine["mode"] == "shadow" and mine["shadow"] == {"create": creates}

        # 2. live: a profile change, audited
        profile_file = profiles_dir / "ehr" / f"{TARGET}.yaml"
        data = yaml.safe_load(profile_file.read_text())
        data["mode"] = "live"
        profile_file.write_text(yaml.safe_dump(data))
        r = await client.post("/v1/ops/profiles/reload", headers=admin_headers)
        assert r.status_code == 200, r.text
        modes = [
            detail
            for (detail,) in await rows(
                runtime,
                select(AuditEntry.detail)
                .where(AuditEntry.entity_type == "EhrTargetMode")
                .order_by(AuditEntry.id),
            )
        ]
        assert modes[-1]["mode"] == "live" and modes[-1]["from"] == "shadow"

        # 3. reconcile: every resource missing; requeued in one step and delivered
        report = await reconcile(runtime, requeue=True)
        summary = report.summary()
        assert summary["missing"] == summary["compared"] > 0
        assert summary["different"] == summary["ehr_only"] == 0
        await drain(runtime, worker, rounds=4000)
        patients = fake.count("Patient")
        assert patients == summary["by_resource_type"]["Patient"]["missing"]
        medication_requests = fake.count("MedicationRequest")

        # 4. the import again: all duplicates, nothing new queued or written
        before = await scalar(runtime, select(func.count()).select_from(Delivery))
        again = await import_file(runtime, path)
        assert again["duplicate"] == n - bad and again["mapped"] == 0
        assert await scalar(runtime, select(func.count()).select_from(Delivery)) == before
        await drain(runtime, worker)
        assert fake.count("Patient") == patients
        assert fake.count("MedicationRequest") == medication_requests

        # 5. the two sides agree
        report = await reconcile(runtime)
        assert report.summary()["mismatches"] == 0, report.summary()
        assert report.compared == summary["compared"]

        # 6. one resource edited in the EHR: exactly that difference
        before_edit = utcnow()
        edited = fake.resources("Patient")[0]
        old_family = edited["name"][0]["family"]
        edited["name"][0]["family"] = "Changed-In-EHR"
        fake.seed(edited)
        report = await reconcile(runtime)
        assert report.summary()["mismatches"] == 1
        [item] = report.items
        assert (item.kind, item.resource_type, item.remote_id) == (
            "different",
            "Patient",
            edited["id"],
        )
        assert item.diff == [{"op": "replace", "path": "/name/0/family", "value": old_family}]

        # 7. --since the edit: the gateway changed nothing since, and the EHR's edited
        # Patient is one of ours (older), not a resource only the EHR has
        report = await reconcile(runtime, since=before_edit)
        assert report.summary()["mismatches"] == 0, report.summary()
    finally:
        await worker.aclose()


@pytest.mark.slow
async def test_shadow_records_an_update_with_its_diff_and_reconcile_runs_as_an_api_job(
    client: httpx.AsyncClient,
    runtime: Runtime,
    ehr: tuple[LocalEhr, RunningEhr],
    admin_headers: dict[str, str],
) -> None:
    from gateway.ops.reconciliation import wait_for_jobs

    fake, _ = ehr
    checkout = samples.canonical_checkout()
    r = await client.post("/v1/checkouts", json=checkout, headers=admin_headers)
    assert r.status_code == 202, r.text
    # the EHR already holds the patient (same business identifier), with another phone
    async with runtime.sessionmaker() as session:
        from gateway.db.models import FhirResource

        patient = (
            await session.scalars(
                select(FhirResource).where(FhirResource.resource_type == "Patient")
            )
        ).one()
    legacy = {k: v for k, v in patient.resource.items() if k not in ("id", "meta")}
    legacy["telecom"] = [{"system": "phone", "value": "+14155550000", "use": "mobile"}]
    fake.seed(legacy)
    worker = delivery_worker(runtime)
    try:
        await drain(runtime, worker)
    finally:
        await worker.aclose()
    assert fake.count("MedicationRequest") == 0  # shadow: nothing written
    r = await client.get(
        f"/v1/ops/targets/{TARGET}/shadow", params={"outcome": "update"}, headers=admin_headers
    )
    [update] = r.json()
    assert update["resource"] == f"Patient/{patient.id}"
    assert update["diff"] and all(op["path"].startswith("/telecom") for op in update["diff"])
    outcomes = {
        x["outcome"]
        for x in (
            await client.get(f"/v1/ops/targets/{TARGET}/shadow", headers=admin_headers)
        ).json()
    }
    assert outcomes == {"create", "update"}

    r = await client.post(f"/v1/ops/targets/{TARGET}/reconcile", headers=admin_headers)
    assert r.status_code == 202, r.text
    await wait_for_jobs()
    job = (await client.get(r.headers["Location"], headers=admin_headers)).json()
    assert job["status"] == "completed", job
    assert job["summary"]["different"] == 1  # the Patient
    assert job["summary"]["missing"] == 1  # the MedicationRequest
    csv_text = (
        await client.get(r.headers["Location"], params={"format": "csv"}, headers=admin_headers)
    ).text
    assert csv_text.splitlines()[0] == "kind,resource_type,resource,identifier,remote_id,diff"
    assert len(csv_text.splitlines()) == 3
