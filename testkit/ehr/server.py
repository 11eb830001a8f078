"""The local EHR: OAuth token endpoint, bearer checks, faults and records in front of a real
FHIR server (a tenant of :class:`testkit.fhir_server.FhirServer`).

What is FHIR semantics (create, conditional create and update, transactions, search,
validation answers) comes from that server; this layer only does what an EHR's gateway
and identity provider do around it, plus what tests script:

* ``POST /token`` (:mod:`testkit.ehr.oauth`), ``GET /fhir/.well-known/smart-configuration``;
* ``/fhir/...``: checks the bearer token (401 with ``WWW-Authenticate``), applies the
  deployment's limits (``max_bundle_entries`` -> 400 ``too-costly``, no transactions ->
  405), then forwards the request to the FHIR server. ``GET /fhir/metadata`` needs no token;
  the SMART ``security`` block is added to the server's CapabilityStatement;
* faults: ``fhir_faults`` (consumed in order, before the token check, never on metadata)
  and ``token_faults``; token and FHIR outage windows (a FHIR outage may fail a random
  share of requests); persistent reject rules (``reject_when``); a latency for every FHIR
  request; hangs; 5xx answers after the FHIR server committed the request
  (``Fault(after_commit=True)``);
* records: ``requests``, ``request_times``, ``in_flight``, ``max_concurrent_requests``,
  ``token_requests``, ``token_errors``; the stored resources are read from the FHIR
  server (``count``, ``resources``, ``find``, ``get``; ``seed`` writes directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qsl

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from testkit.ehr.oauth import (
    OAuthError,
    TokenAuthMethod,
    TokenIssuer,
    auth_method,
    basic_credentials,
)
from testkit.ehr.upstream import Upstream, UpstreamError
from testkit.fhir_server import FhirServer

__all__ = [
    "Fault",
    "FhirRequest",
    "JsonObject",
    "LocalEhr",
    "ResourcePredicate",
    "TokenRequest",
]

JsonObject = dict[str, Any]
ResourcePredicate = Callable[[JsonObject], bool]
"""A reject rule's test: gets an incoming resource (as sent), returns True to reject it."""

FHIR_JSON: Final = "application/fhir+json"
#: Request headers the FHIR server needs; the rest (Authorization...) stays here.
_FORWARDED_REQUEST_HEADERS: Final = (
    "content-type",
    "accept",
    "if-none-exist",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "prefer",
)
_FORWARDED_RESPONSE_HEADERS: Final = ("content-type", "etag", "last-modified", "location")
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


