"""Token endpoint answers as real identity providers send them (Epic, Oracle Health,
Azure AD / Entra, Keycloak, Okta...), as ``httpx.MockTransport`` handlers: ``expires_in``
as a string or missing, lowercase ``bearer``, a narrower ``scope``, extra fields, errors as
RFC 6749 section 5.2 JSON, as 200 with an ``error``, or as plain text / HTML pages."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import httpx
import pytest

from gateway.clock import ManualClock
from gateway.ehr.errors import EhrConfigError, TokenUnavailableError
from gateway.oauth import repository as repo
from gateway.runtime import Runtime
from tests.gateway.oauth.test_tokens import Clock, manager, target


def answering(status: int, body: Any, content_type: str) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers={"Content-Type": content_type})

    return httpx.MockTransport(handler)


async def lifetime(runtime: Runtime, clock: ManualClock) -> timedelta:
    async with runtime.sessionmaker() as session:
        row = await repo.get_token_row(session, "acme")
    assert row is not None and row.expires_at is not None
    return row.expires_at.replace(tzinfo=clock.now().tzinfo) - clock.now()


@pytest.mark.parametrize(
    ("body", "seconds"),
    [
        ({"access_token": "t", "token_type": "bearer", "expires_in": "3600"}, 3600),
        ({"access_token": "t", "token_type": "Bearer", "expires_in": "3599.0"}, 3599),
        ({"access_token": "t", "token_type": "Bearer", "expires_in": 299.5}, 299.5),
        ({"access_token": "t", "token_type": "Bearer", "expires_in": "soon"}, 300),
        ({"access_token": "t", "token_type": "Bearer", "ext_expires_in": 3600}, 300),
    ],
)
async def test_expires_in_as_sent(runtime: Runtime, body: dict[str, Any], seconds: float) -> None:
    clock = Clock()
    tokens = manager(
        runtime,
        target(None),
        clock=clock,
        transport=answering(200, body, "application/json;charset=UTF-8"),
    )
    assert await tokens.get_token() == "t"
    assert await lifetime(runtime, clock) == timedelta(seconds=seconds)


async def test_a_narrower_scope_is_used_and_reported(
    runtime: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {
        "access_token": "t",
        "token_type": "bearer",
        "expires_in": 300,
        "scope": "system/Patient.rs",
    }
    tokens = manager(runtime, target(None), transport=answering(200, body, "application/json"))
    capsys.readouterr()
    assert await tokens.get_token() == "t"
    [line] = [x for x in capsys.readouterr().out.splitlines() if "oauth.scope_narrowed" in x]
    assert "system/*.cruds" in line


@pytest.mark.parametrize(
    ("status", "body", "content_type", "message"),
    [
        (
            400,
            {"error": "invalid_client", "error_description": "x"},
            "application/json",
            "400 invalid_client",
        ),
        (401, "Unauthorized", "text/plain", "401 unknown"),
        (400, "<html><body>Bad Request</body></html>", "text/html", "400 unknown"),
        (200, {"error": "invalid_scope"}, "application/json", "200 invalid_scope"),
        (
            200,
            "<html><body>Sign in</body></html>",
            "text/html; charset=utf-8",
            "check auth.token_url",
        ),
    ],
)
async def test_refusals_are_configuration_errors(
    runtime: Runtime, status: int, body: Any, content_type: str, message: str
) -> None:
    tokens = manager(runtime, target(None), transport=answering(status, body, content_type))
    with pytest.raises(EhrConfigError, match=message):
        await tokens.get_token()


async def test_a_proxy_html_502_is_an_outage(runtime: Runtime) -> None:
    tokens = manager(
        runtime, target(None), transport=answering(502, "<html>Bad Gateway</html>", "text/html")
    )
    with pytest.raises(TokenUnavailableError, match="502"):
        await tokens.get_token()
