"""The gateway as an OAuth 2.0 authorization server for its own APIs: SMART Backend
Services (https://hl7.org/fhir/smart-app-launch/backend-services.html).

A registered client (``fhir-gateway clients create --jwks-url URL | --jwks FILE``) posts
``grant_type=client_credentials`` with a ``private_key_jwt`` client assertion (RFC 7523):

* header ``alg`` RS384 or ES384, ``kid`` naming one of the client's keys (its registered
  JWKS, or the one at its JWKS URL, fetched through the egress policy); a ``jku`` must be
  that URL;
* claims ``iss`` = ``sub`` = the client id (its name), ``aud`` = this token URL, ``exp``
  at most five minutes ahead, a ``jti`` never seen before for the client (kept until the
  assertion expires).

The answer is a bearer token for :data:`TOKEN_LIFETIME` (no refresh token), with the
granted scopes. SMART v2 scopes (``system/Patient.rs``; v1 ``system/Patient.read``) map
to ``fhir:read`` limited to those resource types (``system/*.rs``: all), and
``system/AuditEvent.rs`` to ``audit:read``; the gateway's own scopes (``intake:write``...)
may be asked for too. Only what the client was registered with is granted. Tokens are
stored hashed (``access_tokens``) and authenticate like API keys
(:func:`gateway.clients.service.authenticate`).

Errors are RFC 6749 section 5.2 (``{"error", "error_description"}``): ``invalid_request``,
``invalid_client`` (401), ``invalid_scope``, ``unsupported_grant_type``. The JOSE work is
joserfc's (authlib's JOSE implementation).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.clients.service import SCOPES
from gateway.db.bulk import insert_ignore
from gateway.db.models import AccessToken, ApiClient, AssertionJti

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS384", "ES384")
#: The longest an assertion may live (``exp`` - now), SMART Backend Services.
MAX_ASSERTION_LIFETIME = timedelta(minutes=5)
#: Clock skew allowed on ``exp`` and ``nbf``.
LEEWAY = timedelta(seconds=30)
#: An access token's lifetime (SMART: SHOULD NOT exceed 300 s).
TOKEN_LIFETIME = timedelta(seconds=300)

JwksFetcher = Callable[[str], Awaitable[dict[str, Any]]]


class TokenRequestError(Exception):
    """A token request refused: an RFC 6749 error code, a description without secrets,
    and the HTTP status (400; 401 for ``invalid_client``)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = 401 if error == "invalid_client" else 400


@dataclass(frozen=True)
class Grant:
    """What a token grants: gateway scopes, FHIR resource types (None: all), and the scope
    string answered."""

    scopes: frozenset[str]
    resource_types: frozenset[str] | None
    text: str


def map_scopes(requested: str, *, registered: frozenset[str], fhir_types: frozenset[str]) -> Grant:
    """Map a token request's ``scope`` to what is granted.

    ``system/<Type>.<perms>``: v2 ``perms`` a subset of ``cruds`` in order, or v1
    ``read``/``write``/``*``; a read (``r`` or ``s``) grants ``fhir:read`` for ``Type``
    (``*``: every type) when the client holds ``fhir:read``; ``system/AuditEvent.rs``
    grants ``audit:read``. A gateway scope is granted when the client holds it. Anything
    else (writes, ``patient/`` and ``user/`` scopes, unknown types) is left out.

    >>> g = map_scopes("system/Patient.rs intake:write system/Flag.cud",
    ...                registered=frozenset({"fhir:read", "intake:write"}),
    ...                fhir_types=frozenset({"Patient", "Flag"}))
    >>> sorted(g.scopes), sorted(g.resource_types or []), g.text
    (['fhir:read', 'intake:write'], ['Patient'], 'system/Patient.rs intake:write')

    Raises:
        TokenRequestError: ``invalid_scope``, nothing requested could be granted.
    """
    granted: set[str] = set()
    types: set[str] = set()
    every_type = False
    answered: list[str] = []
    for scope in requested.split():
        if scope in SCOPES:
            if scope in registered:
                granted.add(scope)
                answered.append(scope)
            continue
        context, _, rest = scope.partition("/")
        rtype, _, perms = rest.partition(".")
        if context != "system" or not _reads(perms):
            continue
        if rtype == "AuditEvent" and "audit:read" in registered:
            granted.add("audit:read")
            answered.append(scope)
        elif (rtype == "*" or rtype in fhir_types) and "fhir:read" in registered:
            granted.add("fhir:read")
            every_type = every_type or rtype == "*"
            types.add(rtype)
            answered.append(scope)
    if not granted:
        raise TokenRequestError("invalid_scope", "none of the requested scopes can be granted")
    resource_types = None if every_type or "fhir:read" not in granted else frozenset(types)
    return Grant(frozenset(granted), resource_types, " ".join(answered))


def _reads(perms: str) -> bool:
    if perms in ("read", "*"):
        return True
    order = "cruds"
    if not perms or any(p not in order for p in perms):
        return False
    positions = [order.index(p) for p in perms]
    return positions == sorted(set(positions)) and ("r" in perms or "s" in perms)


def hash_token(token: str) -> str:
    """Hex SHA-256 of an access token (what is stored)."""
    return hashlib.sha256(token.encode()).hexdigest()


