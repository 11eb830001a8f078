"""A controllable local test EHR: an OAuth token endpoint plus a FHIR R4 REST API over real HTTP.

Tests and benchmarks start it on 127.0.0.1 and point the gateway at it::

    ehr = FakeEhr(client_id="gateway", client_secret="s3cret")
    async with run_fake_ehr_async(ehr) as running:
        ...  # deliver to running.fhir_base, fetch tokens from running.token_url
        assert ehr.count("Patient") == 1

What it plays (FHIR handling lives in ``fake_ehr_store``, framework-free):

- ``POST /token``: ``grant_type=client_credentials`` with ``client_secret_basic``,
  ``client_secret_post`` or SMART Backend Services ``private_key_jwt`` (RS384/ES384, ``kid`` in
  the registered JWKS, ``iss == sub == client_id``, ``aud`` = token URL, ``exp`` at most 5 minutes
  ahead, ``jti`` never reused). https://hl7.org/fhir/smart-app-launch/backend-services.html
- ``/fhir``: bearer-token protected FHIR R4 REST (create/conditional create, update/conditional
  update, read, vread, search by identifier/_tag/_id, transaction and batch), every resource
  validated with ``fhir.resources.R4B``. ``GET /fhir/metadata`` and
  ``GET /fhir/.well-known/smart-configuration`` need no token.

Fault injection: scripted ``Fault`` lists consumed in order (``token_faults``, ``fhir_faults``,
applied before auth, not to metadata), a token outage window, and persistent reject rules
(``reject_when``). Observability: ``requests``, ``request_times``, ``max_concurrent_requests``,
``token_requests``, ``token_errors`` and the stored resources.

Run standalone (benchmarks, manual tests)::

    python -m tests.support.fake_ehr --port 8900 --delay-ms 50 --client-id gateway \\
        --client-secret s3cret
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import math
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime
from typing import Any, Final, Literal, NamedTuple
from urllib.parse import parse_qsl, unquote_plus

import uvicorn
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.config import LoopFactoryType

from tests.support.fake_ehr_store import (
    FhirStore,
    InteractionResult,
    JsonObject,
    OperationOutcomeError,
    RejectRule,
    ResourcePredicate,
    operation_outcome,
    parse_if_match,
    parse_if_none_exist_header,
    parse_search,
)

__all__ = [
    "FakeEhr",
    "Fault",
    "FhirRequest",
    "JsonObject",
    "OperationOutcomeError",
    "RunningEhr",
    "TokenRequest",
    "run_fake_ehr",
    "run_fake_ehr_async",
]

FHIR_JSON: Final = "application/fhir+json"
JWT_BEARER_ASSERTION: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART Backend Services: exp "no more than five minutes in the future".
MAX_ASSERTION_LIFETIME_S: Final = 300
#: Allowance for clock differences when checking exp/iat/nbf.
CLOCK_SKEW_S: Final = 5

TokenAuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]

#: OperationOutcome issue code for an injected FHIR fault without a body.
_FAULT_ISSUE_CODES: Final = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    409: "conflict",
    412: "conflict",
    422: "processing",
    429: "throttled",
    504: "timeout",
}
_SMART_V2_PERMISSIONS: Final = "cruds"
_SMART_V1_PERMISSIONS: Final = {"read": "rs", "write": "cud", "*": "cruds"}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Fault:
    """A scripted response: wait ``delay_s``, then answer ``status`` with ``headers``/``body``.

    ``status=None`` only delays (``delay_s``) and then processes the request normally, e.g.
    ``Fault(status=None, delay_s=30)`` to make a client time out while the EHR still commits.
    ``body`` may be a JSON object (an OperationOutcome or an OAuth error), text or bytes; when
    it is None a fitting OperationOutcome (FHIR) or ``temporarily_unavailable`` (token) is sent.
    """

    status: int | None = 504
    headers: Mapping[str, str] = field(default_factory=dict)
    body: JsonObject | str | bytes | None = None
    delay_s: float = 0.0
    content_type: str | None = None


class FhirRequest(NamedTuple):
    """One request to ``/fhir`` as answered: ``(method, path, status)``."""

    method: str
    path: str
    status: int


@dataclass(frozen=True)
class TokenRequest:
    """One request to ``/token``."""

    monotonic_s: float
    """``time.monotonic()`` when it arrived."""
    method: TokenAuthMethod
    client_id: str | None
    scope: str | None
    status: int


@dataclass(frozen=True)
class _IssuedToken:
    client_id: str
    scope: str
    expires_monotonic_s: float


class _OAuthError(Exception):
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

    def response(self) -> Response:
        return _json_response(
            self.status,
            {"error": self.error, "error_description": self.description},
            media_type="application/json",
            headers={"Cache-Control": "no-store", "Pragma": "no-cache", **self.headers},
        )


# --------------------------------------------------------------------------- helpers


def _json_response(
    status: int,
    body: Any,
    *,
    media_type: str = FHIR_JSON,
    headers: Mapping[str, str] | None = None,
) -> Response:
    content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(content, status_code=status, headers=dict(headers or {}), media_type=media_type)


def _outcome_response(error: OperationOutcomeError) -> Response:
    return _json_response(error.status, error.outcome)


def _http_date(instant: str | None) -> str | None:
    if instant is None:
        return None
    return format_datetime(datetime.fromisoformat(instant), usegmt=True)


def _retry_after(value: float | str | None) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"Retry-After": value}
    return {"Retry-After": str(math.ceil(value))}


def _fault_response(fault: Fault, *, fhir: bool) -> Response:
    status = fault.status if fault.status is not None else 500
    body: Any = fault.body
    if body is None:
        if fhir:
            code = _FAULT_ISSUE_CODES.get(status, "transient" if status >= 500 else "processing")
            body = operation_outcome(code, f"Injected fault: HTTP {status}")
        else:
            body = {"error": "temporarily_unavailable", "error_description": "Injected fault"}
    if isinstance(body, dict):
        media_type = fault.content_type or (FHIR_JSON if fhir else "application/json")
        return _json_response(status, body, media_type=media_type, headers=fault.headers)
    content = body.encode() if isinstance(body, str) else body
    return Response(
        content,
        status_code=status,
        headers=dict(fault.headers),
        media_type=fault.content_type or "text/plain; charset=utf-8",
    )


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _scope_permissions(scope: str, resource_type: str) -> set[str]:
    """Interaction letters (``cruds``) that SMART ``system/`` scopes grant on a type (v1 or v2)."""
    granted: set[str] = set()
    for item in scope.split():
        context, _, rest = item.partition("/")
        target, _, permissions = rest.partition(".")
        permissions = permissions.split("?", 1)[0]  # v2 finer-grained scopes: ignore the query
        if context != "system" or target not in (resource_type, "*"):
            continue
        if permissions in _SMART_V1_PERMISSIONS:
            granted.update(_SMART_V1_PERMISSIONS[permissions])
        elif permissions and all(p in _SMART_V2_PERMISSIONS for p in permissions):
            granted.update(permissions)
    return granted


# --------------------------------------------------------------------------- the fake EHR


class FakeEhr:
    """State and ASGI app (``app``) of the test EHR; safe to inspect from any thread.

    Args:
        client_id: the registered client.
        client_secret: its secret, for ``client_secret_basic`` and ``client_secret_post``.
        token_lifetime_s: ``expires_in`` of issued tokens.
        jwks: public JWKS registered for ``private_key_jwt`` (None: assertions are refused).
        response_delay_s: sleep before every FHIR request (simulated latency).
        max_bundle_entries: larger transactions/batches get 400 ``too-costly``.
        supports_transactions: False answers ``POST /fhir`` with 405 (not-supported).
        required_scopes: scopes every token request must include (else ``invalid_scope``).
        validate: validate incoming resources with ``fhir.resources.R4B`` (off for benchmarks).
        referential_integrity: reject references to ``Type/id`` that does not exist (HAPI
            default); seed referenced resources with ``seed()``.
        enforce_scopes: check each FHIR interaction against the token's SMART ``system/``
            scopes (v1 or v2 syntax) and answer 403 when not granted.
        assertion_algorithms: JWS algorithms accepted for client assertions.
    """

    def __init__(
        self,
        *,
        client_id: str = "gateway",
        client_secret: str = "s3cret",  # synthetic test credential
        token_lifetime_s: int = 300,
        jwks: Mapping[str, Any] | None = None,
        response_delay_s: float = 0.0,
        max_bundle_entries: int | None = None,
        supports_transactions: bool = True,
        required_scopes: set[str] | None = None,
        validate: bool = True,
        referential_integrity: bool = True,
        enforce_scopes: bool = False,
        assertion_algorithms: tuple[str, ...] = ("RS384", "ES384"),
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime_s = token_lifetime_s
        self.response_delay_s = response_delay_s
        self.max_bundle_entries = max_bundle_entries
        self.supports_transactions = supports_transactions
        self.required_scopes = set(required_scopes) if required_scopes else None
        self.enforce_scopes = enforce_scopes
        self.assertion_algorithms = assertion_algorithms
        self.store = FhirStore(validate=validate, referential_integrity=referential_integrity)

        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._key_set: KeySet | None = None
        self.set_jwks(jwks)
        self._tokens: dict[str, _IssuedToken] = {}
        self._revoked: set[str] = set()
        self._seen_jtis: dict[tuple[str, str], float] = {}  # (iss, jti) -> exp (epoch s)
        self._in_flight = 0
        self._stopping = threading.Event()

        self.token_requests: list[TokenRequest] = []
        self.token_errors: list[str] = []
        self.token_faults: list[Fault] = []
        self.token_outage_until: float | None = None
        self.token_outage_status = 504
        self.fhir_faults: list[Fault] = []
        self.requests: list[FhirRequest] = []
        self.request_times: list[float] = []
        self.max_concurrent_requests = 0

        self.app = Starlette(
            routes=[
                Route("/token", self._token_endpoint, methods=["POST"]),
                Route(
                    "/fhir{rest:path}",
                    self._fhir_endpoint,
                    methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                ),
            ]
        )

    # ------------------------------------------------------------------ configuration

    def set_jwks(self, jwks: Mapping[str, Any] | None) -> None:
        """Register (or replace, for key rotation tests) the client's public JWKS."""
        key_set = KeySet.import_key_set(dict(jwks)) if jwks is not None else None  # type: ignore[arg-type]
        with self._lock:
            self._key_set = key_set

    # ------------------------------------------------------------------ fault injection

    def fail_token(self, n: int, status: int = 504, retry_after: float | str | None = None) -> None:
        """Answer the next ``n`` token requests with ``status`` (and ``Retry-After``)."""
        fault = Fault(status=status, headers=_retry_after(retry_after))
        with self._lock:
            self.token_faults.extend([fault] * n)

    def token_outage(self, seconds: float, status: int = 504) -> None:
        """Answer every token request with ``status`` for the next ``seconds``."""
        with self._lock:
            self.token_outage_until = time.monotonic() + seconds
            self.token_outage_status = status

    def fail_fhir(
        self,
        n: int,
        status: int,
        retry_after: float | str | None = None,
        operation_outcome: JsonObject | None = None,
    ) -> None:
        """Answer the next ``n`` FHIR requests with ``status`` (before auth, not metadata)."""
        fault = Fault(status=status, headers=_retry_after(retry_after), body=operation_outcome)
        with self._lock:
            self.fhir_faults.extend([fault] * n)

    def hang_fhir(self, n: int, seconds: float) -> None:
        """Delay the next ``n`` FHIR requests by ``seconds``, then process them normally."""
        with self._lock:
            self.fhir_faults.extend([Fault(status=None, delay_s=seconds)] * n)

    def reject_when(
        self,
        predicate: ResourcePredicate,
        status: int = 422,
        operation_outcome: JsonObject | None = None,
    ) -> None:
        """Reject, until ``clear_rules()``, every incoming resource for which ``predicate`` holds.

        A matching resource fails its whole transaction (or its batch entry, or its REST call)
        with ``status`` and ``operation_outcome`` (default: issue ``processing``). Checked after
        structural validation, like a profile validator.
        """
        outcome = operation_outcome or {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "processing",
                    "diagnostics": "Resource rejected by a rule of the test EHR",
                }
            ],
        }
        self.store.rules.append(RejectRule(predicate, status, outcome))

    def clear_rules(self) -> None:
        """Drop every ``reject_when`` rule."""
        self.store.rules.clear()

    def clear_faults(self) -> None:
        """Drop scripted token/FHIR faults and end any token outage."""
        with self._lock:
            self.token_faults.clear()
            self.fhir_faults.clear()
            self.token_outage_until = None

    # ------------------------------------------------------------------ tokens

    def revoke_all_tokens(self) -> None:
        """Revoke every access token issued so far (FHIR calls then get 401)."""
        with self._lock:
            self._revoked.update(self._tokens)
            self._tokens.clear()

    def issue_token(self, scope: str = "system/*.cruds") -> str:
        """An access token for tests that bypass the token endpoint."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = _IssuedToken(
                self.client_id, scope, time.monotonic() + self.token_lifetime_s
            )
        return token

    # ------------------------------------------------------------------ observation

    def resources(self, resource_type: str) -> list[JsonObject]:
        """Copies of the current versions of every stored resource of a type, oldest first."""
        return self.store.resources(resource_type)

    def count(self, resource_type: str) -> int:
        return self.store.count(resource_type)

    def find(self, resource_type: str, system: str | None, value: str) -> list[JsonObject]:
        """Stored resources having ``identifier`` ``system|value``."""
        return self.store.find(resource_type, system, value)

    def get(self, resource_type: str, resource_id: str) -> JsonObject | None:
        return self.store.get(resource_type, resource_id)

    def seed(self, *resources: JsonObject) -> list[JsonObject]:
        """Store resources directly (validated, no reject rules); keeps a given ``id``.

        References are checked, so seed referenced resources first.
        """
        stored = []
        for resource in resources:
            resource = json.loads(json.dumps(resource))
            self.store.check_resource(resource, apply_rules=False)
            if "id" in resource:
                result = self.store.update(resource["resourceType"], resource["id"], resource)
            else:
                result = self.store.create(resource)
            assert result.resource is not None
            stored.append(json.loads(json.dumps(result.resource)))
        return stored

    def wait_for_requests(self, n: int, timeout_s: float = 5.0) -> bool:
        """Block until ``n`` FHIR requests have been answered; False on timeout.

        From async code: ``await asyncio.to_thread(ehr.wait_for_requests, n)``.
        """
        with self._answered:
            return self._answered.wait_for(lambda: len(self.requests) >= n, timeout_s)

    @property
    def in_flight(self) -> int:
        """FHIR requests being processed right now."""
        return self._in_flight

    def reset(self) -> None:
        """Drop resources, faults, rules and records. Issued tokens stay valid."""
        self.store.clear()
        self.clear_rules()
        with self._lock:
            self.token_faults.clear()
            self.fhir_faults.clear()
            self.token_outage_until = None
            self.token_requests.clear()
            self.token_errors.clear()
            self.requests.clear()
            self.request_times.clear()
            self.max_concurrent_requests = self._in_flight

    # ------------------------------------------------------------------ token endpoint

    async def _token_endpoint(self, request: Request) -> Response:
        body = await request.body()
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        form = dict(pairs)
        basic = request.headers.get("authorization", "")
        method: TokenAuthMethod = "none"
        if basic[:6].lower() == "basic ":
            method = "client_secret_basic"
        elif "client_assertion" in form:
            method = "private_key_jwt"
        elif "client_secret" in form:
            method = "client_secret_post"
        client_id = form.get("client_id")
        if method == "client_secret_basic":
            with contextlib.suppress(_OAuthError):  # recorded as sent; rejected below
                client_id = self._basic_credentials(basic)[0]
        try:
            response = await self._token_response(request, form, pairs, method)
        except _OAuthError as exc:
            with self._lock:
                self.token_errors.append(f"{exc.error}: {exc.description}")
            response = exc.response()
        with self._lock:
            self.token_requests.append(
                TokenRequest(
                    time.monotonic(), method, client_id, form.get("scope"), response.status_code
                )
            )
        return response

    def _next_token_fault(self) -> Fault | None:
        with self._lock:
            if self.token_faults:
                return self.token_faults.pop(0)
            if self.token_outage_until is not None and time.monotonic() < self.token_outage_until:
                return Fault(status=self.token_outage_status)
        return None

    async def _token_response(
        self,
        request: Request,
        form: dict[str, str],
        pairs: list[tuple[str, str]],
        method: TokenAuthMethod,
    ) -> Response:
        fault = self._next_token_fault()
        if fault is not None:
            if fault.delay_s and not await self._sleep(fault.delay_s):
                return Response(status_code=503)
            if fault.status is not None:
                return _fault_response(fault, fhir=False)

        if _media_type(request) != "application/x-www-form-urlencoded":
            raise _OAuthError(400, "invalid_request", "Body must be form-urlencoded")
        if len(form) != len(pairs):
            raise _OAuthError(400, "invalid_request", "A parameter is repeated")
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _OAuthError(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise _OAuthError(400, "unsupported_grant_type", "Only client_credentials is supported")

        client_id = self._authenticate_client(request, form, method)

        scope = form.get("scope", "").strip()
        if not scope:
            raise _OAuthError(400, "invalid_scope", "scope is required")
        if self.required_scopes is not None:
            missing = self.required_scopes - set(scope.split())
            if missing:
                raise _OAuthError(
                    400, "invalid_scope", f"Missing required scopes: {' '.join(sorted(missing))}"
                )

        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = _IssuedToken(
                client_id, scope, time.monotonic() + self.token_lifetime_s
            )
        return _json_response(
            200,
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.token_lifetime_s,
                "scope": scope,
            },
            media_type="application/json",
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    def _authenticate_client(
        self, request: Request, form: dict[str, str], method: TokenAuthMethod
    ) -> str:
        """The authenticated client_id (RFC 6749 section 2.3, RFC 7523, SMART Backend Services)."""
        used = [
            request.headers.get("authorization", "")[:6].lower() == "basic ",
            "client_secret" in form,
            "client_assertion" in form or "client_assertion_type" in form,
        ]
        if sum(used) > 1:
            raise _OAuthError(
                400, "invalid_request", "Use exactly one client authentication method"
            )
        if method == "client_secret_basic":
            client_id, secret = self._basic_credentials(request.headers["authorization"])
            self._check_secret(client_id, secret, basic=True)
            if "client_id" in form and form["client_id"] != client_id:
                raise _OAuthError(400, "invalid_request", "client_id differs from Basic auth")
            return client_id
        if method == "client_secret_post":
            client_id = form.get("client_id", "")
            self._check_secret(client_id, form["client_secret"], basic=False)
            return client_id
        if "client_assertion" in form or "client_assertion_type" in form:
            if form.get("client_assertion_type") != JWT_BEARER_ASSERTION:
                raise _OAuthError(
                    400, "invalid_request", f"client_assertion_type must be {JWT_BEARER_ASSERTION}"
                )
            return self._verify_client_assertion(
                form.get("client_assertion", ""),
                form_client_id=form.get("client_id"),
                token_url=str(request.url),
            )
        raise _OAuthError(401, "invalid_client", "Client authentication is required")

    @staticmethod
    def _basic_credentials(header: str) -> tuple[str, str]:
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise _OAuthError(
                401,
                "invalid_client",
                "Malformed Basic credentials",
                headers={"WWW-Authenticate": 'Basic realm="fake-ehr"'},
            ) from exc
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            raise _OAuthError(
                401,
                "invalid_client",
                "Malformed Basic credentials",
                headers={"WWW-Authenticate": 'Basic realm="fake-ehr"'},
            )
        # RFC 6749 section 2.3.1: id and secret are form-urlencoded before base64.
        return unquote_plus(client_id), unquote_plus(secret)

    def _check_secret(self, client_id: str, secret: str, *, basic: bool) -> None:
        id_ok = hmac.compare_digest(client_id.encode(), self.client_id.encode())
        secret_ok = hmac.compare_digest(secret.encode(), self.client_secret.encode())
        if not (id_ok and secret_ok):
            headers = {"WWW-Authenticate": 'Basic realm="fake-ehr"'} if basic else None
            raise _OAuthError(
                401, "invalid_client", "Unknown client or wrong secret", headers=headers
            )

    def _verify_client_assertion(
        self, assertion: str, *, form_client_id: str | None, token_url: str
    ) -> str:
        """Check a SMART Backend Services client assertion; returns the client_id.

        Follows https://hl7.org/fhir/smart-app-launch/backend-services.html (authenticating
        to the token endpoint) and RFC 7523 section 3; every failure is ``invalid_client``.
        """

        def reject(reason: str) -> _OAuthError:
            return _OAuthError(401, "invalid_client", f"client_assertion rejected: {reason}")

        with self._lock:
            key_set = self._key_set
        if key_set is None:
            raise reject("no JWKS is registered for the client")
        try:
            header_segment = assertion.split(".")[0]
            header = json.loads(
                base64.urlsafe_b64decode(header_segment + "=" * (-len(header_segment) % 4))
            )
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
            token = jwt.decode(assertion, key, algorithms=[alg])
        except (JoseError, ValueError) as exc:
            raise reject("signature verification failed") from exc
        claims = token.claims

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

    # ------------------------------------------------------------------ FHIR endpoint

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, cut short when the server stops; returns False if it was cut short."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stopping.is_set():
                return False
            await asyncio.sleep(min(remaining, 0.05))
        return True

    async def _fhir_endpoint(self, request: Request) -> Response:
        started = time.monotonic()
        with self._lock:
            self.request_times.append(started)
            self._in_flight += 1
            self.max_concurrent_requests = max(self.max_concurrent_requests, self._in_flight)
        status = 500
        try:
            # Read the whole body first, as servers do: a client that times out later does not
            # stop the request from being processed (and committed).
            await request.body()
            response = await self._fhir_response(request)
            status = response.status_code
            return response
        except ClientDisconnect:
            status = 499  # nginx's "client closed request": the body never fully arrived
            return Response(status_code=400)
        finally:
            with self._lock:
                self._in_flight -= 1
                self.requests.append(FhirRequest(request.method, request.url.path, status))
                self._answered.notify_all()

    async def _fhir_response(self, request: Request) -> Response:
        if self.response_delay_s > 0 and not await self._sleep(self.response_delay_s):
            return Response(status_code=503)
        rest: str = request.path_params["rest"]
        if rest and not rest.startswith("/"):
            return _outcome_response(OperationOutcomeError.of(404, "not-found", "Unknown path"))
        segments = [s for s in rest.split("/") if s]
        fhir_base = str(request.base_url).rstrip("/") + "/fhir"
        if request.method == "GET" and segments == ["metadata"]:
            return _json_response(200, self._capability_statement(fhir_base))
        if request.method == "GET" and segments == [".well-known", "smart-configuration"]:
            return _json_response(
                200, self._smart_configuration(fhir_base), media_type="application/json"
            )

        with self._lock:
            fault = self.fhir_faults.pop(0) if self.fhir_faults else None
        if fault is not None:
            if fault.delay_s and not await self._sleep(fault.delay_s):
                return Response(status_code=503)
            if fault.status is not None:
                return _fault_response(fault, fhir=True)

        token_or_response = self._authorize(request)
        if isinstance(token_or_response, Response):
            return token_or_response
        try:
            return await self._dispatch(request, segments, fhir_base, token_or_response)
        except OperationOutcomeError as exc:
            return _outcome_response(exc)

    def _authorize(self, request: Request) -> _IssuedToken | Response:
        """The request's valid bearer token, or the 401 to answer (RFC 6750 section 3)."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            challenge = 'Bearer realm="fake-ehr"'
            description = "Missing bearer token"
        else:
            token = token.strip()
            with self._lock:
                issued = self._tokens.get(token)
                revoked = token in self._revoked
            if issued is not None and time.monotonic() < issued.expires_monotonic_s:
                return issued
            description = (
                "The access token has been revoked"
                if revoked
                else "The access token has expired"
                if issued is not None
                else "Unknown access token"
            )
            challenge = (
                f'Bearer realm="fake-ehr", error="invalid_token", error_description="{description}"'
            )
        error = OperationOutcomeError.of(401, "login", description)
        return _json_response(401, error.outcome, headers={"WWW-Authenticate": challenge})

    def _require_scope(self, token: _IssuedToken, resource_type: str, permission: str) -> None:
        if self.enforce_scopes and permission not in _scope_permissions(token.scope, resource_type):
            raise OperationOutcomeError.of(
                403,
                "forbidden",
                f"The token's scopes do not allow '{permission}' on {resource_type}",
            )

    async def _read_resource(self, request: Request) -> Any:
        if _media_type(request) not in (FHIR_JSON, "application/json"):
            raise OperationOutcomeError.of(
                415, "not-supported", "Content-Type must be application/fhir+json"
            )
        try:
            return json.loads(await request.body())
        except ValueError as exc:
            raise OperationOutcomeError.of(400, "structure", "The body is not valid JSON") from exc

    async def _dispatch(
        self, request: Request, segments: list[str], fhir_base: str, token: _IssuedToken
    ) -> Response:
        method = request.method
        prefer = request.headers.get("prefer", "").replace(" ", "").lower()
        if not segments:
            if method != "POST":
                raise OperationOutcomeError.of(
                    405, "not-supported", "Only POST (transaction/batch) is supported on the base"
                )
            return await self._bundle(request, fhir_base, token, prefer)

        resource_type = segments[0]
        try:
            self.store.check_resource_type(resource_type)
        except OperationOutcomeError as exc:
            raise OperationOutcomeError.of(
                404, "not-supported", f"Unknown resource type {resource_type}"
            ) from exc
        query_pairs = list(request.query_params.multi_items())

        if len(segments) == 1 and method == "POST":
            self._require_scope(token, resource_type, "c")
            resource = await self._read_resource(request)
            self._check_body_type(resource, resource_type)
            self.store.check_resource(resource)
            condition = request.headers.get("if-none-exist")
            result = self.store.create(
                resource,
                if_none_exist=parse_if_none_exist_header(condition) if condition else None,
            )
            return self._write_response(result, fhir_base, prefer)
        if len(segments) == 1 and method == "PUT":
            self._require_scope(token, resource_type, "u")
            if not query_pairs:
                raise OperationOutcomeError.of(
                    400, "invalid", "PUT needs an id (Type/id) or search parameters (Type?...)"
                )
            query = parse_search(query_pairs)
            resource = await self._read_resource(request)
            self._check_body_type(resource, resource_type)
            self.store.check_resource(resource)
            result = self.store.conditional_update(resource_type, query, resource)
            return self._write_response(result, fhir_base, prefer)
        if len(segments) == 1 and method == "GET":
            self._require_scope(token, resource_type, "s")
            bundle = self.store.search(resource_type, parse_search(query_pairs), base_url=fhir_base)
            return _json_response(200, bundle)
        if len(segments) == 2 and method == "PUT":
            self._require_scope(token, resource_type, "u")
            resource = await self._read_resource(request)
            self._check_body_type(resource, resource_type)
            self.store.check_resource(resource)
            if_match = request.headers.get("if-match")
            result = self.store.update(
                resource_type,
                segments[1],
                resource,
                if_match=parse_if_match(if_match) if if_match else None,
            )
            return self._write_response(result, fhir_base, prefer)
        if method == "GET" and (
            len(segments) == 2 or (len(segments) == 4 and segments[2] == "_history")
        ):
            self._require_scope(token, resource_type, "r")
            version = segments[3] if len(segments) == 4 else None
            result = self.store.read(resource_type, segments[1], version=version)
            return _json_response(200, result.resource, headers=self._version_headers(result))
        if method in ("DELETE", "PATCH"):
            raise OperationOutcomeError.of(
                405, "not-supported", f"{method} is not supported by this test EHR"
            )
        raise OperationOutcomeError.of(400, "not-supported", "Unsupported FHIR interaction")

    @staticmethod
    def _check_body_type(resource: Any, resource_type: str) -> None:
        if isinstance(resource, dict) and resource.get("resourceType") != resource_type:
            raise OperationOutcomeError.of(
                400, "invalid", f"The body's resourceType must be {resource_type}"
            )

    async def _bundle(
        self, request: Request, fhir_base: str, token: _IssuedToken, prefer: str
    ) -> Response:
        if not self.supports_transactions:
            raise OperationOutcomeError.of(
                405, "not-supported", "Transactions and batches are not supported by this server"
            )
        bundle = await self._read_resource(request)
        entries = bundle.get("entry") if isinstance(bundle, dict) else None
        if (
            self.max_bundle_entries is not None
            and isinstance(entries, list)
            and len(entries) > self.max_bundle_entries
        ):
            raise OperationOutcomeError.of(
                400,
                "too-costly",
                f"The bundle has {len(entries)} entries; this server accepts at most "
                f"{self.max_bundle_entries}",
            )
        if self.enforce_scopes and isinstance(entries, list):
            for entry in entries:
                request_part = entry.get("request", {}) if isinstance(entry, dict) else {}
                url = str(request_part.get("url", ""))
                entry_type = url.split("?", 1)[0].split("/", 1)[0]
                permission = {"POST": "c", "PUT": "u"}.get(
                    str(request_part.get("method")), "r" if "/" in url.split("?")[0] else "s"
                )
                self._require_scope(token, entry_type, permission)
        response_bundle = self.store.process_bundle(
            bundle, base_url=fhir_base, return_resources=prefer == "return=representation"
        )
        return _json_response(200, response_bundle)

    @staticmethod
    def _version_headers(result: InteractionResult) -> dict[str, str]:
        headers: dict[str, str] = {}
        if result.etag is not None:
            headers["ETag"] = result.etag
        last_modified = _http_date(result.last_updated)
        if last_modified is not None:
            headers["Last-Modified"] = last_modified
        return headers

    def _write_response(self, result: InteractionResult, fhir_base: str, prefer: str) -> Response:
        headers = self._version_headers(result)
        if result.location is not None:
            headers["Location"] = f"{fhir_base}/{result.location}"
        if prefer == "return=minimal":
            return Response(status_code=result.status, headers=headers)
        if prefer == "return=operationoutcome":
            body = operation_outcome(
                "informational", f"HTTP {result.status}", severity="information"
            )
            return _json_response(result.status, body, headers=headers)
        return _json_response(result.status, result.resource, headers=headers)

    # ------------------------------------------------------------------ discovery

    def _capability_statement(self, fhir_base: str) -> JsonObject:
        search_params = [
            {"name": "identifier", "type": "token"},
            {"name": "_tag", "type": "token"},
            {"name": "_id", "type": "token"},
        ]
        resource_types = (
            "Patient",
            "Practitioner",
            "PractitionerRole",
            "Organization",
            "Encounter",
            "Questionnaire",
            "QuestionnaireResponse",
            "MedicationRequest",
            "Medication",
            "Observation",
            "Condition",
            "AllergyIntolerance",
            "DocumentReference",
            "ServiceRequest",
            "Appointment",
            "Coverage",
            "Consent",
            "Communication",
            "Task",
            "Provenance",
        )
        rest: JsonObject = {
            "mode": "server",
            "security": {
                "extension": [
                    {
                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                        "extension": [
                            {"url": "token", "valueUri": fhir_base.removesuffix("/fhir") + "/token"}
                        ],
                    }
                ],
                "service": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                "code": "SMART-on-FHIR",
                            }
                        ]
                    }
                ],
            },
            "resource": [
                {
                    "type": resource_type,
                    "interaction": [
                        {"code": code}
                        for code in ("read", "vread", "update", "create", "search-type")
                    ],
                    "versioning": "versioned",
                    "conditionalCreate": True,
                    "conditionalUpdate": True,
                    "searchParam": search_params,
                }
                for resource_type in resource_types
            ],
        }
        if self.supports_transactions:
            rest["interaction"] = [{"code": "transaction"}, {"code": "batch"}]
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2024-01-01",
            "kind": "instance",
            "software": {"name": "fhir-gateway test EHR"},
            "implementation": {"description": "fhir-gateway test EHR", "url": fhir_base},
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "rest": [rest],
        }

    def _smart_configuration(self, fhir_base: str) -> JsonObject:
        return {
            "token_endpoint": fhir_base.removesuffix("/fhir") + "/token",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": list(self.assertion_algorithms),
            "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.*"],
            "capabilities": [
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "permission-v1",
                "permission-v2",
            ],
        }


