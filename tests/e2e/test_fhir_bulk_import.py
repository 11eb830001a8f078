"""End to end (issue 16): a FHIR Bulk Data export imported and delivered to a local real
FHIR server (Medplum): the EHR gets each Patient once, and the QuestionnaireResponses and
MedicationRequests refer to the EHR's own Patient ids."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.imports.service import ImportSource, create_job, run_job
from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests.support.delivery import drain
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV, profiles_with_target

EXPORT = Path(__file__).resolve().parents[2] / "examples" / "fhir-bulk-export"


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
    return profiles_with_target(tmp_path / "profiles", ehr[1])


async def test_an_imported_export_reaches_the_ehr_with_its_references(
    runtime: Runtime, ehr: tuple[LocalEhr, RunningEhr]
) -> None:
    fake, _ = ehr
    names = ("MedicationRequest", "QuestionnaireResponse", "Patient")
    sources = [ImportSource(name=n, path=EXPORT / f"{n}.ndjson") for n in names]
    async with runtime.sessionmaker() as session:
        job = await create_job(
            session, source="old-emr", notify=False, actor="test", csv_profile=None, files=sources
        )
        await session.commit()
    counts = await run_job(runtime, job.id, sources)
    assert (counts["mapped"], counts["refused"]) == (6, 0)

    worker = delivery_worker(runtime)
    try:
        await drain(runtime, worker)
    finally:
        await worker.aclose()
    patients = fake.resources("Patient")
    assert len(patients) == 2
    ehr_ids = {p["id"] for p in patients}
    for rtype in ("QuestionnaireResponse", "MedicationRequest"):
        delivered = fake.resources(rtype)
        assert len(delivered) == 2
        assert {r["subject"]["reference"].split("/")[-1] for r in delivered} == ehr_ids
    [mr] = [m for m in fake.resources("MedicationRequest") if m["status"] == "active"]
    assert mr["requester"]["identifier"]["value"] == "prac-7"  # a logical reference
