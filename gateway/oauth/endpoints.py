"""``GET /.well-known/jwks.json``: the public keys the gateway signs SMART client
assertions with (RFC 7517 section 5), for EHRs that register a JWKS URL.

It lists the gateway's published keys (pending, active and retiring ones: see
:mod:`gateway.oauth.keys`) and the public half of every key file an enabled target names.
``Cache-Control: max-age`` is ``GATEWAY_JWKS_MAX_AGE``; SMART servers must not cache the
set longer (https://hl7.org/fhir/smart-app-launch/backend-services.html).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.audit import service as audit
from gateway.db.types import utcnow
from gateway.deps import RuntimeDep, SessionDep
from gateway.egress import egress_transport
from gateway.logging import get_logger
from gateway.oauth import server
from gateway.oauth.keys import KeyFileError, load_key_file, public_jwk, published_jwks
from mappers.search import SEARCH_PARAMETERS

log = get_logger(__name__)

router = APIRouter(tags=["oauth"])


@router.get(
    "/.well-known/jwks.json",
    summary="The gateway's public signing keys (JWKS)",
    response_class=JSONResponse,
    responses={
        200: {
            "description": "The JWK Set (RFC 7517 section 5)",
            "content": {
                "application/jwk-set+json": {
                    "schema": {
                        "type": "object",
                        "required": ["keys"],
                        "properties": {"keys": {"type": "array", "items": {"type": "object"}}},
                    }
                }
            },
        }
    },
)
async def jwks(session: SessionDep, runtime: RuntimeDep) -> JSONResponse:
    """The JWKS: ``{"keys": [...]}``, public members only."""
    keys: list[dict[str, Any]] = await published_jwks(session, now=utcnow())
    profiles = runtime.profiles.current
    for target in profiles.enabled_targets():
        auth = target.auth
        if auth.method != "private_key_jwt" or not auth.private_key_file:
            continue
        path = Path(auth.private_key_file)
        try:
            material = load_key_file(
                path if path.is_absolute() else profiles.root / path, alg=auth.alg, kid=auth.kid
            )
        except KeyFileError:
            log.warning("jwks.key_file_unusable", target=target.name)
            continue
        keys.append(public_jwk(material.key, kid=material.kid, alg=material.alg))
    unique = list({k["kid"]: k for k in keys}.values())
    max_age = int(runtime.settings.jwks_max_age.total_seconds())
    return JSONResponse(
        {"keys": unique},
        media_type="application/jwk-set+json",
        headers={"Cache-Control": f"public, max-age={max_age}"},
    )


#: The token endpoint's form (documented for OpenAPI; read from the raw body).
TOKEN_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["grant_type", "client_assertion_type", "client_assertion", "scope"],
    "properties": {
        "grant_type": {"type": "string", "enum": ["client_credentials"]},
        "client_assertion_type": {"type": "string", "enum": [server.ASSERTION_TYPE]},
        "client_assertion": {"type": "string", "maxLength": 8192},
        "scope": {"type": "string", "maxLength": 2048},
    },
}

OAUTH_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}


def _oauth_error(exc: server.TokenRequestError) -> JSONResponse:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_client"'
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description},
        status_code=exc.status,
        headers=headers,
    )


@router.post(
    "/oauth/token",
    summary="Get an access token (SMART Backend Services, client_credentials)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/x-www-form-urlencoded": {"schema": TOKEN_FORM_SCHEMA}},
        }
    },
    responses={
        200: {
            "description": "The token (RFC 6749 section 5.1)",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["access_token", "token_type", "expires_in", "scope"],
                    }
                }
            },
        },
        400: {"description": "RFC 6749 section 5.2 error"},
        401: {"description": "invalid_client (RFC 6749 section 5.2)"},
    },
)
async def token(request: Request, session: SessionDep, runtime: RuntimeDep) -> JSONResponse:
    """``POST /oauth/token`` (https://hl7.org/fhir/smart-app-launch/backend-services.html):
    a bearer token for a registered client's ``private_key_jwt`` assertion
    (:mod:`gateway.oauth.server`); RFC 6749 errors. Public: the assertion is the
    credential."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    try:
        if content_type != "application/x-www-form-urlencoded":
            raise server.TokenRequestError(
                "invalid_request", "the body must be application/x-www-form-urlencoded"
            )
        try:
            pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError as exc:
            raise server.TokenRequestError("invalid_request", "the body is not UTF-8") from exc
        form = dict(pairs)
        if "\x00" in "".join(form.values()):
            raise server.TokenRequestError("invalid_request", "NUL characters are refused")
        token_url = f"{runtime.settings.public_base_url}/oauth/token"

        async def fetch(url: str) -> dict[str, Any]:
            runtime.egress.check_url(url)
            async with httpx.AsyncClient(
                transport=egress_transport(runtime.egress), timeout=5.0
            ) as http:
                response = await http.get(url, headers={"Accept": "application/json"})
                response.raise_for_status()
                data = response.json()
            if not isinstance(data, dict):
                raise ValueError("not a JWK Set")
            return data

        answer = await server.issue_token(
            session,
            form,
            token_url=token_url,
            now=runtime.clock.now(),
            fetch_jwks=fetch,
            fhir_types=frozenset(SEARCH_PARAMETERS),
        )
    except server.TokenRequestError as exc:
        log.info("oauth.token_refused", error=exc.error)
        return _oauth_error(exc)
    audit.record(
        session,
        action="create",
        entity_type="AccessToken",
        entity_id=answer["access_token"].split("_")[1],
    )
    return JSONResponse(answer, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})
