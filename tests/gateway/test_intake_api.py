"""POST /v1/intake-submissions against a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import httpx
from sqlalchemy import func, select

from gateway.db.models import ExceptionRecord, FhirResource
from gateway.runtime import Runtime
from tests import samples
from tests.conftest import ApiKeyFactory


async def _count(runtime: Runtime, model: type, *where: object) -> int:
    async with runtime.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def test_intake_creates_patient_response_and_provenance(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    key = await make_api_key("intake:write", "fhir:read")
    body = samples.intake()
    r = await client.post(
        "/v1/intake-submissions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 202, r.text
    out = r.json()
    types = sorted(x["resourceType"] for x in out["resources"])
    # Derived by the GLP-1 profile: weight, height and BMI Observations, two Consents.
    assert types == [
        "Consent",
        "Consent",
        "Observation",
        "Observation",
        "Observation",
        "Patient",
        "Provenance",
        "QuestionnaireResponse",
    ]
    assert out["case"]["state"] == "intake_received"
    patient = (
        await client.get(
            f"/fhir/{out['patient']['reference']}", headers={"Authorization": f"Bearer {key}"}
        )
    ).json()
    assert patient["telecom"][0]["value"] == "+14155552671"
    assert patient["address"][0]["state"] == "CA"
    assert patient["birthDate"] == "1988-04-12"
    assert patient["name"][0]["given"] == ["Jordan"]


async def test_same_submission_twice_creates_nothing_new(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    headers = {"Authorization": f"Bearer {await make_api_key('intake:write')}"}
    body = json.dumps(samples.intake())
    first = await client.post("/v1/intake-submissions", content=body, headers=headers)
    before = await _count(runtime, FhirResource)
    second = await client.post("/v1/intake-submissions", content=body, headers=headers)
    assert second.status_code == 202
    assert second.json()["replayed"] is True
    assert second.json()["resources"] == first.json()["resources"]
    assert await _count(runtime, FhirResource) == before


async def test_invalid_intake_lists_every_problem_and_keeps_payload(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    headers = {"Authorization": f"Bearer {await make_api_key('intake:write')}"}
    body = samples.intake()
    body["patient"]["phone"] = "555-1234"
    body["patient"]["address"]["state"] = "Teksis"
    body["patient"]["birth_date"] = "02/30/1990"
    body["answers"]["favourite_colour"] = "blue"
    del body["answers"]["weight_lb"]
    r = await client.post("/v1/intake-submissions", json=body, headers=headers)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    fields = {e["field"]: e["code"] for e in r.json()["errors"]}
    assert fields == {
        "patient.phone": "invalid_phone",
        "patient.address.state": "invalid_state",
        "patient.birth_date": "invalid_date",
        "answers.favourite_colour": "unknown_question",
        "answers.weight_lb": "missing_answer",
    }
    assert await _count(runtime, FhirResource) == 0
    assert await _count(runtime, ExceptionRecord, ExceptionRecord.kind == "rejected_input") == 1
    assert "555-1234" not in r.text and "Teksis" not in r.text


async def test_real_world_formats_are_stored_as_meant_and_a_dropped_time_is_a_warning(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    """A phone with an extension, a day-first date, a GPO state abbreviation and a birth
    date sent as a date-time: accepted; the dropped time is answered as a warning and named
    in the Provenance (by field and code, never the value)."""
    headers = {"Authorization": f"Bearer {await make_api_key('intake:write', 'fhir:read')}"}
    body = samples.intake()
    body["patient"]["phone"] = "(415) 555-2671 x12"
    body["patient"]["birth_date"] = "1988-04-12T10:49:00Z"
    body["patient"]["address"]["state"] = "Calif."
    body["answers"]["last_physical_exam_date"] = "25/09/2026"
    r = await client.post("/v1/intake-submissions", json=body, headers=headers)
    assert r.status_code == 202, r.text
    out = r.json()
    assert [(w["location"], w["code"]) for w in out["warnings"]] == [
        ("patient.birth_date", "time_dropped")
    ]
    assert "10:49" not in r.text
    patient = (await client.get(f"/fhir/{out['patient']['reference']}", headers=headers)).json()
    assert patient["birthDate"] == "1988-04-12"
    assert patient["address"][0]["state"] == "CA"
    assert patient["telecom"][0]["value"] == "+14155552671"
    assert patient["telecom"][0]["extension"] == [
        {
            "url": "http://hl7.org/fhir/StructureDefinition/contactpoint-extension",
            "valueString": "12",
        }
    ]
    [ref] = [x["reference"] for x in out["resources"] if x["resourceType"] == "Provenance"]
    provenance = (await client.get(f"/fhir/{ref}", headers=headers)).json()
    [note] = provenance["extension"]
    assert note["url"].endswith("/normalization-note")
    assert note["extension"][:2] == [
        {"url": "input", "valueString": "patient.birth_date"},
        {"url": "code", "valueCode": "time_dropped"},
    ]
    # the same submission again: the same answer, warnings included
    again = await client.post("/v1/intake-submissions", json=body, headers=headers)
    assert again.json()["warnings"] == out["warnings"]


async def test_a_date_with_two_readings_is_refused_naming_the_field_not_the_value(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    headers = {"Authorization": f"Bearer {await make_api_key('intake:write')}"}
    body = samples.intake()
    body["patient"]["birth_date"] = "10.09.1988"
    r = await client.post("/v1/intake-submissions", json=body, headers=headers)
    assert r.status_code == 422
    [error] = r.json()["errors"]
    assert (error["field"], error["code"]) == ("patient.birth_date", "ambiguous_date")
    assert "MM.DD.YYYY" in r.text and "DD.MM.YYYY" in r.text
    assert "10.09" not in r.text and "1988" not in r.text
    assert await _count(runtime, FhirResource) == 0
