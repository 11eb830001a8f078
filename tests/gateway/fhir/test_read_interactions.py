"""Read interactions of the FHIR face: read with ETag and If-None-Match (304), vread,
history, Patient $everything (paged), and _format / Accept negotiation."""

from __future__ import annotations

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from tests.gateway.fhir.conftest import FHIR_JSON, Stored


async def test_read_answers_an_etag_and_304_when_it_matches(
    client: httpx.AsyncClient, admin_headers: dict[str, str], stored: Stored
) -> None:
    url = f"/fhir/Patient/{stored.patient_id}"
    r = await client.get(url, headers=admin_headers)
    assert r.status_code == 200
    etag = r.headers["etag"]
    assert etag == 'W/"1"'
    again = await client.get(url, headers={**admin_headers, "If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    other = await client.get(url, headers={**admin_headers, "If-None-Match": 'W/"7"'})
    assert other.status_code == 200


async def test_history_and_vread_after_an_update(
    client: httpx.AsyncClient, admin_headers: dict[str, str], stored: Stored
) -> None:
    amended = dict(stored.intake)
    amended["submission_id"] = stored.intake["submission_id"] + "-2"
    amended["patient"] = dict(stored.intake["patient"])
    amended["patient"]["address"] = dict(stored.intake["patient"]["address"], city="Oakland")
    r = await client.post("/v1/intake-submissions", json=amended, headers=admin_headers)
    assert r.status_code == 202, r.text
    assert r.json()["patient"]["id"] == stored.patient_id
    url = f"/fhir/Patient/{stored.patient_id}"
    history = (await client.get(f"{url}/_history", headers=admin_headers)).json()
    Bundle.model_validate(history)
    assert history["type"] == "history"
    versions = [e["resource"]["meta"]["versionId"] for e in history["entry"]]
    assert versions == ["2", "1"]
    assert history["entry"][1]["request"]["method"] == "POST"
    v1 = await client.get(f"{url}/_history/1", headers=admin_headers)
    assert v1.status_code == 200
    assert v1.json()["address"][0]["city"] == "San Francisco"
    assert v1.headers["etag"] == 'W/"1"'
    current = await client.get(url, headers=admin_headers)
    assert current.json()["address"][0]["city"] == "Oakland"
    missing = await client.get(f"{url}/_history/9", headers=admin_headers)
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"


async def test_everything_pages_through_the_patient_compartment(
    client: httpx.AsyncClient, admin_headers: dict[str, str], stored: Stored
) -> None:
    url = f"/fhir/Patient/{stored.patient_id}/$everything"
    first = (await client.get(url, params={"_count": "3"}, headers=admin_headers)).json()
    Bundle.model_validate(first)
    assert first["entry"][0]["resource"]["resourceType"] == "Patient"
    seen = [e["fullUrl"] for e in first["entry"]]
    page = first
    while nxt := next((lk["url"] for lk in page["link"] if lk["relation"] == "next"), None):
        page = (await client.get(nxt, headers=admin_headers)).json()
        seen += [e["fullUrl"] for e in page["entry"]]
    assert len(seen) == len(set(seen)) == first["total"]
    types = {u.split("/fhir/")[1].split("/")[0] for u in seen}
    assert {"Patient", "QuestionnaireResponse", "Observation", "Consent", "Provenance"} <= types
    only = (await client.get(url, params={"_type": "Consent"}, headers=admin_headers)).json()
    assert {e["resource"]["resourceType"] for e in only["entry"]} == {"Consent"}


async def test_everything_of_an_unknown_patient_is_404(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.get("/fhir/Patient/nobody/$everything", headers=admin_headers)
    assert r.status_code == 404
    assert r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("params", "accept", "status", "media"),
    [
        ({}, "application/fhir+json", 200, FHIR_JSON),
        ({}, "application/json", 200, "application/json"),
        ({"_format": "json"}, "application/xml", 200, FHIR_JSON),
        ({}, "application/fhir+xml", 406, FHIR_JSON),
        ({"_format": "xml"}, "", 406, FHIR_JSON),
    ],
)
async def test_format_negotiation(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    stored: Stored,
    params: dict[str, str],
    accept: str,
    status: int,
    media: str,
) -> None:
    r = await client.get(
        f"/fhir/Patient/{stored.patient_id}",
        params=params,
        headers={**admin_headers, "Accept": accept},
    )
    assert r.status_code == status
    assert r.headers["content-type"].startswith(media)
    if status != 200:
        assert r.json()["resourceType"] == "OperationOutcome"


async def test_metadata_is_public_and_smart_configuration_names_the_token_endpoint(
    client: httpx.AsyncClient,
) -> None:
    statement = (await client.get("/fhir/metadata")).json()
    security = statement["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    for path in ("/fhir/.well-known/smart-configuration", "/.well-known/smart-configuration"):
        smart = (await client.get(path)).json()
        assert smart["token_endpoint"].endswith("/oauth/token")
        assert smart["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    patient = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    assert {i["code"] for i in patient["interaction"]} == {
        "read",
        "vread",
        "history-instance",
        "search-type",
    }
    assert patient["operation"][0]["name"] == "everything"