def operation_outcome(code: str, diagnostics: str, *, severity: str = "error") -> JsonObject:
    """A one-issue OperationOutcome (code from http://hl7.org/fhir/issue-type)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Fault:
    """A scripted answer: wait ``delay_s``, then answer ``status`` with ``headers``/``body``.

    ``status=None`` only delays and then processes the request normally, e.g.
    ``Fault(status=None, delay_s=30)`` to make a client time out while the EHR still commits.
    ``after_commit=True`` forwards the request (the FHIR server commits it) and then answers
    ``status`` instead of the server's answer: a 5xx after the write happened.
    ``body`` may be a JSON object (an OperationOutcome or an OAuth error), text or bytes; when
    it is None a fitting OperationOutcome (FHIR) or ``temporarily_unavailable`` (token) is sent.
    """

    status: int | None = 504
    headers: Mapping[str, str] = field(default_factory=dict)
    body: JsonObject | str | bytes | None = None
    delay_s: float = 0.0
    content_type: str | None = None
    after_commit: bool = False


class FhirRequest(NamedTuple):
    """One request to ``/fhir`` as answered: ``(method, path, status)`` (path without query)."""

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
class _Outage:
    until_monotonic_s: float
    fault: Fault
    fraction: float


@dataclass(frozen=True)
class _RejectRule:
    predicate: ResourcePredicate
    status: int
    outcome: JsonObject


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


def _status_line(status: int) -> str:
    return f"{status} {HTTPStatus(status).phrase}"


# --------------------------------------------------------------------------- the EHR


class LocalEhr:
    """State and ASGI app (``app``) of one local EHR; safe to inspect from any thread.

    Args:
        fhir: the FHIR server; this EHR gets a fresh tenant of it. None: a token endpoint
            only (FHIR requests answer 503), for tests of tokens that need no FHIR server.
        client_id: the registered OAuth client.
        client_secret: its secret (``client_secret_basic`` and ``client_secret_post``).
        token_lifetime_s: ``expires_in`` of issued tokens.
        jwks: public JWKS registered for ``private_key_jwt`` (None: assertions are refused).
        response_delay_s: latency added before every FHIR request.
        max_bundle_entries: larger transactions/batches get 400 ``too-costly``.
        supports_transactions: False answers ``POST /fhir`` with 405 (not-supported) and
            leaves transaction and batch out of the CapabilityStatement.
        required_scopes: scopes every token request must include (else ``invalid_scope``).
        validate: the FHIR server validates incoming resources (off for benchmarks that
            measure the gateway rather than the EHR).
        assertion_algorithms: JWS algorithms accepted for client assertions.
    """

    def __init__(
        self,
        fhir: FhirServer | None = None,
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
        assertion_algorithms: tuple[str, ...] = ("RS384", "ES384"),
    ) -> None:
        self.fhir = fhir
        self.validate = validate
        self.tenant = fhir.new_tenant(validate=validate) if fhir is not None else None
        self.tokens = TokenIssuer(
            client_id=client_id,
            client_secret=client_secret,
            token_lifetime_s=token_lifetime_s,
            jwks=jwks,
            required_scopes=required_scopes,
            assertion_algorithms=assertion_algorithms,
        )
        self.response_delay_s = response_delay_s
        self.max_bundle_entries = max_bundle_entries
        self.supports_transactions = supports_transactions

        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._in_flight = 0
        self._stopping = threading.Event()
        self._upstream: Upstream | None = None
        self._rules: list[_RejectRule] = []
        self._outage: _Outage | None = None
        self._random = random.Random()

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
            ],
            lifespan=self._lifespan,
        )

    @property
    def client_id(self) -> str:
        return self.tokens.client_id

    @property
    def client_secret(self) -> str:
        return self.tokens.client_secret

    @property
    def fhir_url(self) -> str:
        """The FHIR server's own URL of this EHR's tenant (no token, no faults)."""
        if self.fhir is None or self.tenant is None:
            raise RuntimeError("this local EHR has no FHIR server (token endpoint only)")
        return f"{self.fhir.base_url}/{self.tenant}/fhir"

    def close(self) -> None:
        """Drop this EHR's tenant (its stored resources) from the FHIR server."""
        if self.fhir is not None and self.tenant is not None:
            self.fhir.drop_tenant(self.tenant)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # Keep-alive connections to the FHIR server, for the serving event loop.
        if self.fhir is not None:
            self._upstream = Upstream(self.fhir.host, self.fhir.port)
        try:
            yield
        finally:
            upstream, self._upstream = self._upstream, None
            if upstream is not None:
                await upstream.aclose()

    # ------------------------------------------------------------------ configuration

    def set_jwks(self, jwks: Mapping[str, Any] | None) -> None:
        """Register (or replace, for key rotation tests) the client's public JWKS."""
        self.tokens.set_jwks(jwks)

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
        *,
        after_commit: bool = False,
    ) -> None:
        """Answer the next ``n`` FHIR requests with ``status`` (before the token check, never
        metadata); with ``after_commit`` the FHIR server processes each request first."""
        fault = Fault(
            status=status,
            headers=_retry_after(retry_after),
            body=operation_outcome,
            after_commit=after_commit,
        )
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

        A matching resource fails its whole transaction (nothing of it is stored), its batch
        entry, or its REST call, with ``status`` and ``operation_outcome`` (default: issue
        ``processing``): what an EHR's own business rules do.
        """
        outcome = operation_outcome or {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "processing",
                    "diagnostics": "Resource rejected by a rule of the local EHR",
                }
            ],
        }
        with self._lock:
            self._rules.append(_RejectRule(predicate, status, outcome))

    def clear_rules(self) -> None:
        """Drop every ``reject_when`` rule."""
        with self._lock:
            self._rules.clear()

    def fhir_outage(
        self,
        seconds: float,
        status: int = 503,
        *,
        fraction: float = 1.0,
        retry_after: float | str | None = None,
        seed: int | None = None,
    ) -> None:
        """For the next ``seconds``, answer FHIR requests with ``status`` (before the token
        check, after any scripted ``fhir_faults``).

        ``fraction=1``: every request, metadata included (the EHR is down). ``fraction`` < 1:
        that share of requests, picked at random (``seed`` for a repeatable run), metadata
        excluded (a partial failure leaves the probe answering).
        """
        fault = Fault(status=status, headers=_retry_after(retry_after))
        with self._lock:
            self._outage = _Outage(time.monotonic() + seconds, fault, fraction)
            self._random = random.Random(seed)

    def _outage_fault(self, *, metadata: bool) -> Fault | None:
        with self._lock:
            outage = self._outage
            if outage is None or time.monotonic() >= outage.until_monotonic_s:
                return None
            if outage.fraction >= 1:
                return outage.fault
            if metadata or self._random.random() >= outage.fraction:
                return None
            return outage.fault

    def clear_faults(self) -> None:
        """Drop scripted token/FHIR faults and end any token or FHIR outage."""
        with self._lock:
            self.token_faults.clear()
            self.fhir_faults.clear()
            self.token_outage_until = None
            self._outage = None

    # ------------------------------------------------------------------ tokens

    def revoke_all_tokens(self) -> None:
        """Revoke every access token issued so far (FHIR calls then get 401)."""
        self.tokens.revoke_all()

    def issue_token(self, scope: str = "system/*.cruds") -> str:
        """An access token for tests that bypass the token endpoint."""
        return self.tokens.issue(self.client_id, scope)

    # ------------------------------------------------------------------ observation

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> httpx.Response:
        assert self.fhir is not None
        return self.fhir.http.get(f"{self.fhir_url}/{path}", params=params)

    def _search(self, resource_type: str, params: Mapping[str, str]) -> JsonObject:
        response = self._get(resource_type, params)
        response.raise_for_status()
        bundle: JsonObject = response.json()
        return bundle

    def resources(self, resource_type: str) -> list[JsonObject]:
        """The current version of every stored resource of a type, oldest first."""
        bundle = self._search(resource_type, {})
        return [entry["resource"] for entry in bundle.get("entry") or []]

    def count(self, resource_type: str) -> int:
        """How many resources of a type the FHIR server holds."""
        return int(self._search(resource_type, {"_count": "0"})["total"])

    def find(self, resource_type: str, system: str, value: str) -> list[JsonObject]:
        """Stored resources with ``identifier`` ``system|value`` (a FHIR token search)."""
        bundle = self._search(resource_type, {"identifier": f"{system}|{value}"})
        return [entry["resource"] for entry in bundle.get("entry") or []]

    def get(self, resource_type: str, resource_id: str) -> JsonObject | None:
        """A stored resource by id, or None."""
        response = self._get(f"{resource_type}/{resource_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        resource: JsonObject = response.json()
        return resource

    def versions(self, resource_type: str, resource_id: str) -> list[JsonObject]:
        """Every stored version of a resource (``_history``), newest first."""
        response = self._get(f"{resource_type}/{resource_id}/_history")
        response.raise_for_status()
        return [entry["resource"] for entry in response.json().get("entry") or []]

    def seed(self, *resources: JsonObject) -> list[JsonObject]:
        """Store resources directly in the FHIR server (validated, no token, no faults or
        rules); a given ``id`` is kept (update as create). Returns them as stored.

        Raises:
            httpx.HTTPStatusError: the FHIR server refused one (e.g. 400, invalid).
        """
        assert self.fhir is not None
        stored = []
        for resource in resources:
            url = f"{self.fhir_url}/{resource['resourceType']}"
            headers = {"Content-Type": FHIR_JSON}
            if "id" in resource:
                response = self.fhir.http.put(
                    f"{url}/{resource['id']}", json=resource, headers=headers
                )
            else:
                response = self.fhir.http.post(url, json=resource, headers=headers)
            response.raise_for_status()
            stored.append(response.json())
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
        """Drop resources (a fresh tenant), faults, rules and records. Issued tokens stay valid."""
        if self.fhir is not None:
            self.close()
            self.tenant = self.fhir.new_tenant(validate=self.validate)
        self.clear_rules()
        self.clear_faults()
        with self._lock:
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
        authorization = request.headers.get("authorization", "")
        method = auth_method(authorization, form)
        client_id = form.get("client_id")
        if method == "client_secret_basic":
            with contextlib.suppress(OAuthError):  # recorded as sent; refused below
                client_id = basic_credentials(authorization)[0]
        response = await self._token_response(request, form, len(form) != len(pairs), authorization)
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
        self, request: Request, form: dict[str, str], repeated: bool, authorization: str
    ) -> Response:
        fault = self._next_token_fault()
        if fault is not None:
            if fault.delay_s and not await self._sleep(fault.delay_s):
                return Response(status_code=503)
            if fault.status is not None:
                return _fault_response(fault, fhir=False)
        no_store = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        try:
            body = self.tokens.token_response(
                media_type=_media_type(request),
                form=form,
                repeated=repeated,
                authorization=authorization,
                token_url=str(request.url),
            )
        except OAuthError as exc:
            with self._lock:
                self.token_errors.append(f"{exc.error}: {exc.description}")
            return _json_response(
                exc.status,
                exc.body,
                media_type="application/json",
                headers={**no_store, **exc.headers},
            )
        return _json_response(200, body, media_type="application/json", headers=no_store)

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
        with self._lock:
            self.request_times.append(time.monotonic())
            self._in_flight += 1
            self.max_concurrent_requests = max(self.max_concurrent_requests, self._in_flight)
        status = 500
        try:
            # Read the whole body first, as servers do: a client that times out later does not
            # stop the request from being processed (and committed).
            body = await request.body()
            response = await self._fhir_response(request, body)
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

    async def _fhir_response(self, request: Request, body: bytes) -> Response:
        if self.response_delay_s > 0 and not await self._sleep(self.response_delay_s):
            return Response(status_code=503)
        rest: str = request.path_params["rest"]
        if rest and not rest.startswith("/"):
            return _json_response(404, operation_outcome("not-found", "Unknown path"))
        fhir_base = str(request.base_url).rstrip("/") + "/fhir"
        if request.method == "GET" and rest.rstrip("/") == "/metadata":
            down = self._outage_fault(metadata=True)
            if down is not None:
                return _fault_response(down, fhir=True)
            return await self._metadata(request, fhir_base)
        if request.method == "GET" and rest == "/.well-known/smart-configuration":
            return _json_response(
                200, self._smart_configuration(fhir_base), media_type="application/json"
            )

        with self._lock:
            fault = self.fhir_faults.pop(0) if self.fhir_faults else None
        fault = fault or self._outage_fault(metadata=False)
        if fault is not None:
            if fault.delay_s and not await self._sleep(fault.delay_s):
                return Response(status_code=503)
            if fault.status is not None and not fault.after_commit:
                return _fault_response(fault, fhir=True)

        token = self.tokens.bearer(request.headers.get("authorization", ""))
        if isinstance(token, str):
            challenge = 'Bearer realm="local-ehr"'
            if token != "Missing bearer token":
                challenge += f', error="invalid_token", error_description="{token}"'
            return _json_response(
                401, operation_outcome("login", token), headers={"WWW-Authenticate": challenge}
            )

        response = await self._gatekeep(request, rest, body, fhir_base)
        if fault is not None and fault.after_commit:
            return _fault_response(fault, fhir=True)
        return response

    async def _gatekeep(self, request: Request, rest: str, body: bytes, fhir_base: str) -> Response:
        """The deployment's limits and the reject rules, then the FHIR server."""
        method = request.method
        on_base = rest.strip("/") == ""
        if on_base and method == "POST" and not self.supports_transactions:
            return _json_response(
                405,
                operation_outcome(
                    "not-supported", "Transactions and batches are not supported by this server"
                ),
            )
        with self._lock:
            rules = list(self._rules)
        parsed: Any = None
        if method in ("POST", "PUT") and (rules or (on_base and self.max_bundle_entries)):
            with contextlib.suppress(ValueError):
                parsed = json.loads(body)
        if not isinstance(parsed, dict):
            return await self._forward_request(request, rest, body, fhir_base)

        is_bundle = on_base and parsed.get("resourceType") == "Bundle"
        entries = parsed.get("entry") if is_bundle else None
        entries = entries if isinstance(entries, list) else []
        if (
            is_bundle
            and self.max_bundle_entries is not None
            and len(entries) > self.max_bundle_entries
        ):
            return _json_response(
                400,
                operation_outcome(
                    "too-costly",
                    f"The bundle has {len(entries)} entries; this server accepts at most "
                    f"{self.max_bundle_entries}",
                ),
            )
        if not rules:
            return await self._forward_request(request, rest, body, fhir_base)
        if not is_bundle:
            rule = self._rule_for(parsed, rules)
            if rule is not None:
                return _json_response(rule.status, rule.outcome)
            return await self._forward_request(request, rest, body, fhir_base)

        hits = {
            i: rule
            for i, entry in enumerate(entries)
            if isinstance(entry, dict) and (rule := self._rule_for(entry.get("resource"), rules))
        }
        if not hits:
            return await self._forward_request(request, rest, body, fhir_base)
        if parsed.get("type") != "batch":  # a transaction fails whole: nothing is stored
            rule = hits[min(hits)]
            return _json_response(rule.status, rule.outcome)
        return await self._batch_with_rejections(request, rest, parsed, entries, hits, fhir_base)

    @staticmethod
    def _rule_for(resource: Any, rules: list[_RejectRule]) -> _RejectRule | None:
        if not isinstance(resource, dict):
            return None
        return next((rule for rule in rules if rule.predicate(resource)), None)

    async def _batch_with_rejections(
        self,
        request: Request,
        rest: str,
        bundle: JsonObject,
        entries: list[Any],
        hits: dict[int, _RejectRule],
        fhir_base: str,
    ) -> Response:
        """A batch whose rejected entries are answered here and the others by the server."""
        kept = [entry for i, entry in enumerate(entries) if i not in hits]
        answered: list[Any] = []
        if kept:
            forwarded = await self._forward_request(
                request, rest, json.dumps({**bundle, "entry": kept}).encode(), fhir_base
            )
            if forwarded.status_code != 200:
                return forwarded
            answered = json.loads(bytes(forwarded.body)).get("entry") or []
        results = iter(answered)
        response_entries = [
            {"response": {"status": _status_line(hits[i].status), "outcome": hits[i].outcome}}
            if i in hits
            else next(results, {})
            for i in range(len(entries))
        ]
        return _json_response(
            200, {"resourceType": "Bundle", "type": "batch-response", "entry": response_entries}
        )

    async def _forward_request(
        self, request: Request, rest: str, body: bytes, fhir_base: str
    ) -> Response:
        if self.fhir is None or self.tenant is None:
            return _json_response(
                503, operation_outcome("transient", "This local EHR has no FHIR server")
            )
        assert self._upstream is not None, "served without its lifespan"
        target = f"/{self.tenant}/fhir{rest}"
        if request.url.query:
            target += f"?{request.url.query}"
        headers = {k: v for k in _FORWARDED_REQUEST_HEADERS if (v := request.headers.get(k))}
        headers["X-Forwarded-Base"] = fhir_base
        try:
            answer = await self._upstream.request(request.method, target, headers, body)
        except UpstreamError as exc:
            return _json_response(
                502,
                operation_outcome("transient", f"The local FHIR server is not reachable ({exc})"),
            )
        kept = {k: v for k in _FORWARDED_RESPONSE_HEADERS if (v := answer.headers.get(k))}
        return Response(answer.body, status_code=answer.status, headers=kept)

    # ------------------------------------------------------------------ discovery

    async def _metadata(self, request: Request, fhir_base: str) -> Response:
        """The FHIR server's CapabilityStatement, with this EHR's SMART security block."""
        response = await self._forward_request(request, "/metadata", b"", fhir_base)
        if response.status_code != 200:
            return response
        statement = json.loads(bytes(response.body))
        for rest in statement.get("rest", []):
            rest["security"] = {
                "extension": [
                    {
                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                        "extension": [{"url": "token", "valueUri": self._token_url(fhir_base)}],
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
            }
            if not self.supports_transactions:
                rest["interaction"] = [
                    i
                    for i in rest.get("interaction", [])
                    if i.get("code") not in ("transaction", "batch")
                ]
        return _json_response(200, statement)

    @staticmethod
    def _token_url(fhir_base: str) -> str:
        return fhir_base.removesuffix("/fhir") + "/token"

    def _smart_configuration(self, fhir_base: str) -> JsonObject:
        return {
            "token_endpoint": self._token_url(fhir_base),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": list(
                self.tokens.assertion_algorithms
            ),
            "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.*"],
            "capabilities": [
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "permission-v1",
                "permission-v2",
            ],
        }