# --------------------------------------------------------------------------- running it


@dataclass(frozen=True)
class RunningEhr:
    """A fake EHR being served on a local port."""

    ehr: FakeEhr
    base_url: str
    """``http://127.0.0.1:PORT``"""

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


_STARTUP_TIMEOUT_S: Final = 10.0
_GRACEFUL_STOP_S: Final = 3.0


def _bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (port 0: a free port the OS picks, so no race with other tests)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _uvicorn_config(
    ehr: FakeEhr, *, host: str, port: int, loop: LoopFactoryType, standalone: bool = False
) -> uvicorn.Config:
    return uvicorn.Config(
        ehr.app,
        host=host,
        port=port,
        log_level="warning",
        # In tests, leave the process's logging alone (pytest captures uvicorn's records).
        log_config=uvicorn.config.LOGGING_CONFIG if standalone else None,
        access_log=False,
        lifespan="off",
        ws="none",  # no websockets: avoids importing their deprecated legacy implementation
        loop=loop,
    )


class _ServerThread:
    """uvicorn serving ``ehr.app`` in a daemon thread with its own event loop."""

    def __init__(self, ehr: FakeEhr, *, host: str, port: int) -> None:
        self.ehr = ehr
        self.sock = _bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(
            _uvicorn_config(ehr, host=host, port=self.port, loop="asyncio")
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"fake-ehr:{self.port}", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # reported by is_started() in the caller's thread
            self.error = exc

    def start(self) -> None:
        self.ehr._stopping.clear()
        self.thread.start()

    def is_started(self) -> bool:
        if self.error is not None or not self.thread.is_alive():
            raise RuntimeError("The fake EHR server failed to start") from self.error
        return bool(self.server.started)

    def request_stop(self, *, force: bool = False) -> None:
        self.ehr._stopping.set()  # cuts injected hangs and delays short
        self.server.should_exit = True
        if force:
            self.server.force_exit = True

    def close(self) -> None:
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError("The fake EHR server thread did not stop")


@contextlib.contextmanager
def run_fake_ehr(ehr: FakeEhr, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[RunningEhr]:
    """Serve ``ehr`` over HTTP in a background thread for the duration of the block."""
    server = _ServerThread(ehr, host=host, port=port)
    server.start()
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not server.is_started():
            if time.monotonic() > deadline:
                raise TimeoutError("The fake EHR did not start in time")
            time.sleep(0.005)
        yield RunningEhr(ehr, server.base_url)
    finally:
        server.request_stop()
        server.thread.join(_GRACEFUL_STOP_S)
        if server.thread.is_alive():
            server.request_stop(force=True)
            server.thread.join(_GRACEFUL_STOP_S)
        server.close()


@contextlib.asynccontextmanager
async def run_fake_ehr_async(
    ehr: FakeEhr, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningEhr]:
    """Like ``run_fake_ehr`` but waits without blocking the caller's event loop."""
    server = _ServerThread(ehr, host=host, port=port)
    server.start()
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not server.is_started():
            if time.monotonic() > deadline:
                raise TimeoutError("The fake EHR did not start in time")
            await asyncio.sleep(0.005)
        yield RunningEhr(ehr, server.base_url)
    finally:
        server.request_stop()
        await asyncio.to_thread(server.thread.join, _GRACEFUL_STOP_S)
        if server.thread.is_alive():
            server.request_stop(force=True)
            await asyncio.to_thread(server.thread.join, _GRACEFUL_STOP_S)
        server.close()


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """Run the fake EHR in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_ehr", description="Local test EHR (OAuth + FHIR R4)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency of every FHIR call")
    parser.add_argument("--client-id", default="gateway")
    parser.add_argument("--client-secret", default="s3cret")
    parser.add_argument("--jwks", help="path of a public JWKS file for private_key_jwt clients")
    parser.add_argument("--token-lifetime-s", type=int, default=300)
    parser.add_argument("--max-bundle-entries", type=int)
    parser.add_argument("--no-validate", action="store_true", help="skip R4B validation")
    parser.add_argument("--no-transactions", action="store_true")
    parser.add_argument("--no-referential-integrity", action="store_true")
    args = parser.parse_args(argv)

    jwks = None
    if args.jwks:
        with open(args.jwks, encoding="utf-8") as handle:
            jwks = json.load(handle)
    ehr = FakeEhr(
        client_id=args.client_id,
        client_secret=args.client_secret,
        token_lifetime_s=args.token_lifetime_s,
        jwks=jwks,
        response_delay_s=args.delay_ms / 1000,
        max_bundle_entries=args.max_bundle_entries,
        supports_transactions=not args.no_transactions,
        validate=not args.no_validate,
        referential_integrity=not args.no_referential_integrity,
    )
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    base_url = f"http://{args.host}:{port}"
    print(base_url, flush=True)
    print(f"  FHIR base: {base_url}/fhir  token: {base_url}/token", flush=True)
    try:
        config = _uvicorn_config(ehr, host=args.host, port=port, loop="auto", standalone=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


if __name__ == "__main__":
    main()
