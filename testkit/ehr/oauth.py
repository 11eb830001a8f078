"""The local EHR's OAuth 2.0 token endpoint and bearer tokens (framework-free).

Client credentials grant (RFC 6749 section 4.4) with one registered client, authenticated by:

* ``client_secret_basic`` (RFC 6749 section 2.3.1: id and secret form-urlencoded, then base64);
* ``client_secret_post`` (``client_id`` and ``client_secret`` in the form);
* ``private_key_jwt``, as SMART Backend Services require
  (https://hl7.org/fhir/smart-app-launch/backend-services.html, RFC 7523 section 3):
  ``client_assertion_type`` = ``urn:ietf:params:oauth:client-assertion-type:jwt-bearer``,
  a JWS signed with an accepted ``alg`` (RS384/ES384) by a ``kid`` of the registered JWKS,
  ``iss == sub == client_id``, ``aud`` = the token URL, ``exp`` at most 5 minutes ahead (and
  after ``iat``), and a ``jti`` never used before.

Errors are RFC 6749 section 5.2 responses (:class:`OAuthError`); every assertion problem is
``invalid_client`` with the reason in ``error_description``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import unquote_plus

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

JWT_BEARER_ASSERTION: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART Backend Services: exp "no more than five minutes in the future".
MAX_ASSERTION_LIFETIME_S: Final = 300
#: Allowance for clock differences when checking exp/iat/nbf.
CLOCK_SKEW_S: Final = 5
_BASIC_CHALLENGE: Final = {"WWW-Authenticate": 'Basic realm="local-ehr"'}

TokenAuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]


class OAuthError(Exception):
    """A token request failed; rendered as an RFC 6749 section 5.2 error response."""

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.headers = dict(headers or {})

    @property
    def body(self) -> dict[str, str]:
        """The JSON error body."""
        return {"error": self.error, "error_description": self.description}


@dataclass(frozen=True)
class IssuedToken:
    """An access token the endpoint issued."""

    client_id: str
    scope: str
    expires_monotonic_s: float


def auth_method(authorization: str, form: Mapping[str, str]) -> TokenAuthMethod:
    """The client authentication a token request uses (as sent, before any check)."""
    if authorization[:6].lower() == "basic ":
        return "client_secret_basic"
    if "client_assertion" in form:
        return "private_key_jwt"
    if "client_secret" in form:
        return "client_secret_post"
    return "none"


def basic_credentials(authorization: str) -> tuple[str, str]:
    """``(client_id, secret)`` of a ``Basic`` header (RFC 6749 section 2.3.1).

    Raises:
        OAuthError: 401 ``invalid_client`` when the header is malformed.
    """
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise OAuthError(
            401, "invalid_client", "Malformed Basic credentials", headers=_BASIC_CHALLENGE
        ) from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError(
            401, "invalid_client", "Malformed Basic credentials", headers=_BASIC_CHALLENGE
        )
    return unquote_plus(client_id), unquote_plus(secret)


class TokenIssuer:
    """One registered client, the tokens issued to it, and the checks of both.

    Thread-safe: the endpoint runs in the server's thread, tests call in from theirs.

    Args:
        client_id: the registered client.
        client_secret: its secret, for ``client_secret_basic`` and ``client_secret_post``.
        token_lifetime_s: ``expires_in`` of issued tokens.
        jwks: public JWKS registered for ``private_key_jwt`` (None: assertions are refused).
        required_scopes: scopes every token request must include (else ``invalid_scope``).
        assertion_algorithms: JWS algorithms accepted for client assertions.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        token_lifetime_s: int,
        jwks: Mapping[str, Any] | None,
        required_scopes: set[str] | None,
        assertion_algorithms: tuple[str, ...],
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime_s = token_lifetime_s
        self.required_scopes = set(required_scopes) if required_scopes else None
        self.assertion_algorithms = assertion_algorithms
        self._lock = threading.Lock()
        self._key_set: KeySet | None = None
        self._tokens: dict[str, IssuedToken] = {}
        self._revoked: set[str] = set()
        self._seen_jtis: dict[tuple[str, str], float] = {}  # (iss, jti) -> exp (epoch s)
        self.set_jwks(jwks)

    def set_jwks(self, jwks: Mapping[str, Any] | None) -> None:
        """Register (or replace, for key rotation tests) the client's public JWKS."""
        key_set = KeySet.import_key_set(dict(jwks)) if jwks is not None else None  # type: ignore[arg-type]
        with self._lock:
            self._key_set = key_set

    # ------------------------------------------------------------------ tokens

    def issue(self, client_id: str, scope: str) -> str:
        """A new access token for ``client_id`` with ``scope``."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = IssuedToken(
                client_id, scope, time.monotonic() + self.token_lifetime_s
            )
        return token

    def revoke_all(self) -> None:
        """Revoke every access token issued so far."""
        with self._lock:
            self._revoked.update(self._tokens)
            self._tokens.clear()

    def bearer(self, authorization: str) -> IssuedToken | str:
        """The valid token of an ``Authorization`` header, or why it is refused (RFC 6750)."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "Missing bearer token"
        with self._lock:
            issued = self._tokens.get(token)
            revoked = token in self._revoked
        if issued is not None and time.monotonic() < issued.expires_monotonic_s:
            return issued
        if revoked:
            return "The access token has been revoked"
        return "The access token has expired" if issued is not None else "Unknown access token"

    # ------------------------------------------------------------------ token requests

    def token_response(
        self,
        *,
        media_type: str,
        form: Mapping[str, str],
        repeated: bool,
        authorization: str,
        token_url: str,
    ) -> dict[str, Any]:
        """The JSON body of a successful token response (RFC 6749 section 5.1).

        Args:
            media_type: the request's Content-Type (without parameters).
            form: the form parameters.
            repeated: a parameter appeared more than once (RFC 6749 section 3.2: refused).
            authorization: the ``Authorization`` header ("" when absent).
            token_url: the URL the request was sent to (the assertion's ``aud``).

        Raises:
            OAuthError: the request is refused.
        """
        if media_type != "application/x-www-form-urlencoded":
            raise OAuthError(400, "invalid_request", "Body must be form-urlencoded")
        if repeated:
            raise OAuthError(400, "invalid_request", "A parameter is repeated")
        grant_type = form.get("grant_type")
        if not grant_type:
            raise OAuthError(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise OAuthError(400, "unsupported_grant_type", "Only client_credentials is supported")
        client_id = self._authenticate(form, authorization, token_url)
        scope = form.get("scope", "").strip()
        if not scope:
            raise OAuthError(400, "invalid_scope", "scope is required")
        if self.required_scopes is not None:
            missing = self.required_scopes - set(scope.split())
            if missing:
                raise OAuthError(
                    400, "invalid_scope", f"Missing required scopes: {' '.join(sorted(missing))}"
                )
        return {
            "access_token": self.issue(client_id, scope),
            "token_type": "bearer",
            "expires_in": self.token_lifetime_s,
            "scope": scope,
        }

    def _authenticate(self, form: Mapping[str, str], authorization: str, token_url: str) -> str:
        """The authenticated client_id (RFC 6749 section 2.3, RFC 7523, SMART Backend Services)."""
        basic = authorization[:6].lower() == "basic "
        used = [
            basic,
            "client_secret" in form,
            "client_assertion" in form or "client_assertion_type" in form,
        ]
        if sum(used) > 1:
            raise OAuthError(400, "invalid_request", "Use exactly one client authentication method")
        if basic:
            client_id, secret = basic_credentials(authorization)
            self._check_secret(client_id, secret, basic=True)
            if "client_id" in form and form["client_id"] != client_id:
                raise OAuthError(400, "invalid_request", "client_id differs from Basic auth")
            return client_id
        if "client_secret" in form:
            client_id = form.get("client_id", "")
            self._check_secret(client_id, form["client_secret"], basic=False)
            return client_id
        if "client_assertion" in form or "client_assertion_type" in form:
            if form.get("client_assertion_type") != JWT_BEARER_ASSERTION:
                raise OAuthError(
                    400, "invalid_request", f"client_assertion_type must be {JWT_BEARER_ASSERTION}"
                )
            return self._verify_assertion(
                form.get("client_assertion", ""),
                form_client_id=form.get("client_id"),
                token_url=token_url,
            )
        raise OAuthError(401, "invalid_client", "Client authentication is required")

    def _check_secret(self, client_id: str, secret: str, *, basic: bool) -> None:
        id_ok = hmac.compare_digest(client_id.encode(), self.client_id.encode())
        secret_ok = hmac.compare_digest(secret.encode(), self.client_secret.encode())
        if not (id_ok and secret_ok):
            raise OAuthError(
                401,
                "invalid_client",
                "Unknown client or wrong secret",
                headers=_BASIC_CHALLENGE if basic else None,
            )

    def _verify_assertion(
        self, assertion: str, *, form_client_id: str | None, token_url: str
    ) -> str:
        """Check a SMART Backend Services client assertion; returns the client_id."""

        def reject(reason: str) -> OAuthError:
            return OAuthError(401, "invalid_client", f"client_assertion rejected: {reason}")

        with self._lock:
            key_set = self._key_set
        if key_set is None:
            raise reject("no JWKS is registered for the client")
        try:
            segment = assertion.split(".")[0]
            header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        except (ValueError, binascii.Error) as exc:
            raise reject("not a compact JWS") from exc
        if not isinstance(header, dict):
            raise reject("not a compact JWS")
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if alg not in self.assertion_algorithms:
            raise reject(f"alg {alg!r} not accepted (use {' or '.join(self.assertion_algorithms)})")
        if not isinstance(kid, str) or not kid:
            raise reject("header has no kid")
        if typ is not None and str(typ).upper() != "JWT":
            raise reject("typ must be JWT")
        try:
            key = key_set.get_by_kid(kid)
        except JoseError as exc:
            raise reject(f"kid {kid!r} is not in the registered JWKS") from exc
        try:
            claims = jwt.decode(assertion, key, algorithms=[alg]).claims
        except (JoseError, ValueError) as exc:
            raise reject("signature verification failed") from exc

        iss, sub = claims.get("iss"), claims.get("sub")
        if iss != self.client_id or sub != self.client_id:
            raise reject("iss and sub must both equal the client_id")
        if form_client_id is not None and form_client_id != iss:
            raise reject("client_id parameter differs from iss")
        aud = claims.get("aud")
        if not (aud == token_url or (isinstance(aud, list) and token_url in aud)):
            raise reject("aud must be the token endpoint URL")
        now = time.time()
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise reject("exp is required")
        if exp <= now - CLOCK_SKEW_S:
            raise reject("assertion has expired")
        if exp > now + MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S:
            raise reject("exp is more than 5 minutes in the future")
        if isinstance(iat, int | float):
            if iat > now + CLOCK_SKEW_S:
                raise reject("iat is in the future")
            if exp - iat > MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S:
                raise reject("exp is more than 5 minutes after iat")
        if isinstance(nbf, int | float) and nbf > now + CLOCK_SKEW_S:
            raise reject("assertion is not valid yet (nbf)")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise reject("jti is required")
        with self._lock:
            for seen, seen_exp in list(self._seen_jtis.items()):
                if seen_exp < now - CLOCK_SKEW_S:
                    del self._seen_jtis[seen]
            if (iss, jti) in self._seen_jtis:
                raise reject("jti has already been used")
            self._seen_jtis[(iss, jti)] = float(exp)
        return self.client_id
