"""End to end: two intakes for the same person with a typo in the surname, the merge
review, accept, the update delivered to a local test EHR (a real FHIR server), and a
clinical event sent with the merged record's identifier landing on the survivor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests import samples
from tests.support.delivery import drain
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV, profiles_with_target

EXTERNAL = "https://fhir-gateway.example.org/sid/external-patient-id"
OWN = "https://fhir-gateway.example.org/sid/patient-id"


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


@pytest.mark.slow
async def test_typo_duplicate_reviewed_accepted_sent_to_the_ehr_and_events_follow(
    client: httpx.AsyncClient,
    runtime: Runtime,
    ehr: tuple[LocalEhr, RunningEhr],
    admin_headers: dict[str, str],
) -> None:
    fake, _ = ehr
    worker = delivery_worker(runtime)
    try:
        first = samples.intake()
        second = samples.intake()
        second["patient"]["last_name"] = "Rivira"
        ids = []
        for body in (first, second):
            r = await client.post("/v1/intake-submissions", json=body, headers=admin_headers)
            assert r.status_code == 202, r.text
            ids.append(r.json()["patient"]["id"])
        await drain(runtime, worker)
        assert fake.count("Patient") == 2
        old, new = ids

        (item,) = (await client.get("/v1/patients/review", headers=admin_headers)).json()["items"]
        assert {item["patient"]["id"], item["candidate"]["id"]} == {old, new}
        r = await client.post(
            f"/v1/patients/review/{item['id']}/accept",
            json={"reason": "same person: surname typo, same birth date and phone"},
            headers=admin_headers,
        )
        assert r.status_code == 200, r.text
        assert [d["target"] for d in r.json()["deliveries"]] == ["test-ehr"]
        await drain(runtime, worker)

        in_ehr = {
            next(i["value"] for i in p["identifier"] if i["system"] == OWN): p
            for p in fake.resources("Patient")
        }
        assert in_ehr[new]["active"] is False
        assert in_ehr[new]["link"][0]["type"] == "replaced-by"
        assert in_ehr[old]["link"][0]["type"] == "replaces"
        assert fake.count("Patient") == 2  # updated, not created again

        event = {
            "event_id": "ehr-after-merge",
            "source": "ehr",
            "type": "provider_assigned",
            "occurred_at": "2026-11-24T10:00:00Z",
            "patient": {"system": EXTERNAL, "value": second["patient"]["external_id"]},
        }
        r = await client.post("/v1/events", json=event, headers=admin_headers)
        assert r.status_code == 202, r.text
        cases = (
            await client.get("/v1/cases", params={"patient": f"{OWN}|{old}"}, headers=admin_headers)
        ).json()
        assert any(e["event_id"] == "ehr-after-merge" for c in cases for e in c["history"]), cases
    finally:
        await worker.aclose()
