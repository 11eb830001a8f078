"""The auth matrix, generated from the OpenAPI document: every operation, with no
credential, malformed ones, an unknown key, a revoked key, and a key of each scope.

What the document declares is what must hold: an operation with ``security`` answers 401
(with ``WWW-Authenticate``) without a valid key and 403 with a valid key whose scope is not
listed, and lets a listed scope through; an operation with ``security: []`` never asks
for a key. A route added later is in the matrix without editing this file.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.clients.service import SCOPES, revoke_client
from gateway.runtime import Runtime
from tests.conftest import ApiKeyFactory
from tests.security.conftest import operations


@pytest.fixture
def database_url(sqlite_template: Any, tmp_path: Any) -> str:
    """SQLite only: authentication does not depend on the database (its queries run on
    PostgreSQL in every other API test)."""
    import shutil

    path = tmp_path / "gateway.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


def _request(method: str, path: str, operation: dict[str, Any]) -> dict[str, Any]:
    """A request for ``operation``: path parameters filled in, a small body of the
    declared media type."""
    url = re.sub(r"\{[^}]+\}", "1", path)
    kwargs: dict[str, Any] = {"method": method, "url": url, "headers": {}}
    body = operation.get("requestBody")
    if body:
        media = next(iter(body.get("content", {"application/json": {}})))
        kwargs["headers"]["Content-Type"] = media
        kwargs["content"] = b"{}" if "json" in media else b"MSH|^~\\&|X|Y\r"
    return kwargs


def _scopes(operation: dict[str, Any]) -> set[str]:
    return {
        scope for requirement in operation["security"] for s in requirement.values() for scope in s
    }


def test_every_operation_declares_its_security(openapi: dict[str, Any]) -> None:
    public = set()
    for method, path, operation in operations(openapi):
        assert "security" in operation, f"{method} {path} declares no security"
        if not operation["security"]:
            public.add(f"{method} {path}")
        else:
            assert _scopes(operation) <= set(SCOPES), f"{method} {path}: unknown scope"
    # the routes that answer without an API key (health, keys, signed webhooks)
    assert {p for p in public if p.startswith("GET /healthz") or "webhooks" in p} >= {
        "GET /healthz",
        "POST /v1/webhooks/stripe",
    }
    # a FHIR client reads the CapabilityStatement and the SMART configuration before it
    # has a token (https://hl7.org/fhir/smart-app-launch/conformance.html): public, no PHI
    discovery = {"GET /fhir/metadata", "GET /fhir/.well-known/smart-configuration"}
    assert not [
        p
        for p in public - discovery
        if p.startswith(("GET /v1/ops", "GET /fhir", "GET /v1/cases", "GET /v1/patients"))
    ]


async def test_the_matrix(
    app: FastAPI,
    client: httpx.AsyncClient,
    openapi: dict[str, Any],
    make_api_key: ApiKeyFactory,
    runtime: Runtime,
) -> None:
    keys = {scope: await make_api_key(scope) for scope in SCOPES}
    revoked = await make_api_key(*SCOPES, name="revoked-before-use")
    async with runtime.sessionmaker() as session:
        assert await revoke_client(session, name="revoked-before-use")
        await session.commit()
    bad_credentials = {
        "none": {},
        "basic scheme": {"Authorization": "Basic Zm9vOmJhcg=="},
        "empty bearer": {"Authorization": "Bearer "},
        "unknown key": {"Authorization": "Bearer fgw_nosuchkey_0123456789abcdef"},
        "unknown X-API-Key": {"X-API-Key": "fgw_nosuchkey_0123456789abcdef"},
        "revoked key": {"Authorization": f"Bearer {revoked}"},
        "key in the query": {},  # below: ?api_key=
    }
    wrong: list[str] = []
    tried = 0
    for method, path, operation in operations(openapi):
        request = _request(method, path, operation)
        allowed = _scopes(operation)
        if not operation["security"]:
            r = await client.request(**request)
            tried += 1
            if r.status_code in (401, 403):
                wrong.append(f"{method} {path} (public) -> {r.status_code}")
            continue
        for name, headers in bad_credentials.items():
            url = request["url"] + (
                f"?api_key={keys['ops:admin']}" if name == "key in the query" else ""
            )
            r = await client.request(
                **{**request, "url": url, "headers": {**request["headers"], **headers}}
            )
            tried += 1
            if r.status_code != 401 or "Bearer" not in r.headers.get("www-authenticate", ""):
                wrong.append(f"{method} {path} with {name} -> {r.status_code}")
        for scope, key in keys.items():
            headers = {**request["headers"], "Authorization": f"Bearer {key}"}
            r = await client.request(**{**request, "headers": headers})
            tried += 1
            if scope in allowed and r.status_code in (401, 403):
                wrong.append(f"{method} {path} refused {scope} -> {r.status_code}")
            if scope not in allowed and r.status_code != 403:
                wrong.append(f"{method} {path} let {scope} through -> {r.status_code}")
    assert not wrong, "\n".join(wrong)
    assert tried > 200
