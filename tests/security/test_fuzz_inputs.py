"""Hostile input on every operation of the OpenAPI document, on SQLite and PostgreSQL:
a NUL character in each path and query parameter and in JSON strings, integers of more
than 4,300 digits in JSON bodies, ids beyond 64 bits. Each gets a clear 4xx (problem
details on ``/v1``, an OperationOutcome on ``/fhir``), never a 5xx, and a refused payload
of a JSON channel is kept whole in the exceptions queue (docs/API.md, "Errors").

Deterministic and cheap, beside the schemathesis run (``test_fuzz_openapi.py``), which
draws its cases at random.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from gateway.cli import stripe_signature_header
from gateway.db.models import ExceptionRecord
from gateway.imports.uploads import wait_for_uploads
from gateway.runtime import Runtime
from tests import samples
from tests.security.conftest import operations
from tests.support.api import STRIPE_SECRET, rows

HUGE_INT = b"1" + b"0" * 5000
BEYOND_64_BITS = str(2**63)


def _is_problem(r: httpx.Response, path: str) -> bool:
    if path.startswith("/fhir"):
        return r.json().get("resourceType") == "OperationOutcome"
    return r.headers.get("content-type", "").startswith(
        ("application/problem+json", "application/fhir+json")
    )


def _is_integer(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "integer" or any(
        o.get("type") == "integer" for o in schema.get("anyOf", [])
    )


def _fill(path: str, value: str) -> str:
    return re.sub(r"\{[^}]+\}", value, path)


async def test_nul_and_huge_ids_in_paths_and_queries_are_4xx(
    client: httpx.AsyncClient, openapi: dict[str, Any], admin_headers: dict[str, str]
) -> None:
    wrong: list[str] = []
    tried = 0
    for method, path, operation in operations(openapi):
        params = operation.get("parameters", [])
        cases: list[tuple[str, str]] = []
        if "{" in path:
            cases.append(("NUL in the path", _fill(path, "a%00b")))
            cases.append(("an id beyond 64 bits", _fill(path, BEYOND_64_BITS)))
        for p in params:
            if p["in"] == "query":
                cases.append((f"NUL in ?{p['name']}", f"{_fill(path, '1')}?{p['name']}=a%00"))
                if _is_integer(p.get("schema", {})):
                    url = f"{_fill(path, '1')}?{p['name']}={BEYOND_64_BITS}"
                    cases.append((f"2^63 in ?{p['name']}", url))
        for what, url in cases:
            r = await client.request(method, url, headers=admin_headers)
            tried += 1
            if not 400 <= r.status_code < 500 or not _is_problem(r, path):
                wrong.append(f"{method} {path}: {what} -> {r.status_code} {r.text[:120]}")
        # in a text parameter, a huge number is only text: never a 5xx
        for p in params:
            if p["in"] == "query" and not _is_integer(p.get("schema", {})):
                url = f"{_fill(path, '1')}?{p['name']}={BEYOND_64_BITS}"
                r = await client.request(method, url, headers=admin_headers)
                tried += 1
                if r.status_code >= 500:
                    wrong.append(f"{method} {path}: 2^63 in ?{p['name']} -> {r.status_code}")
    assert not wrong, "\n".join(wrong)
    assert tried > 40


async def test_every_json_body_with_a_huge_integer_or_a_nul_is_4xx(
    client: httpx.AsyncClient, openapi: dict[str, Any], admin_headers: dict[str, str]
) -> None:
    wrong: list[str] = []
    bodies = {
        "a huge integer": b'{"submission_id": ' + HUGE_INT + b"}",
        "a NUL in a string": json.dumps({"submission_id": "a\u0000b", "x": ["\u0000"]}).encode(),
    }
    tried = 0
    for method, path, operation in operations(openapi):
        content = operation.get("requestBody", {}).get("content", {})
        if not any("json" in media for media in content):
            continue
        for what, raw in bodies.items():
            r = await client.request(
                method,
                _fill(path, "1"),
                content=raw,
                headers={**admin_headers, "Content-Type": "application/json"},
            )
            tried += 1
            if path == "/v1/imports" and r.status_code == 202:
                # A bulk import takes the file and refuses its bad records one by one
                # (kept, with their problems, to fix and import again): the job must end
                # with this record refused, never a 5xx.
                await wait_for_uploads()
                job = await client.get(f"/v1/imports/{r.json()['id']}", headers=admin_headers)
                counts = job.json()["counts"]
                if job.status_code != 200 or counts["refused"] != 1 or counts["mapped"]:
                    wrong.append(f"{method} {path}: {what} -> job {job.text[:200]}")
                continue
            if not 400 <= r.status_code < 500 or not _is_problem(r, path):
                wrong.append(f"{method} {path}: {what} -> {r.status_code} {r.text[:120]}")
    assert not wrong, "\n".join(wrong)
    assert tried >= 10


async def test_a_nul_in_an_intake_answer_is_422_at_the_field_and_the_payload_is_kept(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    body = samples.intake()
    body["attribution"] = {"utm_source": "a\u0000b"}
    body["answers"]["no_such_question\u0000"] = "x"
    raw = json.dumps(body).encode()
    r = await client.post(
        "/v1/intake-submissions",
        content=raw,
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert {(e["field"], e["code"]) for e in r.json()["errors"]} == {
        ("attribution.utm_source", "invalid_character"),
        ("answers", "invalid_character"),
    }
    (record,) = await rows(runtime, ExceptionRecord)
    assert (record.kind, record.channel, record.payload) == ("rejected_input", "intake", raw)


async def test_the_signed_stripe_route_refuses_a_huge_integer_with_422_and_keeps_it(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    # a 5xx would make Stripe retry the delivery for days
    raw = (
        b'{"id": "evt_1", "type": "checkout.session.completed", "amount_total": ' + HUGE_INT + b"}"
    )
    headers = {
        "Stripe-Signature": stripe_signature_header(STRIPE_SECRET, raw),
        "Content-Type": "application/json",
    }
    r = await client.post("/v1/webhooks/stripe", content=raw, headers=headers)
    assert r.status_code == 422
    assert r.json()["errors"][0]["code"] == "number_too_long"
    (record,) = await rows(runtime, ExceptionRecord)
    assert record.payload == raw
