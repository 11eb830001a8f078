"""Read routes: ``GET /v1/cases/{id}``, ``GET /v1/cases?patient=``, ``GET /v1/messages/{id}``
and the FHIR read ``GET /fhir/{type}/{id}`` (OperationOutcome errors)."""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest

from tests import samples
from tests.conftest import ApiKeyFactory
from tests.support.api import EXTERNAL_ID_SYSTEM, bearer

FHIR_JSON = "application/fhir+json"


@pytest.fixture
async def intake(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> dict[str, Any]:
    """An accepted intake: ``{"body": ..., "out": ...}``."""
    body = samples.intake()
    r = await client.post("/v1/intake-submissions", json=body, headers=admin_headers)
    assert r.status_code == 202, r.text
    return {"body": body, "out": r.json()}


# --------------------------------------------------------------------------- cases


async def test_get_case_gives_state_and_history(
    client: httpx.AsyncClient, admin_headers: dict[str, str], intake: dict[str, Any]
) -> None:
    case_id = intake["out"]["case"]["id"]
    r = await client.get(f"/v1/cases/{case_id}", headers=admin_headers)
    assert r.status_code == 200
    case = r.json()
    assert case["id"] == case_id
    assert case["state"] == "intake_received"
    assert case["program"] == "glp1-weight-management"
    assert case["patient_reference"] == intake["out"]["patient"]["reference"]
    (opened,) = case["history"]
    assert opened["type"] == "intake_submitted"
    assert (opened["from_state"], opened["to_state"], opened["outcome"]) == (
        None,
        "intake_received",
        "applied",
    )
    assert opened["event_id"] == intake["body"]["submission_id"]
    assert opened["occurred_at"] == "2026-11-23T19:00:00Z"


async def test_an_unknown_case_is_a_404_problem(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.get("/v1/cases/no-such-case", headers=admin_headers)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize("system", ["external-patient-id", "patient-id"])
async def test_list_cases_by_patient_identifier(
    client: httpx.AsyncClient, admin_headers: dict[str, str], intake: dict[str, Any], system: str
) -> None:
    value = (
        intake["body"]["patient"]["external_id"]
        if system == "external-patient-id"
        else intake["out"]["patient"]["id"]
    )
    r = await client.get(
        "/v1/cases",
        params={"patient": f"https://fhir-gateway.example.org/sid/{system}|{value}"},
        headers=admin_headers,
    )
    assert r.status_code == 200
    assert [c["id"] for c in r.json()] == [intake["out"]["case"]["id"]]


async def test_list_cases_of_an_unknown_patient_is_empty(
    client: httpx.AsyncClient, admin_headers: dict[str, str], intake: dict[str, Any]
) -> None:
    r = await client.get(
        "/v1/cases", params={"patient": f"{EXTERNAL_ID_SYSTEM}|nobody"}, headers=admin_headers
    )
    assert (r.status_code, r.json()) == (200, [])


async def test_a_malformed_patient_parameter_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str], intake: dict[str, Any]
) -> None:
    external_id = intake["body"]["patient"]["external_id"]
    r = await client.get("/v1/cases", params={"patient": external_id}, headers=admin_headers)
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {
            "field": "patient",
            "pointer": "#/patient",
            "code": "invalid_identifier",
            "detail": "expected system|value or Patient/<id>",
        }
    ]
    assert external_id not in r.text


# --------------------------------------------------------------------------- messages


async def test_get_message_gives_its_status(
    client: httpx.AsyncClient, admin_headers: dict[str, str], intake: dict[str, Any]
) -> None:
    status_url = intake["out"]["status_url"]
    assert status_url == f"http://127.0.0.1:8000/v1/messages/{intake['out']['message_id']}"
    r = await client.get(status_url.removeprefix("http://127.0.0.1:8000"), headers=admin_headers)
    assert r.status_code == 200
    message = r.json()
    assert (message["channel"], message["status"], message["revision"]) == (
        "intake",
        "processed",
        1,
    )
    assert message["external_id"] == intake["body"]["submission_id"]
    assert message["deliveries"] == []
    assert message["result"]["resources"] == intake["out"]["resources"]
    assert "Jordan" not in r.text and "Rivera" not in r.text


async def test_an_unknown_message_is_404(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.get("/v1/messages/no-such-message", headers=admin_headers)
    assert r.status_code == 404


# --------------------------------------------------------------------------- FHIR read


async def test_fhir_read_gives_the_resource_with_etag_and_last_modified(
    client: httpx.AsyncClient, admin_headers: dict[str, str], intake: dict[str, Any]
) -> None:
    ref = intake["out"]["patient"]["reference"]
    r = await client.get(f"/fhir/{ref}", headers=admin_headers)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(FHIR_JSON)
    resource = r.json()
    assert f"{resource['resourceType']}/{resource['id']}" == ref
    assert r.headers["etag"] == 'W/"1"' and resource["meta"]["versionId"] == "1"
    assert parsedate_to_datetime(r.headers["last-modified"]).tzinfo is not None


async def test_fhir_read_of_an_unknown_resource_is_a_404_operation_outcome(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.get("/fhir/Patient/does-not-exist", headers=admin_headers)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith(FHIR_JSON)
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"
    assert outcome["issue"][0]["code"] == "not-found"


async def test_fhir_read_without_a_key_is_a_401_operation_outcome(
    client: httpx.AsyncClient, intake: dict[str, Any]
) -> None:
    r = await client.get(f"/fhir/{intake['out']['patient']['reference']}")
    assert r.status_code == 401
    assert r.headers["content-type"].startswith(FHIR_JSON)
    assert r.json()["issue"][0]["code"] == "login"
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_fhir_read_needs_the_fhir_read_scope(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, intake: dict[str, Any]
) -> None:
    key = await make_api_key("intake:write")
    r = await client.get(f"/fhir/{intake['out']['patient']['reference']}", headers=bearer(key))
    assert r.status_code == 403
    assert r.json()["issue"][0]["code"] == "forbidden"


async def test_fhir_read_with_an_invalid_id_is_an_operation_outcome(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.get("/fhir/Patient/not_a_valid_id!", headers=admin_headers)
    assert r.status_code == 422
    assert r.json()["resourceType"] == "OperationOutcome"
    assert "not_a_valid_id" not in r.text
