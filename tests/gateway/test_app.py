"""Authentication and error rendering of the ``/v1`` API: every error is an RFC 9457
problem listing its problems, never echoes the input, and a rejected payload is kept
whole in the exceptions queue with nothing else written."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway.db.models import ExceptionRecord
from gateway.runtime import Runtime
from tests import samples
from tests.conftest import ApiKeyFactory
from tests.support.api import bearer, rows, table_counts

PROBLEM_JSON = "application/problem+json"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with ``status``; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:fhir-gateway:problem:")
    assert body["title"] and body["detail"]
    assert body["instance"] == response.request.url.path
    for error in body.get("errors", []):
        assert set(error) == {"field", "pointer", "code", "detail"}
    return body  # type: ignore[no-any-return]


async def assert_only_the_rejection_was_written(runtime: Runtime, before: dict[str, int]) -> None:
    after = await table_counts(runtime)
    assert after["exceptions"] == before["exceptions"] + 1
    assert {k: v for k, v in after.items() if k != "exceptions"} == {
        k: v for k, v in before.items() if k != "exceptions"
    }


# --------------------------------------------------------------------------- 401 / 403


async def test_no_api_key_is_401_with_a_bearer_challenge(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/intake-submissions", json=samples.intake())
    body = assert_problem(r, 401)
    assert r.headers["www-authenticate"] == 'Bearer realm="fhir-gateway"'
    assert body["type"] == "urn:fhir-gateway:problem:unauthorized"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer fgw_000000000000_notarealkeynotarealkeynotarealkey00"},
        {"Authorization": "Bearer not-even-our-format"},
        {"X-API-Key": "fgw_abc_def"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["unknown-key", "malformed-key", "x-api-key", "basic-auth"],
)
async def test_a_wrong_api_key_is_401(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    r = await client.post("/v1/intake-submissions", json=samples.intake(), headers=headers)
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_a_tampered_key_with_a_known_key_id_is_401(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    key = await make_api_key("intake:write")
    tampered = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    r = await client.post("/v1/intake-submissions", json=samples.intake(), headers=bearer(tampered))
    assert_problem(r, 401)


async def test_the_key_is_accepted_in_x_api_key_too(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    key = await make_api_key("intake:write")
    r = await client.post(
        "/v1/intake-submissions", json=samples.intake(), headers={"X-API-Key": key}
    )
    assert r.status_code == 202, r.text


async def test_a_key_without_the_scope_is_403(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, runtime: Runtime
) -> None:
    before = await table_counts(runtime)
    key = await make_api_key("events:write", "cases:read")
    r = await client.post("/v1/intake-submissions", json=samples.intake(), headers=bearer(key))
    body = assert_problem(r, 403)
    assert "intake:write" in body["detail"]
    after = await table_counts(runtime)
    assert after["fhir_resources"] == before["fhir_resources"] == 0


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("POST", "/v1/checkouts", "checkout:write"),
        ("POST", "/v1/events", "events:write"),
        ("GET", "/v1/cases?patient=a|b", "cases:read"),
        ("GET", "/v1/cases/some-case", "cases:read"),
        ("GET", "/v1/messages/some-message", "ops:read"),
    ],
)
async def test_every_v1_route_checks_its_scope(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, method: str, path: str, scope: str
) -> None:
    key = await make_api_key("fhir:read")
    r = await client.request(method, path, json={}, headers=bearer(key))
    body = assert_problem(r, 403)
    assert scope in body["detail"]


async def test_a_revoked_key_is_401(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, runtime: Runtime
) -> None:
    from gateway.clients.service import revoke_client

    key = await make_api_key("intake:write", name="to-revoke")
    async with runtime.sessionmaker() as session:
        assert await revoke_client(session, name="to-revoke")
        await session.commit()
    r = await client.post("/v1/intake-submissions", json=samples.intake(), headers=bearer(key))
    assert_problem(r, 401)


# --------------------------------------------------------------------------- bad bodies


async def test_form_encoded_body_is_415_and_kept_for_review(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    before = await table_counts(runtime)
    form = "submission_id=sub-1&patient.first_name=Jordan"
    r = await client.post(
        "/v1/intake-submissions",
        content=form,
        headers={**admin_headers, "Content-Type": "application/x-www-form-urlencoded"},
    )
    body = assert_problem(r, 415)
    assert body["errors"][0]["code"] == "unsupported_media_type"
    assert "Jordan" not in r.text
    await assert_only_the_rejection_was_written(runtime, before)
    (record,) = await rows(runtime, ExceptionRecord)
    assert record.payload == form.encode()
    assert record.content_type == "application/x-www-form-urlencoded"


async def test_malformed_json_is_400_with_line_and_column(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    before = await table_counts(runtime)
    raw = b'{\n  "submission_id": "sub-1",\n  "patient": {"first_name": "Jordan",}\n}'
    r = await client.post(
        "/v1/intake-submissions",
        content=raw,
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    body = assert_problem(r, 400)
    (error,) = body["errors"]
    assert error["code"] == "invalid_json"
    assert "line 3 column" in error["detail"]
    assert "Jordan" not in r.text
    await assert_only_the_rejection_was_written(runtime, before)
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.channel, record.payload) == ("rejected_input", "intake", raw)
    assert record.problems[0]["code"] == "invalid_json"


@pytest.mark.parametrize("path", ["/v1/intake-submissions", "/v1/checkouts", "/v1/events"])
async def test_json_nested_too_deeply_is_400_not_500(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], path: str
) -> None:
    raw = b'{"answers": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    r = await client.post(
        path, content=raw, headers={**admin_headers, "Content-Type": "application/json"}
    )
    body = assert_problem(r, 400)
    assert body["errors"][0]["code"] == "invalid_json"
    (record,) = await rows(runtime, ExceptionRecord)
    assert record.payload == raw


async def test_control_characters_are_422_not_500_on_every_database(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    # PostgreSQL's JSONB refuses NUL; FHIR strings may not hold control characters anyway
    body = samples.intake()
    body["answers"]["current_medications"] = "metformin\u0000 500 mg"
    before = await table_counts(runtime)
    r = await client.post("/v1/intake-submissions", json=body, headers=admin_headers)
    problem = assert_problem(r, 422)
    assert {(e["field"], e["code"]) for e in problem["errors"]} == {
        ("answers.current_medications", "invalid_character")
    }
    await assert_only_the_rejection_was_written(runtime, before)


async def test_a_control_character_in_mapped_text_is_422_and_nothing_is_half_written(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    checkout = samples.canonical_checkout()
    checkout["customer"]["address"]["line1"] = "100 Market St\u0007"
    before = await table_counts(runtime)
    r = await client.post("/v1/checkouts", json=checkout, headers=admin_headers)
    problem = assert_problem(r, 422)
    assert {(e["field"], e["code"]) for e in problem["errors"]} == {
        ("Patient.address[0].line[0]", "invalid_character")
    }
    # found after the message row was added: the whole transaction is rolled back
    await assert_only_the_rejection_was_written(runtime, before)


async def test_a_body_that_is_not_utf8_is_400(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.post(
        "/v1/intake-submissions",
        content='{"submission_id": "Jörg"}'.encode("latin-1"),
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    body = assert_problem(r, 400)
    assert body["errors"][0]["code"] == "invalid_encoding"


async def test_json_that_is_not_an_object_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.post("/v1/checkouts", json=["Jordan Rivera"], headers=admin_headers)
    assert_problem(r, 422)
    assert "Jordan" not in r.text


async def test_wrong_types_are_422_with_every_field_and_no_values(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    before = await table_counts(runtime)
    body = samples.intake()
    body["submission_id"] = 12345
    body["patient"]["first_name"] = ["Jordan"]
    body["patient"]["birth_date"] = 19880412
    body["answers"] = ["weight_lb", 212]
    body["consents"] = "accepted"
    raw = json.dumps(body).encode()
    r = await client.post("/v1/intake-submissions", content=raw, headers=admin_headers)
    problem = assert_problem(r, 422)
    fields = {e["field"]: e["code"] for e in problem["errors"]}
    assert fields == {
        "submission_id": "string_type",
        "patient.first_name": "string_type",
        "patient.birth_date": "string_type",
        "answers": "dict_type",
        "consents": "list_type",
    }
    pointers = {e["pointer"] for e in problem["errors"]}
    assert "#/patient/first_name" in pointers
    for value in ("12345", "Jordan", "19880412", "Rivera", "415", "Market"):
        assert value not in r.text
    await assert_only_the_rejection_was_written(runtime, before)
    (record,) = await rows(runtime, ExceptionRecord)
    assert record.payload == raw


async def test_query_validation_errors_are_problems_without_the_input(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.get(
        "/v1/cases", params={"limit": "0", "patient": "secret|value-1"}, headers=admin_headers
    )
    body = assert_problem(r, 422)
    assert body["errors"][0]["field"] == "query.limit"
    assert "input" not in json.dumps(body)
    assert "value-1" not in r.text


async def test_an_unknown_route_is_a_404_problem(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    assert_problem(await client.get("/v1/nothing-here", headers=admin_headers), 404)


async def test_a_wrong_method_is_a_405_problem(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    assert_problem(await client.get("/v1/intake-submissions", headers=admin_headers), 405)


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ok", "database": "ok"}


async def test_openapi_documents_the_request_bodies(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    assert {"IntakeSubmission", "CanonicalCheckout", "CanonicalEvent"} <= set(components)
    body = schema["paths"]["/v1/intake-submissions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/IntakeSubmission"
    }


async def test_openapi_error_responses_are_what_the_gateway_sends(
    client: httpx.AsyncClient,
) -> None:
    """docs/API.md: /v1 errors are problem details, /fhir errors OperationOutcomes; the
    OpenAPI document says so (not FastAPI's HTTPValidationError, which is never sent)."""
    schema = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    paths = schema["paths"]
    for path, code in [
        ("/v1/intake-submissions", "422"),
        ("/v1/intake-submissions", "409"),
        ("/v1/webhooks/stripe", "400"),
    ]:
        content = paths[path]["post"]["responses"][code]["content"]
        assert content == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
    for path, codes in [
        ("/v1/cases", {"401", "403", "422"}),
        ("/v1/cases/{case_id}", {"401", "403", "404", "422"}),
        ("/v1/messages/{message_id}", {"401", "403", "404", "422"}),
    ]:
        responses = paths[path]["get"]["responses"]
        assert codes <= set(responses)
        assert all("application/problem+json" in responses[c]["content"] for c in codes)
    read = paths["/fhir/{resource_type}/{resource_id}"]["get"]["responses"]
    assert {"401", "403", "404"} <= set(read)
    assert set(read["404"]["content"]) == {"application/fhir+json"}
    assert "503" in paths["/readyz"]["get"]["responses"]
    accepted = schema["components"]["schemas"]["IngestAccepted"]["properties"]
    assert {"submission_id", "checkout_id", "conflicts", "replayed"} <= set(accepted)


async def test_openapi_describes_the_ingest_answers_it_sends(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    schema = (await client.get("/openapi.json")).json()
    documented = set(schema["components"]["schemas"]["IngestAccepted"]["properties"])
    key = await make_api_key("intake:write", "checkout:write")
    r = await client.post("/v1/intake-submissions", json=samples.intake(), headers=bearer(key))
    assert r.status_code == 202, r.text
    assert set(r.json()) <= documented
    r = await client.post("/v1/checkouts", json=samples.canonical_checkout(), headers=bearer(key))
    assert r.status_code == 202, r.text
    assert set(r.json()) <= documented
