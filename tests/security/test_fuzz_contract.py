"""What the fuzzing of the OpenAPI document relies on, one scenario each: 405 with
``Allow``, the request body of HL7 over HTTP, the media types of a kept payload, public
routes without security, and ids beyond 64 bits in bodies."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.db.models import ExceptionRecord
from gateway.runtime import Runtime
from tests.support.api import rows


async def test_a_method_the_path_does_not_have_is_405_with_every_allowed_method(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    # GET and POST are two routes of one path: Allow names both
    r = await client.put("/v1/ops/subscribers", headers=admin_headers)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST"
    assert r.headers["content-type"] == "application/problem+json"
    r = await client.delete("/fhir/Patient/1", headers=admin_headers)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_a_path_id_that_is_not_a_number_does_not_shadow_a_sibling_route(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.get("/v1/ops/deliveries/replay", headers=admin_headers)
    assert (r.status_code, r.headers["allow"]) == (405, "POST")


def test_the_document_describes_hl7_over_http_and_the_public_routes(
    openapi: dict[str, Any],
) -> None:
    hl7 = openapi["paths"]["/v1/hl7v2"]["post"]
    assert hl7["requestBody"]["required"] is True
    assert "application/hl7-v2" in hl7["requestBody"]["content"]
    assert "application/hl7-v2" in hl7["responses"]["200"]["content"]
    for path in ("/healthz", "/readyz", "/.well-known/jwks.json"):
        assert openapi["paths"][path]["get"]["security"] == []
    assert openapi["paths"]["/v1/webhooks/stripe"]["post"]["security"] == []
    assert "security" not in openapi
    payload = openapi["paths"]["/v1/ops/exceptions/{exception_id}/payload"]["get"]
    assert set(payload["responses"]["200"]["content"]) == {
        "application/json",
        "application/hl7-v2",
        "application/octet-stream",
    }
    exception_id = next(
        p
        for p in openapi["paths"]["/v1/ops/exceptions/{exception_id}"]["get"]["parameters"]
        if p["name"] == "exception_id"
    )
    assert exception_id["schema"]["maximum"] == 2**63 - 1


async def test_a_refused_body_is_served_back_as_what_it_is(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    # declared JSON, but not JSON: kept whole, served as bytes, never as JSON or HTML
    raw = b"<script>alert(1)</script>"
    r = await client.post(
        "/v1/intake-submissions",
        content=raw,
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    (record,) = await rows(runtime, ExceptionRecord)
    r = await client.get(f"/v1/ops/exceptions/{record.id}/payload", headers=admin_headers)
    assert r.content == raw
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_a_replay_id_beyond_64_bits_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.post("/v1/ops/deliveries/replay", json={"ids": [2**63]}, headers=admin_headers)
    assert r.status_code == 422
