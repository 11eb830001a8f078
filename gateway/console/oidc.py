"""Optional OpenID Connect sign-in for the console (``GATEWAY_CONSOLE_OIDC_*``).

The authorization code flow with PKCE (RFC 7636) and a nonce (OpenID Connect Core 1.0,
section 3.1): ``/console/oidc/start`` reads the provider's discovery document, keeps the
``state``, ``nonce`` and code verifier in a short-lived ``HttpOnly`` cookie and sends the
browser to the provider; ``/console/oidc/callback`` checks the ``state``, exchanges the
code (authlib's ``AsyncOAuth2Client``, client secret basic), and verifies the ID token
(joserfc: signature against the provider's JWKS, ``iss``, ``aud``, ``exp``, ``nonce``).

The claim ``GATEWAY_CONSOLE_OIDC_USERNAME_CLAIM`` (``preferred_username``) must name an
active staff account: accounts and roles are still managed with ``fhir-gateway staff``;
the provider only proves who the person is. Requests to the provider go through the
egress policy like every outbound request.

Errors: :class:`OidcError` (any step failed; its message names the step, never a token).
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import authlib.deprecate  # noqa: F401 - installs its own "always" filter when imported
import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from gateway.egress import egress_transport
from gateway.runtime import Runtime

with warnings.catch_warnings():
    # as in gateway.oauth.tokens: authlib prefers the "httpx2" fork and warns otherwise
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

#: The cookie holding the flow's state, nonce and code verifier between the two steps.
FLOW_COOKIE = "fgw_console_oidc"
CALLBACK_PATH = "/console/oidc/callback"
ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


class OidcError(Exception):
    """The OpenID Connect sign-in failed at one of its steps."""


@dataclass(frozen=True)
class Flow:
    """What the callback must find again: the state, the nonce and the code verifier."""

    state: str
    nonce: str
    verifier: str

    def cookie(self) -> str:
        """The cookie value (three URL-safe tokens)."""
        return f"{self.state}.{self.nonce}.{self.verifier}"

    @classmethod
    def from_cookie(cls, value: str | None) -> Flow | None:
        """The flow kept in the cookie, or None."""
        parts = (value or "").split(".")
        return cls(*parts) if len(parts) == 3 and all(parts) else None


def enabled(runtime: Runtime) -> bool:
    """True when an issuer and a client id are configured."""
    s = runtime.settings
    return bool(s.console_oidc_issuer and s.console_oidc_client_id)


def _client(runtime: Runtime, transport: httpx.AsyncBaseTransport | None) -> AsyncOAuth2Client:
    s = runtime.settings
    secret = (
        s.console_oidc_client_secret.get_secret_value() if s.console_oidc_client_secret else None
    )
    return AsyncOAuth2Client(
        client_id=s.console_oidc_client_id,
        client_secret=secret,
        token_endpoint_auth_method="client_secret_basic" if secret else "none",
        redirect_uri=s.public_base_url.rstrip("/") + CALLBACK_PATH,
        scope="openid profile email",
        code_challenge_method="S256",
        transport=transport or egress_transport(runtime.egress),
        timeout=10.0,
    )


async def _discovery(client: AsyncOAuth2Client, issuer: str) -> dict[str, Any]:
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        answer = await client.request("GET", url, withhold_token=True)
        answer.raise_for_status()
        document: dict[str, Any] = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise OidcError(
            f"the provider's discovery document could not be read ({type(exc).__name__})"
        ) from exc
    if document.get("issuer") != issuer:
        raise OidcError("the discovery document names another issuer")
    missing = [
        key
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri")
        if not isinstance(document.get(key), str)
    ]
    if missing:  # OpenID Connect Discovery 1.0, section 3: all three are REQUIRED here
        raise OidcError(f"the discovery document has no {', '.join(missing)}")
    return document


async def start(
    runtime: Runtime, *, transport: httpx.AsyncBaseTransport | None = None
) -> tuple[str, Flow]:
    """The provider's authorization URL to send the browser to, and the flow to keep.

    Raises:
        OidcError: the discovery document could not be read.
    """
    issuer = runtime.settings.console_oidc_issuer or ""
    flow = Flow(secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48))
    async with _client(runtime, transport) as client:
        document = await _discovery(client, issuer)
        url, _ = client.create_authorization_url(
            document["authorization_endpoint"],
            state=flow.state,
            nonce=flow.nonce,
            code_verifier=flow.verifier,
        )
    return url, flow


async def finish(
    runtime: Runtime,
    *,
    flow: Flow,
    code: str,
    state: str,
    transport: httpx.AsyncBaseTransport | None = None,
) -> str:
    """Exchange the code and verify the ID token; the username it names (lower case).

    Raises:
        OidcError: a wrong state, a refused code, an ID token that does not verify, or no
            username claim.
    """
    if not secrets.compare_digest(flow.state, state):
        raise OidcError("the sign-in's state does not match: start again")
    s = runtime.settings
    issuer = s.console_oidc_issuer or ""
    async with _client(runtime, transport) as client:
        document = await _discovery(client, issuer)
        try:
            token = await client.fetch_token(
                document["token_endpoint"], code=code, code_verifier=flow.verifier
            )
            keys = await client.request("GET", document["jwks_uri"], withhold_token=True)
            keys.raise_for_status()
            key_set = KeySet.import_key_set(keys.json())
        except (OAuthError, httpx.HTTPError, ValueError, KeyError) as exc:
            raise OidcError(f"the code exchange failed ({type(exc).__name__})") from exc
    id_token = token.get("id_token")
    if not isinstance(id_token, str):
        raise OidcError("the provider sent no ID token")
    try:
        decoded = jwt.decode(id_token, key_set, algorithms=ALGORITHMS)
        jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": s.console_oidc_client_id or ""},
            nonce={"essential": True, "value": flow.nonce},
            exp={"essential": True},
        ).validate(decoded.claims)
    except (JoseError, ValueError) as exc:
        raise OidcError(f"the ID token does not verify ({type(exc).__name__})") from exc
    username = decoded.claims.get(s.console_oidc_username_claim)
    if not isinstance(username, str) or not username:
        raise OidcError(f"the ID token has no {s.console_oidc_username_claim} claim")
    return username.strip().lower()
