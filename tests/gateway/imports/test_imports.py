"""Bulk backfill (issue 16): NDJSON and CSV through the live channels, idempotent,
resumable, with migrated Provenance and suppressed webhooks."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from gateway.db.models import Case, Delivery, FhirResource, ImportFile, InboundMessage, Subscriber
from gateway.imports import repository as repo
from gateway.imports.readers import file_sha256
from gateway.imports.service import (
    ImportFileError,
    ImportSource,
    create_job,
    find_resumable,
    run_job,
)
from gateway.imports.uploads import wait_for_uploads
from gateway.runtime import Runtime
from gateway.subscribers.service import new_secret
from tests import samples


def mixed_records() -> tuple[list[bytes], int]:
    """8 lines: 3 intakes, 2 canonical checkouts, 1 Stripe event, 1 line that is not
    JSON, 1 intake that does not validate. Returns (lines, bad lines)."""
    good: list[dict[str, Any]] = [samples.intake() for _ in range(3)]
    good += [samples.canonical_checkout() for _ in range(2)]
    good.append(samples.stripe_event())
    bad_intake = samples.intake()
    bad_intake["patient"]["birth_date"] = "not a date"
    lines = [json.dumps(r).encode() for r in good]
    lines.insert(2, b"{not json")
    lines.append(json.dumps(bad_intake).encode())
    return lines, 2


def write_ndjson(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


async def run_file(
    runtime: Runtime, path: Path, *, batch_size: int = 3, **job: Any
) -> tuple[str, dict[str, int]]:
    source = ImportSource(name=path.name, path=path)
    async with runtime.sessionmaker() as session:
        created = await create_job(
            session,
            source=job.get("source", "legacy-crm"),
            notify=job.get("notify", False),
            actor="test",
            csv_profile=job.get("csv_profile"),
            files=[source],
        )
        await session.commit()
        job_id = created.id
    counts = await run_job(runtime, job_id, [source], batch_size=batch_size)
    return job_id, counts


async def count(runtime: Runtime, model: Any, *where: Any) -> int:
    async with runtime.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def test_mixed_ndjson_is_imported_and_rerun_makes_no_duplicates(
    runtime: Runtime, tmp_path: Path
) -> None:
    lines, bad = mixed_records()
    path = write_ndjson(tmp_path / "history.ndjson", lines)
    job_id, counts = await run_file(runtime, path)
    assert counts["read"] == 8
    assert counts["refused"] == bad
    assert counts["mapped"] == 6
    assert counts["duplicate"] == 0
    resources = await count(runtime, FhirResource)
    messages = await count(runtime, InboundMessage, InboundMessage.principal == f"import:{job_id}")
    assert messages == 6

    async with runtime.sessionmaker() as session:
        refused = await repo.refusals(session, job_id)
    assert [(r.line, r.kind) for r in refused] == [(3, None), (8, "intake")]
    assert refused[1].problems[0]["location"].startswith("patient.birth_date")
    assert "not a date" not in json.dumps(refused[1].problems)  # problems never hold values

    _, again = await run_file(runtime, path)
    assert again["duplicate"] == 6 and again["mapped"] == 0 and again["refused"] == bad
    assert await count(runtime, FhirResource) == resources


async def test_provenance_says_migrated_from_the_source_with_the_original_time(
    runtime: Runtime, tmp_path: Path
) -> None:
    intake = samples.intake()
    path = write_ndjson(tmp_path / "one.ndjson", [json.dumps(intake).encode()])
    await run_file(runtime, path, source="old-emr")
    async with runtime.sessionmaker() as session:
        rows = (
            await session.scalars(
                select(FhirResource).where(FhirResource.resource_type == "Provenance")
            )
        ).all()
    [prov] = [r.resource for r in rows]
    assert prov["occurredDateTime"] == "2026-11-23T14:00:00-05:00"  # as submitted
    assert {"system": "https://fhir-gateway.example.org/sid/migration", "code": "migrated"} in [
        {k: t[k] for k in ("system", "code")} for t in prov["meta"]["tag"]
    ]
    sources = [e["what"]["identifier"]["value"] for e in prov["entity"]]
    assert "old-emr" in sources
    assert "urn:fhir-gateway:migration:old-emr" in prov["policy"]


async def test_case_webhooks_are_recorded_not_sent_unless_notify(
    runtime: Runtime, tmp_path: Path
) -> None:
    async with runtime.sessionmaker() as session:
        session.add(
            Subscriber(
                name="crm", url="http://127.0.0.1:9/hook", secret=new_secret(), event_types=["*"]
            )
        )
        await session.commit()
    quiet = write_ndjson(tmp_path / "a.ndjson", [json.dumps(samples.intake()).encode()])
    _, counts = await run_file(runtime, quiet)
    assert counts["suppressed_webhooks"] == 1
    assert (
        await count(runtime, Delivery, Delivery.kind == "webhook", Delivery.status == "pending")
        == 0
    )

    async with runtime.sessionmaker() as session:  # a historical case runs no SLA timer
        [case] = (await session.scalars(select(Case))).all()
        assert case.sla_due_at is None and case.sla_timer is None

    loud = write_ndjson(tmp_path / "b.ndjson", [json.dumps(samples.intake()).encode()])
    _, counts = await run_file(runtime, loud, notify=True)
    assert counts["suppressed_webhooks"] == 0
    async with runtime.sessionmaker() as session:  # live side effects: its timer runs
        timers = (await session.scalars(select(Case.sla_timer).where(Case.id != case.id))).all()
        assert timers == ["intake_not_delivered"]
    assert (
        await count(runtime, Delivery, Delivery.kind == "webhook", Delivery.status == "pending")
        == 1
    )


async def test_an_interrupted_import_resumes_at_its_cursor(
    runtime: Runtime, tmp_path: Path
) -> None:
    lines, _ = mixed_records()
    path = write_ndjson(tmp_path / "history.ndjson", lines)
    source = ImportSource(name=path.name, path=path)
    async with runtime.sessionmaker() as session:
        job = await create_job(
            session, source="x", notify=False, actor="t", csv_profile=None, files=[source]
        )
        await session.commit()
        job_id = job.id

    class Crash(Exception):
        pass

    def crash(*_: Any) -> None:
        raise Crash

    with pytest.raises(Crash):  # dies after the first committed batch of 3
        await run_job(runtime, job_id, [source], batch_size=3, on_progress=crash)
    async with runtime.sessionmaker() as session:
        [row] = await repo.job_files(session, job_id)
        assert row.cursor == sum(len(line) + 1 for line in lines[:3])
        assert (await find_resumable(session, [file_sha256(path)])).id == job_id  # type: ignore[union-attr]
    counts = await run_job(runtime, job_id, [source], batch_size=3)
    assert counts["read"] == 8  # not 11: the first batch was not read again
    assert counts["mapped"] + counts["refused"] == 8 and counts["duplicate"] == 0
    async with runtime.sessionmaker() as session:
        assert (await session.get(ImportFile, row.id)).status == "completed"  # type: ignore[union-attr]


async def test_csv_rows_map_through_the_import_profile(runtime: Runtime, tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    columns = [
        "order_id",
        "paid_at",
        "plan",
        "payment_status",
        "amount_cents",
        "name",
        "email",
        "phone",
        "street",
        "city",
        "state",
        "zip",
        "patient_id",
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerow(
            [
                "ord-1",
                "2025-03-01T10:00:00Z",
                "glp1-semaglutide-starter",
                "paid",
                "29900",
                "Avery Stone",
                "avery@example.com",
                "415-555-2671",
                "1 Main St",
                "Austin",
                "TX",
                "78701",
                "pt-csv-1",
            ]
        )
        writer.writerow(
            [
                "ord-2",
                "2025-03-02T10:00:00Z",
                "no-such-plan",
                "paid",
                "abc",
                "Bo Lee",
                "bo@example.com",
                "",
                "",
                "",
                "",
                "",
                "pt-csv-2",
            ]
        )
    job_id, counts = await run_file(runtime, path, csv_profile="legacy-checkouts-csv")
    assert (counts["read"], counts["mapped"], counts["refused"]) == (2, 1, 1)
    async with runtime.sessionmaker() as session:
        [refused] = await repo.refusals(session, job_id)
    assert refused.line == 3 and refused.problems[0]["code"] == "invalid_integer"
    _, again = await run_file(runtime, path, csv_profile="legacy-checkouts-csv")
    assert again["duplicate"] == 1


async def test_api_job_with_counts_and_refusals_as_ndjson(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    lines, bad = mixed_records()
    r = await client.post(
        "/v1/imports",
        params={"source": "legacy-crm"},
        content=b"\n".join(lines),
        headers={**admin_headers, "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    await wait_for_uploads()
    r = await client.get(f"/v1/imports/{job['id']}", headers=admin_headers)
    body = r.json()
    assert body["status"] == "completed"
    assert body["counts"]["read"] == 8 and body["counts"]["refused"] == bad
    assert body["counts"]["delivered"] == 0  # no EHR target enabled
    r = await client.get(f"/v1/imports/{job['id']}/refusals", headers=admin_headers)
    assert r.headers["content-type"].startswith("application/x-ndjson")
    refused = [json.loads(line) for line in r.text.splitlines()]
    assert [x["line"] for x in refused] == [3, 8]
    assert refused[1]["record"]["patient"]["birth_date"] == "not a date"  # to fix and re-import
    r = await client.post(
        "/v1/imports",
        content=b"a,b\n1,2\n",
        headers={**admin_headers, "Content-Type": "text/csv"},
    )
    assert r.status_code == 422


async def test_a_stripe_event_that_does_not_map_is_refused_not_kept_failed(
    runtime: Runtime, tmp_path: Path
) -> None:
    event = samples.stripe_event()
    event["data"]["object"]["metadata"] = {"plan": "no-such-plan"}
    path = write_ndjson(tmp_path / "stripe.ndjson", [json.dumps(event).encode()])
    job_id, counts = await run_file(runtime, path)
    assert (counts["refused"], counts["mapped"]) == (1, 0)
    assert await count(runtime, InboundMessage) == 0  # nothing half stored: fix and re-import
    async with runtime.sessionmaker() as session:
        [refused] = await repo.refusals(session, job_id)
    assert refused.kind == "stripe" and refused.business_id == event["id"]


async def test_resuming_a_completed_api_job_is_a_conflict(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.post(
        "/v1/imports",
        content=json.dumps(samples.intake()).encode(),
        headers={**admin_headers, "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 202, r.text
    await wait_for_uploads()
    r = await client.post(f"/v1/imports/{r.json()['id']}/resume", headers=admin_headers)
    assert r.status_code == 409
    assert r.headers["content-type"].startswith("application/problem+json")


def test_csv_rows_that_cannot_be_read_are_refused_and_reading_goes_on(tmp_path: Path) -> None:
    """A row in Latin-1, a row with an unquoted comma (one cell too many), a row the csv
    module refuses (a cell over its 128 kB limit): each refused with its code, the good
    rows read."""
    from gateway.imports.readers import read_csv
    from gateway.settings import BUNDLED_PROFILES_DIR
    from mappers.profiles import load_profiles

    profile = load_profiles(BUNDLED_PROFILES_DIR).by_kind["import"]["legacy-checkouts-csv"]
    header = (
        "order_id,paid_at,plan,payment_status,amount_cents,name,email,phone,street,city,"
        "state,zip,patient_id\n"
    )
    good = "ord-{n},2025-03-01T10:00:00Z,glp1-semaglutide-starter,paid,29900,Avery Stone,"
    good += "avery@example.com,415-555-2671,1 Main St,Austin,TX,78701,pt-{n}\n"
    content = header.encode() + good.format(n=1).encode()
    content += good.format(n=2).replace("Avery Stone", "Zoë Stone").encode("latin-1")
    content += good.format(n=3).replace("Avery Stone", "Stone, Jr").encode()
    content += good.format(n=4).replace("Avery", "A" * 140_000).encode()
    content += good.format(n=5).encode()
    path = tmp_path / "orders.csv"
    path.write_bytes(content)
    records = list(read_csv(path, profile))  # type: ignore[arg-type]
    assert [(r.line, [p.code for p in r.problems]) for r in records] == [
        (2, []),
        (3, ["invalid_encoding"]),
        (4, ["column_count"]),
        (5, ["invalid_csv"]),
        (6, []),
    ]
    assert records[-1].end == len(content)  # the cursor after the last row


async def test_a_file_changed_since_the_job_started_is_refused(
    runtime: Runtime, tmp_path: Path
) -> None:
    """A run checks each file against the digest the job recorded: the digest the caller
    computed for this run (``ImportSource.sha256``, as the CLI gives it) or, without one,
    a fresh read of the file. A changed file is refused; nothing is imported."""
    lines, _ = mixed_records()
    path = write_ndjson(tmp_path / "history.ndjson", lines)
    jobs = []
    async with runtime.sessionmaker() as session:
        for _ in range(2):
            job = await create_job(
                session,
                source="legacy-crm",
                notify=False,
                actor="test",
                csv_profile=None,
                files=[ImportSource(name=path.name, path=path)],
            )
            jobs.append(job.id)
        await session.commit()
    write_ndjson(path, lines[:2])  # edited before the runs
    given = [
        ImportSource(name=path.name, path=path),  # read again
        ImportSource(name=path.name, path=path, sha256=file_sha256(path)),  # the CLI's
    ]
    for job_id, source in zip(jobs, given, strict=True):
        with pytest.raises(ImportFileError, match="changed since the job started"):
            await run_job(runtime, job_id, [source], batch_size=3)
    assert await count(runtime, InboundMessage) == 0
