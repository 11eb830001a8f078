"""Importing a FHIR Bulk Data export (issue 16): Patient, QuestionnaireResponse and
MedicationRequest NDJSON files through the live storage, Patients first, references
rewritten, idempotent, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from gateway.db.models import Delivery, FhirResource, InboundMessage
from gateway.imports import repository as repo
from gateway.imports.service import ImportSource, create_job, run_job
from gateway.imports.uploads import wait_for_uploads
from gateway.runtime import Runtime
from gateway.settings import BUNDLED_PROFILES_DIR
from tests import samples
from tests.gateway.imports.test_imports import count

EXPORT = Path(__file__).resolve().parents[3] / "examples" / "fhir-bulk-export"
BASE = "https://fhir-gateway.example.org/sid"
LEGACY_PATIENT = f"{BASE}/migrated-id/old-emr/Patient"
MRN = "http://old-emr.example.org/fhir/sid/mrn"


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    """The bundled profiles plus one enabled EHR target (nothing is sent: no worker)."""
    dest = Path(shutil.copytree(BUNDLED_PROFILES_DIR, tmp_path / "profiles"))
    (dest / "ehr" / "ehr-a.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "ehr",
                "name": "ehr-a",
                "base_url": "http://127.0.0.1:9/fhir",
                "auth": {"method": "none"},
            }
        )
    )
    return dest


def export_with_bad_lines(root: Path) -> dict[str, Path]:
    """The example export, each file with one bad line added: a Patient that does not
    validate, a QuestionnaireResponse about a Patient the export does not hold, an
    Observation (not imported)."""
    root.mkdir(exist_ok=True)
    bad = {
        "Patient": {
            "resourceType": "Patient",
            "id": "pat-bad",
            "identifier": [{"system": MRN, "value": "MRN-10009"}],
            "name": [{"family": "Example"}],
            "gender": "femme",
            "birthDate": "1990-13-45",
        },
        "QuestionnaireResponse": {
            "resourceType": "QuestionnaireResponse",
            "id": "qr-orphan",
            "status": "completed",
            "subject": {"reference": "Patient/pat-404"},
        },
        "MedicationRequest": {
            "resourceType": "Observation",
            "id": "obs-1",
            "status": "final",
            "code": {"text": "Body weight"},
        },
    }
    files = {}
    for name, line in bad.items():
        text = (EXPORT / f"{name}.ndjson").read_text() + json.dumps(line) + "\n"
        files[name] = root / f"{name}.ndjson"
        files[name].write_text(text)
    return files


async def import_files(
    runtime: Runtime, paths: list[Path], *, batch_size: int = 2, source: str = "old-emr"
) -> tuple[str, dict[str, int]]:
    sources = [ImportSource(name=p.name, path=p) for p in paths]
    async with runtime.sessionmaker() as session:
        job = await create_job(
            session, source=source, notify=False, actor="test", csv_profile=None, files=sources
        )
        await session.commit()
        job_id = job.id
    return job_id, await run_job(runtime, job_id, sources, batch_size=batch_size)


async def resources(runtime: Runtime, rtype: str) -> list[dict[str, Any]]:
    async with runtime.sessionmaker() as session:
        rows = await session.scalars(
            select(FhirResource).where(FhirResource.resource_type == rtype)
        )
        return [r.resource for r in rows]


async def test_an_export_given_in_any_order_imports_patients_first(
    runtime: Runtime, tmp_path: Path
) -> None:
    files = export_with_bad_lines(tmp_path / "export")
    order = [files["MedicationRequest"], files["QuestionnaireResponse"], files["Patient"]]
    job_id, counts = await import_files(runtime, order)
    assert (counts["read"], counts["mapped"], counts["refused"]) == (9, 6, 3)

    async with runtime.sessionmaker() as session:
        refused = {r.file: r for r in await repo.refusals(session, job_id)}
    assert next(f.name for f in await _job_files(runtime, job_id)) == "Patient.ndjson"
    bad_patient = {p["location"]: p["code"] for p in refused["Patient.ndjson"].problems}
    assert "Patient.gender" in bad_patient and any(
        k.startswith("Patient.birthDate") for k in bad_patient
    )
    [orphan] = refused["QuestionnaireResponse.ndjson"].problems
    assert orphan["code"] == "unknown_patient" and "import the Patient file" in orphan["message"]
    [observation] = refused["MedicationRequest.ndjson"].problems
    assert (
        observation["code"] == "unsupported_resource_type"
        and "Observation" in observation["message"]
    )
    assert refused["MedicationRequest.ndjson"].kind == "fhir"

    patients = {
        next(i["value"] for i in p["identifier"] if i["system"] == LEGACY_PATIENT): p
        for p in await resources(runtime, "Patient")
    }
    assert set(patients) == {"pat-1", "pat-2"}
    peter = patients["pat-1"]
    assert {"system": MRN, "value": "MRN-10001"} in peter["identifier"]
    assert {"system": f"{BASE}/patient-id", "value": peter["id"]} in peter["identifier"]
    assert peter["telecom"][0]["value"] == "+14155550132"  # normalized as live intake does
    assert peter["telecom"][1]["value"] == "peter.chalmers@example.com"
    assert peter["address"][0]["state"] == "CA"
    assert peter["meta"]["versionId"] == "1"  # the gateway's version, not the old server's "3"

    by_subject = {
        q["subject"]["reference"]: q for q in await resources(runtime, "QuestionnaireResponse")
    }
    assert set(by_subject) == {
        f"Patient/{patients['pat-1']['id']}",
        f"Patient/{patients['pat-2']['id']}",
    }
    qr1 = by_subject[f"Patient/{peter['id']}"]
    assert qr1["author"] == {"reference": f"Patient/{peter['id']}"}
    assert qr1["identifier"] == {
        "system": f"{BASE}/migrated-id/old-emr/QuestionnaireResponse",
        "value": "qr-1",
    }
    [mr1] = [m for m in await resources(runtime, "MedicationRequest") if m["status"] == "active"]
    assert mr1["subject"]["reference"] == f"Patient/{peter['id']}"
    assert mr1["requester"] == {  # the old system's Practitioner, as a logical reference
        "display": "Dr. Adam Careful",
        "type": "Practitioner",
        "identifier": {"system": f"{BASE}/migrated-id/old-emr/Practitioner", "value": "prac-7"},
    }

    provenances = await resources(runtime, "Provenance")
    assert len(provenances) == 6
    [qr_prov] = [
        p
        for p in provenances
        if p["target"][0]["reference"] == f"QuestionnaireResponse/{qr1['id']}"
    ]
    assert qr_prov["occurredDateTime"] == "2024-02-10T14:20:00-08:00"  # authored
    assert "urn:fhir-gateway:migration:old-emr" in qr_prov["policy"]
    ehr_rows = await count(runtime, Delivery, Delivery.kind == "ehr", Delivery.target == "ehr-a")
    assert ehr_rows == 6  # one outbox row per stored resource's message, like live traffic


async def _job_files(runtime: Runtime, job_id: str) -> list[Any]:
    async with runtime.sessionmaker() as session:
        return list(await repo.job_files(session, job_id))


async def test_a_rerun_is_all_duplicates_and_writes_nothing(
    runtime: Runtime, tmp_path: Path
) -> None:
    files = export_with_bad_lines(tmp_path / "export")
    await import_files(runtime, list(files.values()))
    stored = await count(runtime, FhirResource)
    deliveries = await count(runtime, Delivery)
    _, again = await import_files(runtime, list(files.values()))
    assert (again["duplicate"], again["mapped"], again["refused"]) == (6, 0, 3)
    assert await count(runtime, FhirResource) == stored
    assert await count(runtime, Delivery) == deliveries


async def test_a_record_about_a_patient_not_yet_imported_is_imported_on_a_rerun(
    runtime: Runtime, tmp_path: Path
) -> None:
    qr_file = EXPORT / "QuestionnaireResponse.ndjson"
    _, first = await import_files(runtime, [qr_file])
    assert (first["mapped"], first["refused"]) == (0, 2)
    await import_files(runtime, [EXPORT / "Patient.ndjson"])
    _, again = await import_files(runtime, [qr_file])
    assert (again["mapped"], again["refused"]) == (2, 0)


async def test_a_patient_the_gateway_knows_is_not_duplicated(
    runtime: Runtime, client: httpx.AsyncClient, admin_headers: dict[str, str], tmp_path: Path
) -> None:
    intake = samples.intake()
    r = await client.post("/v1/intake-submissions", json=intake, headers=admin_headers)
    assert r.status_code == 202, r.text
    live_id = r.json()["patient"]["id"]
    exported = json.loads((EXPORT / "Patient.ndjson").read_text().splitlines()[0])
    exported["telecom"] = [{"system": "email", "value": intake["patient"]["email"].upper()}]
    path = tmp_path / "Patient.ndjson"
    path.write_text(json.dumps(exported) + "\n")
    _, counts = await import_files(runtime, [path])
    assert counts["mapped"] == 1
    [patient] = await resources(runtime, "Patient")
    assert patient["id"] == live_id
    assert {"system": LEGACY_PATIENT, "value": "pat-1"} in patient["identifier"]
    assert patient["name"][0]["family"] == intake["patient"]["last_name"]  # live data kept

    qr = json.loads((EXPORT / "QuestionnaireResponse.ndjson").read_text().splitlines()[0])
    qr_path = tmp_path / "QuestionnaireResponse.ndjson"
    qr_path.write_text(json.dumps(qr) + "\n")
    await import_files(runtime, [qr_path])  # found again through the old id
    [migrated] = [
        q
        for q in await resources(runtime, "QuestionnaireResponse")
        if "authored" in q and q["authored"].startswith("2024")
    ]
    assert migrated["subject"]["reference"] == f"Patient/{live_id}"


async def test_another_resource_under_an_imported_business_id_is_refused(
    runtime: Runtime, tmp_path: Path
) -> None:
    await import_files(runtime, [EXPORT / "Patient.ndjson"])
    changed = json.loads((EXPORT / "Patient.ndjson").read_text().splitlines()[1])
    changed["gender"] = "other"
    path = tmp_path / "Patient.ndjson"
    path.write_text(json.dumps(changed) + "\n")
    job_id, counts = await import_files(runtime, [path])
    assert counts["refused"] == 1
    async with runtime.sessionmaker() as session:
        [refused] = await repo.refusals(session, job_id)
    assert refused.problems[0]["code"] == "changed_since_import"
    assert refused.business_id == f"{MRN}|MRN-10002"


async def test_an_interrupted_export_import_resumes_at_its_cursor(
    runtime: Runtime, tmp_path: Path
) -> None:
    files = export_with_bad_lines(tmp_path / "export")
    sources = [ImportSource(name=p.name, path=p) for p in files.values()]
    async with runtime.sessionmaker() as session:
        job = await create_job(
            session, source="old-emr", notify=False, actor="t", csv_profile=None, files=sources
        )
        await session.commit()
        job_id = job.id

    class Crash(Exception):
        pass

    def crash(*_: Any) -> None:
        raise Crash

    with pytest.raises(Crash):  # dies after the first batch of 2 Patients
        await run_job(runtime, job_id, sources, batch_size=2, on_progress=crash)
    counts = await run_job(runtime, job_id, sources, batch_size=2)
    assert (counts["read"], counts["mapped"], counts["refused"], counts["duplicate"]) == (
        9,
        6,
        3,
        0,
    )
    assert await count(runtime, InboundMessage, InboundMessage.channel == "fhir-import") == 6


async def test_api_imports_the_patient_file_then_the_others(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    headers = {**admin_headers, "Content-Type": "application/fhir+ndjson"}
    jobs = []
    for name in ("Patient", "MedicationRequest"):
        r = await client.post(
            "/v1/imports",
            params={"source": "old-emr"},
            content=(EXPORT / f"{name}.ndjson").read_bytes(),
            headers=headers,
        )
        assert r.status_code == 202, r.text
        await wait_for_uploads()
        jobs.append(r.json()["id"])
    for job_id in jobs:
        body = (await client.get(f"/v1/imports/{job_id}", headers=admin_headers)).json()
        assert body["status"] == "completed"
        assert (body["counts"]["mapped"], body["counts"]["refused"]) == (2, 0)


async def test_two_exported_patients_sharing_an_email_stay_two(
    runtime: Runtime, tmp_path: Path
) -> None:
    parent, child = (json.loads(x) for x in (EXPORT / "Patient.ndjson").read_text().splitlines())
    child["telecom"] = [{"system": "email", "value": "peter.chalmers@example.com"}]
    path = tmp_path / "Patient.ndjson"
    path.write_text(json.dumps(parent) + "\n" + json.dumps(child) + "\n")
    _, counts = await import_files(runtime, [path])
    assert counts["mapped"] == 2
    assert len(await resources(runtime, "Patient")) == 2
