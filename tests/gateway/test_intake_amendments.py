"""Corrections of an intake (same ``submission_id``, different content) and a
``submission_id`` reused for another patient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.db.models import Delivery, ExceptionRecord, FhirResource
from gateway.runtime import Runtime
from gateway.settings import BUNDLED_PROFILES_DIR
from tests import samples
from tests.support.api import count, rows


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    """The bundled profiles plus one enabled EHR target (nothing is sent: no worker)."""
    import shutil

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


async def post(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> httpx.Response:
    return await client.post("/v1/intake-submissions", json=body, headers=headers)


async def test_a_correction_amends_the_questionnaire_response_and_is_delivered_again(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    first_body = samples.intake()
    first = await post(client, admin_headers, first_body)
    assert first.status_code == 202, first.text
    assert [d["target"] for d in first.json()["deliveries"]] == ["ehr-a"]
    qr_ref = next(
        r["reference"]
        for r in first.json()["resources"]
        if r["resourceType"] == "QuestionnaireResponse"
    )

    corrected = {**first_body, "answers": {**first_body["answers"], "weight_lb": 205}}
    second = await post(client, admin_headers, corrected)
    assert second.status_code == 202, second.text
    out = second.json()
    assert out["status"] == "amended"
    assert out["message_id"] == first.json()["message_id"]
    # only the weight changed: the Patient is not written again; the weight and BMI
    # Observations derived from it are
    assert sorted(r["resourceType"] for r in out["resources"]) == [
        "Observation",
        "Observation",
        "Provenance",
        "QuestionnaireResponse",
    ]
    assert qr_ref in [r["reference"] for r in out["resources"]]

    r = await client.get(f"/fhir/{qr_ref}", headers=admin_headers)
    qr = r.json()
    assert qr["status"] == "amended"
    assert qr["meta"]["versionId"] == "2"
    assert r.headers["etag"] == 'W/"2"'
    weight = next(i for i in qr["item"] if i["linkId"] == "body-weight")
    assert weight["answer"][0]["valueQuantity"]["value"] == 205

    (new_delivery,) = out["deliveries"]
    assert new_delivery["id"] != first.json()["deliveries"][0]["id"]
    deliveries = await rows(runtime, Delivery, order_by=Delivery.id)
    assert len(deliveries) == 2
    assert qr_ref in deliveries[1].resource_refs
    assert deliveries[1].resource_refs[0] == first.json()["patient"]["reference"]


async def test_the_message_counts_the_revision(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = samples.intake()
    first = await post(client, admin_headers, body)
    await post(client, admin_headers, {**body, "answers": {**body["answers"], "allergies": "none"}})
    status = await client.get(f"/v1/messages/{first.json()['message_id']}", headers=admin_headers)
    assert status.json()["revision"] == 2
    assert len(status.json()["deliveries"]) == 2


async def test_the_same_submission_again_is_not_delivered_again(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    body = samples.intake()
    await post(client, admin_headers, body)
    again = await post(client, admin_headers, body)
    assert again.json()["replayed"] is True
    assert await count(runtime, Delivery) == 1


async def test_a_submission_id_reused_for_another_known_patient_is_409(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    first, other = samples.intake(), samples.intake()
    await post(client, admin_headers, first)
    await post(client, admin_headers, other)
    before = await count(runtime, FhirResource)
    reused = {**other, "submission_id": first["submission_id"]}
    r = await post(client, admin_headers, reused)
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["code"] == "submission_patient_changed"
    assert await count(runtime, FhirResource) == before
    records = await rows(runtime, ExceptionRecord)
    assert [(e.kind, e.problems[0]["code"]) for e in records] == [
        ("rejected_input", "submission_patient_changed")
    ]


async def test_a_submission_id_reused_for_a_new_patient_is_409(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    first = samples.intake()
    created = await post(client, admin_headers, first)
    patient_ref = created.json()["patient"]["reference"]
    stranger = samples.intake(submission_id=first["submission_id"])  # new external id and email
    stranger["patient"]["first_name"] = "Alex"
    r = await post(client, admin_headers, stranger)
    assert r.status_code == 409, r.text
    patient = (await client.get(f"/fhir/{patient_ref}", headers=admin_headers)).json()
    assert patient["name"][0]["given"] == ["Jordan"]
    assert patient["meta"]["versionId"] == "1"
    assert [i["value"] for i in patient["identifier"] if "external" in i["system"]] == [
        first["patient"]["external_id"]
    ]