async def issue_token(
    session: AsyncSession,
    form: Mapping[str, str],
    *,
    token_url: str,
    now: datetime,
    fetch_jwks: JwksFetcher,
    fhir_types: frozenset[str],
) -> dict[str, Any]:
    """Check a ``client_credentials`` request and issue a token (added to ``session``;
    the caller commits).

    Args:
        form: the request's form fields.
        token_url: this endpoint's URL (the assertion's ``aud``).
        now: the current time (aware).
        fetch_jwks: reads a client's JWKS URL (through the egress policy).
        fhir_types: the resource types ``system/<Type>.rs`` may name.

    Returns:
        The RFC 6749 token response.

    Raises:
        TokenRequestError: the request, the client, its assertion or its scopes refused.
    """
    if form.get("grant_type") != "client_credentials":
        raise TokenRequestError("unsupported_grant_type", "grant_type must be client_credentials")
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise TokenRequestError(
            "invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}"
        )
    assertion = form.get("client_assertion") or ""
    if not assertion or "scope" not in form:
        raise TokenRequestError("invalid_request", "client_assertion and scope are required")
    try:
        unverified = jws.extract_compact(assertion.encode())
        header = unverified.headers()
        claims = json.loads(unverified.payload)
    except (JoseError, ValueError, UnicodeDecodeError) as exc:
        raise TokenRequestError("invalid_client", "the client assertion is not a JWT") from exc
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    if not isinstance(issuer, str) or not issuer:
        raise TokenRequestError("invalid_client", "the assertion has no iss")
    client = await session.scalar(select(ApiClient).where(ApiClient.name == issuer))
    if client is None or client.revoked_at is not None or not (client.jwks or client.jwks_url):
        raise TokenRequestError("invalid_client", "unknown client")
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise TokenRequestError("invalid_client", "alg must be RS384 or ES384")
    if header.get("jku") is not None and header.get("jku") != client.jwks_url:
        raise TokenRequestError("invalid_client", "jku is not the client's registered JWKS URL")
    if client.jwks is not None:
        jwks = client.jwks
    else:
        try:
            jwks = await fetch_jwks(str(client.jwks_url))
        except Exception as exc:  # any failure to read the URL: the client cannot be checked
            raise TokenRequestError(
                "invalid_client", "the client's JWKS URL could not be read"
            ) from exc
    try:
        keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        token = jwt.decode(assertion, keys, algorithms=[alg])
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise TokenRequestError(
            "invalid_client", "the assertion's signature does not verify"
        ) from exc
    _check_claims(token.claims, client=issuer, token_url=token_url, now=now)
    jti = str(token.claims["jti"])
    expires = datetime.fromtimestamp(int(token.claims["exp"]), tz=now.tzinfo)
    await session.execute(delete(AssertionJti).where(AssertionJti.expires_at < now - LEEWAY))
    inserted = await session.scalar(
        insert_ignore(session, AssertionJti)
        .values(client_id=client.id, jti=jti[:256], expires_at=expires + LEEWAY)
        .on_conflict_do_nothing()
        .returning(AssertionJti.jti)
    )
    if inserted is None:
        raise TokenRequestError("invalid_client", "the assertion's jti was used before")
    grant = map_scopes(form["scope"], registered=frozenset(client.scopes), fhir_types=fhir_types)
    token_id = secrets.token_hex(8)
    access_token = f"fgt_{token_id}_{secrets.token_urlsafe(32)}"
    session.add(
        AccessToken(
            token_id=token_id,
            token_hash=hash_token(access_token),
            client_id=client.id,
            scopes=sorted(grant.scopes),
            resource_types=sorted(grant.resource_types)
            if grant.resource_types is not None
            else None,
            granted=grant.text,
            created_at=now,
            expires_at=now + TOKEN_LIFETIME,
        )
    )
    await session.flush()
    return {
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": int(TOKEN_LIFETIME.total_seconds()),
        "scope": grant.text,
    }


def _check_claims(claims: dict[str, Any], *, client: str, token_url: str, now: datetime) -> None:
    if claims.get("sub") != client:
        raise TokenRequestError("invalid_client", "iss and sub must both be the client id")
    aud = claims.get("aud")
    if not (aud == token_url or (isinstance(aud, list) and token_url in aud)):
        raise TokenRequestError("invalid_client", "aud must be the token URL")
    exp = claims.get("exp")
    if not isinstance(exp, int | float):
        raise TokenRequestError("invalid_client", "the assertion has no exp")
    now_s = now.timestamp()
    if exp < now_s - LEEWAY.total_seconds():
        raise TokenRequestError("invalid_client", "the assertion has expired")
    if exp > now_s + (MAX_ASSERTION_LIFETIME + LEEWAY).total_seconds():
        raise TokenRequestError("invalid_client", "exp is more than five minutes ahead")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and nbf > now_s + LEEWAY.total_seconds():
        raise TokenRequestError("invalid_client", "the assertion is not valid yet")
    if not isinstance(claims.get("jti"), str) or not claims["jti"]:
        raise TokenRequestError("invalid_client", "the assertion has no jti")


def validate_jwks(jwks: Any) -> dict[str, Any]:
    """A client's JWKS to register: public RSA or EC keys only, each with a ``kid``.

    Raises:
        ValueError: not a JWK Set of such keys.
    """
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ValueError('a JWK Set: {"keys": [...]}')
    for key in jwks["keys"]:
        if not isinstance(key, dict) or key.get("kty") not in ("RSA", "EC") or "kid" not in key:
            raise ValueError("each key is an RSA or EC key with a kid")
        if "d" in key:
            raise ValueError("register the public key only (the JWK holds a private part)")
    try:
        KeySet.import_key_set(jwks)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError) as exc:
        raise ValueError("the JWK Set cannot be read") from exc
    return {"keys": jwks["keys"]}
