"""The gateway as a SMART Backend Services authorization server (``POST /oauth/token``):
authlib's OAuth 2 client signs the client assertions (RS384 and ES384, a registered JWKS
or a JWKS URL served on loopback); the tokens then open ``/fhir`` per SMART v2 scope."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT, private_key_jwt_sign
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.clients.service import create_client
from gateway.runtime import Runtime
from tests.support.served import serve_app

TOKEN_PATH = "/oauth/token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class SmartPrivateKeyJWT(PrivateKeyJWT):  # type: ignore[misc]
    """authlib's private_key_jwt with SMART's rules: exp at most 300 s, a fresh jti."""

    def sign(self, auth: Any, token_endpoint: str) -> Any:
        return private_key_jwt_sign(
            auth.client_secret,
            client_id=auth.client_id,
            token_endpoint=token_endpoint,
            claims=dict(self.claims or {}),
            header=dict(self.headers or {}),
            alg=self.alg,
            expires_in=300,
        )


def rsa_key(kid: str = "rsa-1") -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS384"})


def ec_key(kid: str = "ec-1") -> ECKey:
    return ECKey.generate_key("P-384", parameters={"kid": kid, "alg": "ES384"})


def public_jwks(*keys: RSAKey | ECKey) -> dict[str, Any]:
    return {"keys": [k.as_dict(private=False) for k in keys]}


async def register(
    runtime: Runtime,
    *,
    scopes: list[str],
    jwks: dict[str, Any] | None = None,
    jwks_url: str | None = None,
) -> str:
    name = f"backend-{uuid.uuid4().hex[:8]}"
    async with runtime.sessionmaker() as session:
        await create_client(session, name=name, scopes=scopes, jwks=jwks, jwks_url=jwks_url)
        await session.commit()
    return name


def token_url(runtime: Runtime) -> str:
    return f"{runtime.settings.public_base_url}{TOKEN_PATH}"


def assertion(
    key: RSAKey | ECKey,
    client_id: str,
    aud: str,
    *,
    alg: str = "RS384",
    exp_in: int = 240,
    jti: str | None = None,
) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": now + exp_in,
        "jti": jti or uuid.uuid4().hex,
    }
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, claims, key, algorithms=[alg])


async def post_token(client: httpx.AsyncClient, jws: str, scope: str) -> httpx.Response:
    return await client.post(
        TOKEN_PATH,
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jws,
        },
    )


@contextlib.asynccontextmanager
async def authlib_client(
    client: httpx.AsyncClient,
    runtime: Runtime,
    name: str,
    key: RSAKey | ECKey,
    alg: str,
    scope: str,
) -> AsyncIterator[AsyncOAuth2Client]:
    url = token_url(runtime)
    oauth = AsyncOAuth2Client(
        client_id=name,
        client_secret=key,
        token_endpoint_auth_method="private_key_jwt",
        token_endpoint=url,
        grant_type="client_credentials",
        scope=scope,
        transport=client._transport,  # the app in-process
        base_url="http://gateway.test",
    )
    oauth.register_client_auth_method(SmartPrivateKeyJWT(url, alg=alg, headers={"kid": key.kid}))
    async with oauth:
        yield oauth


@pytest.mark.parametrize(("make_key", "alg"), [(rsa_key, "RS384"), (ec_key, "ES384")])
async def test_a_registered_backend_client_gets_a_token_that_opens_its_types(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    make_key: Any,
    alg: str,
) -> None:
    key = make_key()
    name = await register(runtime, scopes=["fhir:read", "intake:write"], jwks=public_jwks(key))
    async with authlib_client(
        client, runtime, name, key, alg, "system/Patient.rs system/Observation.cud"
    ) as oauth:
        token = await oauth.fetch_token(token_url(runtime))
        assert token["token_type"].lower() == "bearer"
        assert token["expires_in"] == 300
        assert token["scope"] == "system/Patient.rs"
        headers = {"Authorization": f"Bearer {token['access_token']}"}
    r = await client.get("/fhir/Patient", headers=headers)
    assert r.status_code == 200, r.text
    refused = await client.get("/fhir/Observation", headers=headers)
    assert refused.status_code == 403
    assert refused.json()["resourceType"] == "OperationOutcome"
    v1 = await client.post("/v1/intake-submissions", json={}, headers=headers)
    assert v1.status_code == 403  # intake:write was not asked for


async def test_a_jwks_url_client_and_v1_scopes(client: httpx.AsyncClient, runtime: Runtime) -> None:
    key = ec_key("ec-url")

    async def keys(_request: Any) -> JSONResponse:
        return JSONResponse(public_jwks(key))

    async with serve_app(Starlette(routes=[Route("/jwks.json", keys)])) as base:
        name = await register(
            runtime, scopes=["fhir:read", "cases:read"], jwks_url=f"{base}/jwks.json"
        )
        r = await post_token(
            client,
            assertion(key, name, token_url(runtime), alg="ES384"),
            "system/*.rs cases:read",
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scope"] == "system/*.rs cases:read"
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    assert (await client.get("/fhir/Observation", headers=headers)).status_code == 200
    assert (await client.get("/v1/cases", headers=headers)).status_code == 200


async def test_a_replayed_assertion_is_refused(client: httpx.AsyncClient, runtime: Runtime) -> None:
    key = rsa_key()
    name = await register(runtime, scopes=["fhir:read"], jwks=public_jwks(key))
    jws = assertion(key, name, token_url(runtime))
    first = await post_token(client, jws, "system/Patient.rs")
    assert first.status_code == 200
    again = await post_token(client, jws, "system/Patient.rs")
    assert again.status_code == 401
    assert again.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    "change",
    ["aud", "exp_far", "expired", "alg_rs256", "other_key", "unknown_client"],
)
async def test_a_bad_assertion_is_invalid_client(
    client: httpx.AsyncClient, runtime: Runtime, change: str
) -> None:
    key = rsa_key()
    name = await register(runtime, scopes=["fhir:read"], jwks=public_jwks(key))
    aud, exp_in, alg, signer, iss = token_url(runtime), 240, "RS384", key, name
    if change == "aud":
        aud = "https://elsewhere.example/token"
    elif change == "exp_far":
        exp_in = 3600
    elif change == "expired":
        exp_in = -120
    elif change == "alg_rs256":
        alg, signer = "RS256", RSAKey.generate_key(2048, parameters={"kid": key.kid})
    elif change == "other_key":
        signer = rsa_key()  # same kid, another key
    else:
        iss = "nobody"
    r = await post_token(
        client, assertion(signer, iss, aud, alg=alg, exp_in=exp_in), "system/Patient.rs"
    )
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "invalid_client"
    assert r.headers["cache-control"] == "no-store"


async def test_scopes_the_client_does_not_hold_are_invalid_scope(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    key = rsa_key()
    name = await register(runtime, scopes=["intake:write"], jwks=public_jwks(key))
    r = await post_token(client, assertion(key, name, token_url(runtime)), "system/Patient.rs")
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_scope"


async def test_other_grants_and_bodies_are_refused(client: httpx.AsyncClient) -> None:
    r = await client.post(TOKEN_PATH, data={"grant_type": "password"})
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_grant_type")
    r = await client.post(TOKEN_PATH, json={"grant_type": "client_credentials"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")


async def test_an_expired_token_is_refused(client: httpx.AsyncClient, runtime: Runtime) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from gateway.db.models import AccessToken
    from gateway.db.types import utcnow

    key = rsa_key()
    name = await register(runtime, scopes=["fhir:read"], jwks=public_jwks(key))
    r = await post_token(client, assertion(key, name, token_url(runtime)), "system/*.rs")
    token = r.json()["access_token"]
    async with runtime.sessionmaker() as session:
        await session.execute(
            update(AccessToken).values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    refused = await client.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401
    assert refused.json()["resourceType"] == "OperationOutcome"
