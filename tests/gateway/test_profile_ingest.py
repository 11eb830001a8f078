"""Ingest with profiles: derived resources, the profile that produced every version,
ownership conflicts kept, corrected submissions retiring what no longer applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.db.models import FhirResource, PatientConflict, ProfileMapping
from gateway.runtime import Runtime
from tests import samples
from tests.conftest import ApiKeyFactory
from tests.support.profiles import PROCESSORS, copy_profiles, edit_yaml


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    root = copy_profiles(tmp_path / "profiles")
    # This deployment's checkout owns the phone number (the intake then must not).
    edit_yaml(root / PROCESSORS, lambda d: d["patient"].update(owns=["telecom.phone"]))
    for form in ("glp1-weight-management-v1", "glp1-weight-management-v2"):
        edit_yaml(
            root / f"intake/{form}.yaml",
            lambda d: d["patient"].update(
                owns=["name", "gender", "birthDate", "birthsex", "address", "telecom.email"]
            ),
        )
    return root


async def _headers(make_api_key: ApiKeyFactory) -> dict[str, str]:
    key = await make_api_key("intake:write", "checkout:write", "fhir:read")
    return {"Authorization": f"Bearer {key}"}


async def _rows(runtime: Runtime, model: Any, *where: Any) -> list[Any]:
    async with runtime.sessionmaker() as session:
        return list(await session.scalars(select(model).where(*where)))


async def test_every_resource_records_its_profile(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key)
    body = samples.intake(attribution={"utm_source": "google", "utm_campaign": "fall"})
    r = await client.post("/v1/intake-submissions", json=body, headers=headers)
    assert r.status_code == 202, r.text
    out = r.json()
    source = runtime.profiles.current.source_of("intake/glp1-weight-management/1")
    assert source is not None
    rows = await _rows(runtime, FhirResource, FhirResource.inbound_message_id == out["message_id"])
    assert len(rows) == 8
    assert {(r.profile_id, r.profile_version, r.profile_hash) for r in rows} == {
        ("glp1-weight-management", "1", source.content_hash)
    }
    prov = next(r.resource for r in rows if r.resource_type == "Provenance")
    assert prov["policy"] == [
        f"urn:fhir-gateway:profile:intake/glp1-weight-management/1#sha256={source.content_hash}"
    ]
    (mapping,) = await _rows(
        runtime, ProfileMapping, ProfileMapping.inbound_message_id == out["message_id"]
    )
    assert mapping.action == "ingest" and mapping.profile_hash == source.content_hash
    assert len(mapping.resource_versions) == 8
    assert mapping.attribution == {"utm_source": "google", "utm_campaign": "fall"}


async def test_checkout_provenance_names_plan_and_processor_profiles(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    from gateway.cli import stripe_signature_header

    event = samples.stripe_event()
    event["data"]["object"]["metadata"]["utm_source"] = "tiktok"
    payload = httpx.Request("POST", "/", json=event).content
    r = await client.post(
        "/v1/webhooks/stripe",
        content=payload,
        headers={
            "Stripe-Signature": stripe_signature_header(
                "whsec_test_secret_for_tests_only", payload
            ),
            "Content-Type": "application/json",
        },
    )
    assert r.status_code == 200, r.text
    message_id = r.json()["message_id"]
    rows = await _rows(runtime, FhirResource, FhirResource.inbound_message_id == message_id)
    prov = next(r.resource for r in rows if r.resource_type == "Provenance")
    assert [p.split(":profile:")[1].split("#")[0] for p in prov["policy"]] == [
        "checkout/glp1-plans/1",
        "checkout/processors/1",
    ]
    (mapping,) = await _rows(
        runtime, ProfileMapping, ProfileMapping.inbound_message_id == message_id
    )
    assert mapping.attribution == {"utm_source": "tiktok"}


async def test_conflicting_sources_keep_the_loser(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key)
    intake = samples.intake()
    r = await client.post("/v1/intake-submissions", json=intake, headers=headers)
    patient_id = r.json()["patient"]["id"]
    checkout = samples.canonical_checkout(
        patient_external_id=intake["patient"]["external_id"],
        intake_submission_id=intake["submission_id"],
    )
    checkout["customer"].update(
        name="Jordan Q Rivera", phone="415-555-0199", email=intake["patient"]["email"]
    )
    r = await client.post("/v1/checkouts", json=checkout, headers=headers)
    assert r.status_code == 202, r.text
    conflicts = {c["element"]: c["outcome"] for c in r.json()["conflicts"]}
    # the intake owns the name: the checkout's name lost; the checkout owns the phone
    assert conflicts == {"name": "kept_existing", "telecom.phone": "replaced_existing"}
    rows = {
        c.element: c
        for c in await _rows(runtime, PatientConflict, PatientConflict.patient_id == patient_id)
    }
    assert rows["name"].lost_source == "checkout"
    assert rows["name"].lost_value["value"][0]["text"] == "Jordan Q Rivera"
    assert rows["telecom.phone"].lost_source == "intake"
    assert rows["telecom.phone"].lost_value["value"][0]["value"] == "+14155552671"
    patient = (await client.get(f"/fhir/Patient/{patient_id}", headers=headers)).json()
    assert patient["name"][0]["family"] == "Rivera" and patient["name"][0]["given"] == ["Jordan"]
    assert [t["value"] for t in patient["telecom"] if t["system"] == "phone"] == ["+14155550199"]
    prov_ref = next(
        x["reference"] for x in r.json()["resources"] if x["resourceType"] == "Provenance"
    )
    prov = (await client.get(f"/fhir/{prov_ref}", headers=headers)).json()
    elements = sorted(
        next(e["valueString"] for e in ext["extension"] if e["url"] == "element")
        for ext in prov["extension"]
    )
    assert elements == ["Patient.name", "Patient.telecom.where(system='phone')"]
    assert "Jordan Q Rivera" not in str(prov) and "5552671" not in str(prov)


async def test_corrected_submission_retires_a_flag_that_no_longer_applies(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key)
    intake = samples.intake()
    intake["answers"]["history_mtc_or_men2"] = "yes"
    r = await client.post("/v1/intake-submissions", json=intake, headers=headers)
    flags = [x for x in r.json()["resources"] if x["resourceType"] == "Flag"]
    assert len(flags) == 1
    intake["answers"]["history_mtc_or_men2"] = "no"
    r = await client.post("/v1/intake-submissions", json=intake, headers=headers)
    assert r.json()["status"] == "amended"
    flag = (await client.get(f"/fhir/{flags[0]['reference']}", headers=headers)).json()
    assert flag["status"] == "inactive"
    assert flag["meta"]["versionId"] == "2"
    # the unchanged Observations were not written again
    changed = {x["resourceType"] for x in r.json()["resources"]}
    assert changed == {"QuestionnaireResponse", "Flag", "Provenance"}
