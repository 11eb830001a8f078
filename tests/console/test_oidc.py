"""Optional OpenID Connect sign-in: the authorization code flow with PKCE and a nonce
against a fake provider (an ``httpx.MockTransport`` handler), for a staff account made
with the CLI's service; and what it refuses."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.app import create_app
from gateway.db.models import AuditEntry
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests.console.conftest import StaffFactory
from tests.support.api import rows
from tests.support.profiles import shared_profiles

ISSUER = "https://login.example.org/realms/ops"
CLIENT_ID = "fhir-gateway-console"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})


class Provider:
    """A fake OpenID provider: discovery, token (checks the PKCE verifier), JWKS."""

    def __init__(self) -> None:
        self.nonce = ""
        self.challenge = ""
        self.claims: dict[str, Any] = {}
        self.withheld: set[str] = set()  # discovery document members left out

    def id_token(self, **override: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": CLIENT_ID,
            "sub": "u-1",
            "iat": now,
            "exp": now + 300,
            "nonce": self.nonce,
            **self.claims,
            **override,
        }
        return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, KEY)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/.well-known/openid-configuration"):
            document = {
                "issuer": ISSUER,
                "authorization_endpoint": f"{ISSUER}/auth",
                "token_endpoint": f"{ISSUER}/token",
                "jwks_uri": f"{ISSUER}/certs",
            }
            return httpx.Response(
                200, json={k: v for k, v in document.items() if k not in self.withheld}
            )
        if path.endswith("/token"):
            form = parse_qs(request.content.decode())
            verifier = form["code_verifier"][0]
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            if digest.rstrip(b"=").decode() != self.challenge or form["code"] != ["good-code"]:
                return httpx.Response(400, json={"error": "invalid_grant"})
            return httpx.Response(
                200,
                json={"access_token": "at", "token_type": "Bearer", "id_token": self.id_token()},
            )
        if path.endswith("/certs"):
            return httpx.Response(200, json={"keys": [KEY.as_dict(private=False)]})
        return httpx.Response(404)


@pytest.fixture
def oidc_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "console_oidc_issuer": ISSUER,
            "console_oidc_client_id": CLIENT_ID,
            "public_base_url": "http://127.0.0.1",
        }
    )


@pytest.fixture
def provider() -> Provider:
    return Provider()


@pytest.fixture
async def sso(
    oidc_settings: Settings, runtime: Runtime, provider: Provider
) -> AsyncIterator[httpx.AsyncClient]:
    rt = Runtime.create(oidc_settings, profiles=shared_profiles(oidc_settings.profiles_dir))
    app = create_app(oidc_settings, runtime=rt, run_worker=False)
    app.state.console_oidc_transport = httpx.MockTransport(provider)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 50000)),
                base_url="http://127.0.0.1",
            ) as http,
        ):
            yield http
    finally:
        await rt.close()


async def _authorize(http: httpx.AsyncClient, provider: Provider) -> str:
    """Start the flow; the fake provider notes the nonce and the PKCE challenge; the
    state to send back."""
    login = await http.get("/console/login")
    assert "Sign in with single sign-on" in login.text
    started = await http.get("/console/oidc/start")
    assert started.status_code == 303
    location = urlsplit(started.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{ISSUER}/auth"
    query = parse_qs(location.query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["redirect_uri"] == ["http://127.0.0.1/console/oidc/callback"]
    provider.nonce, provider.challenge = query["nonce"][0], query["code_challenge"][0]
    return query["state"][0]


async def test_single_sign_on_opens_a_session_for_the_staff_account(
    sso: httpx.AsyncClient, provider: Provider, make_staff: StaffFactory, runtime: Runtime
) -> None:
    user = await make_staff("operator")
    provider.claims = {"preferred_username": user.upper()}
    state = await _authorize(sso, provider)
    back = await sso.get(f"/console/oidc/callback?code=good-code&state={state}")
    assert back.status_code == 303 and back.headers["location"] == "/console"
    overview = await sso.get("/console")
    assert overview.status_code == 200 and f"({'operator'})" in overview.text
    [login] = await rows(runtime, AuditEntry, AuditEntry.action == "login")
    assert login.actor == f"staff:{user}" and login.detail == {"method": "oidc"}


@pytest.mark.parametrize(
    "what", ["wrong-state", "wrong-nonce", "wrong-audience", "expired", "no-account"]
)
async def test_single_sign_on_refusals(
    sso: httpx.AsyncClient,
    provider: Provider,
    make_staff: StaffFactory,
    runtime: Runtime,
    what: str,
) -> None:
    user = await make_staff("viewer")
    provider.claims = {"preferred_username": "someone-else" if what == "no-account" else user}
    if what == "wrong-audience":
        provider.claims["aud"] = "another-app"
    if what == "expired":
        provider.claims["exp"] = int(time.time()) - 60
    state = await _authorize(sso, provider)
    if what == "wrong-nonce":
        provider.nonce = "not-the-nonce"
    if what == "wrong-state":
        state = "forged"
    back = await sso.get(f"/console/oidc/callback?code=good-code&state={state}")
    assert back.status_code == 401
    assert (await sso.get("/console")).status_code == 303  # no session
    failed = await rows(runtime, AuditEntry, AuditEntry.action == "login-failed")
    assert len(failed) == 1 and failed[0].outcome == "4"
    assert json.dumps(failed[0].detail) == '{"method": "oidc"}'


async def test_a_discovery_document_without_an_endpoint_is_refused_not_a_500(
    sso: httpx.AsyncClient, provider: Provider
) -> None:
    provider.withheld = {"authorization_endpoint"}
    started = await sso.get("/console/oidc/start")
    assert started.status_code == 401, started.text  # the sign-in page, with the reason
    assert "Single sign-on is unavailable" in started.text
    assert "has no authorization_endpoint" in started.text
