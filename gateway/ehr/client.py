"""FHIR REST client for one EHR target, with httpx errors translated at the boundary
into the errors of :mod:`gateway.ehr.errors`.

Status classes (https://hl7.org/fhir/R4/http.html, RFC 9110):

* 2xx: success;
* 3xx: :class:`EhrConfigError` (redirects are not followed: the ``base_url`` is wrong);
* transport failures, timeouts, 408, 409 (server-side lock conflict: "re-read and retry"),
  425, 429 and 5xx: :class:`EhrUnavailableError`, with ``Retry-After`` when sent;
* 401: the token is invalidated and the request retried once with a fresh one; a fresh
  token refused again is :class:`EhrConfigError` (and the target's auth backs off);
* any other 4xx: :class:`EhrRejectedError` with the EHR's OperationOutcome.

Messages never contain URLs with query strings, bodies or PHI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from gateway.ehr.errors import (
    EhrConfigError,
    EhrRejectedError,
    EhrUnavailableError,
    parse_retry_after,
)
from gateway.queue.policy import transient_status
from mappers.bundle import parse_location
from mappers.profiles.ehr import EhrTargetProfile

FHIR_JSON = "application/fhir+json"

#: Awaited before every request to the FHIR server (the target's shared rate limit).
BeforeRequest = Callable[[], Awaitable[None]]


class TokenProvider(Protocol):
    """Gives the bearer token for a target's FHIR requests (the OAuth token managers of
    :mod:`gateway.oauth.tokens` are the implementations)."""

    async def get_token(self) -> str | None:
        """A valid access token, or None when the target needs no authentication.

        Raises:
            TokenUnavailableError: the token endpoint is failing (deliveries should wait).
            EhrConfigError: the token endpoint refuses our credentials.
        """

    async def invalidate(self, token: str) -> None:
        """Forget ``token`` (the FHIR server answered 401 to it)."""

    async def refused(self, token: str) -> None:
        """The FHIR server refused ``token`` although it was freshly fetched."""


def _operation_outcome(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def outcome_summary(outcome: dict[str, Any] | None) -> str:
    """A short summary of an OperationOutcome: issue codes and severities only."""
    if not outcome:
        return "no OperationOutcome"
    issues = outcome.get("issue")
    issues = [i for i in issues if isinstance(i, dict)] if isinstance(issues, list) else []
    return (
        ", ".join(f"{_code(i.get('severity'))}/{_code(i.get('code'))}" for i in issues[:5])
        or "empty OperationOutcome"
    )


def _code(value: Any) -> str:
    """A FHIR code from another server, kept short and plain (it goes into logs)."""
    if not isinstance(value, str):
        return "?"
    return "".join(c for c in value[:32] if c.isalnum() or c in "-_.") or "?"


def _retryable(status: int) -> bool:
    # 409 too: FHIR servers answer it for server-side lock conflicts ("re-read and retry").
    return transient_status(status) or status == 409


def status_error(
    status: int, outcome: dict[str, Any] | None, message: str
) -> EhrUnavailableError | EhrRejectedError:
    """The error of an HTTP ``status`` the EHR answered (or wrote into a Bundle entry's
    ``response.status``): retryable for 408, 409, 425, 429 and 5xx, permanent otherwise."""
    if _retryable(status):
        return EhrUnavailableError(message, status_code=status)
    return EhrRejectedError(message, status_code=status, operation_outcome=outcome)


@dataclass(frozen=True)
class WriteResult:
    """What a create or update answered: the EHR's id and version of the resource.

    ``status`` is the HTTP status (201 created, 200 matched or updated); ``remote_id`` and
    ``remote_version`` come from ``Location`` (``[base]/Type/id/_history/vid``), else from
    the returned resource, else ``ETag``; None when the EHR sent neither.
    """

    status: int
    remote_id: str | None
    remote_version: str | None


class EhrClient:
    """Sends FHIR requests to one target with its token; retries a 401 once with a fresh
    token (the token may have been revoked), never in a loop.

    Args:
        target: the target profile (base URL, timeout).
        http: shared HTTP client (connection pool).
        tokens: the target's token provider (shared by every worker through the database).
        before_request: awaited before each request (rate limit), or None.
    """

    def __init__(
        self,
        target: EhrTargetProfile,
        http: httpx.AsyncClient,
        tokens: TokenProvider,
        *,
        before_request: BeforeRequest | None = None,
    ) -> None:
        self.target = target
        self.http = http
        self.tokens = tokens
        self.before_request = before_request
        self.base_url = target.base_url.rstrip("/")

    async def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle to ``[base]`` and return the transaction-response,
        or ``{}`` when the EHR answered 2xx with an empty body (non-conformant, but the
        transaction succeeded).

        Raises:
            EhrUnavailableError, EhrRejectedError, EhrConfigError.
        """
        response = await self._send("POST", self.base_url, json=bundle)
        if not response.content.strip():
            return {}
        body = self._json(response)
        if not isinstance(body, dict):
            raise EhrUnavailableError(
                "the EHR answered 2xx with unexpected JSON", status_code=response.status_code
            )
        return body

    async def create(
        self, resource_type: str, resource: dict[str, Any], *, if_none_exist: str | None
    ) -> WriteResult:
        """``POST [base]/Type``, conditional on ``If-None-Exist`` when given.

        Zero matches create (201), one match answers 200 and changes nothing, several
        matches answer 412 (https://hl7.org/fhir/R4/http.html#ccreate).

        Raises:
            EhrUnavailableError, EhrRejectedError (412: several matches), EhrConfigError.
        """
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else {}
        response = await self._send(
            "POST", f"{self.base_url}/{resource_type}", json=resource, headers=headers
        )
        return self._write_result(response, resource_type)

    async def update(
        self, resource_type: str, resource_id: str, resource: dict[str, Any]
    ) -> WriteResult:
        """``PUT [base]/Type/id`` (update of the EHR's resource).

        Raises:
            EhrUnavailableError, EhrRejectedError, EhrConfigError.
        """
        response = await self._send(
            "PUT", f"{self.base_url}/{resource_type}/{resource_id}", json=resource
        )
        return self._write_result(response, resource_type, fallback_id=resource_id)

    async def search_ids(self, resource_type: str, query: str) -> list[str]:
        """Ids of the resources ``GET [base]/Type?<query>`` finds (first page).

        Raises:
            EhrUnavailableError, EhrRejectedError, EhrConfigError.
        """
        return [str(r.get("id")) for r in await self.search(resource_type, query)]

    async def search(self, resource_type: str, query: str) -> list[dict[str, Any]]:
        """The resources of type ``resource_type`` that ``GET [base]/Type?<query>`` finds
        (first page of the searchset; included resources of other types left out).

        Raises:
            EhrUnavailableError, EhrRejectedError, EhrConfigError.
        """
        response = await self._send("GET", f"{self.base_url}/{resource_type}?{query}")
        body = self._json(response)
        found = []
        for entry in (body.get("entry") if isinstance(body, dict) else None) or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
                found.append(resource)
        return found

    async def search_bundle(self, url: str) -> dict[str, Any]:
        """``GET`` a search URL (a first page built by the caller, or a ``next`` link of
        the EHR's searchset) and return the Bundle. Only URLs under the target's base
        URL are followed: a paging link elsewhere is refused, not fetched with our token.

        Raises:
            EhrConfigError: the URL is not under the base URL.
            EhrUnavailableError, EhrRejectedError: as for every request.
        """
        if not url.startswith(self.base_url + "/"):
            raise EhrConfigError("a search page outside the target's base_url was not followed")
        body = self._json(await self._send("GET", url))
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise EhrUnavailableError("the EHR answered a search without a Bundle")
        return body

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET [base]/Type/id``.

        Raises:
            EhrUnavailableError, EhrRejectedError (404: unknown), EhrConfigError.
        """
        response = await self._send("GET", f"{self.base_url}/{resource_type}/{resource_id}")
        body = self._json(response)
        if not isinstance(body, dict):
            raise EhrUnavailableError("the EHR answered 2xx with unexpected JSON")
        return body

    async def capabilities(self) -> dict[str, Any]:
        """``GET [base]/metadata`` without a token: the circuit breaker's probe.

        Raises:
            EhrUnavailableError, EhrRejectedError.
        """
        response = await self._request("GET", f"{self.base_url}/metadata", token=None)
        body = self._json(self._check(response))
        if not isinstance(body, dict):
            raise EhrUnavailableError("the EHR answered 2xx with unexpected JSON")
        return body

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise EhrUnavailableError(
                "the EHR answered 2xx without JSON", status_code=response.status_code
            ) from exc

    @staticmethod
    def _write_result(
        response: httpx.Response, resource_type: str, *, fallback_id: str | None = None
    ) -> WriteResult:
        remote_id, version = parse_location(response.headers.get("location"), resource_type)
        if remote_id is None and response.content:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and body.get("resourceType") == resource_type:
                remote_id = body.get("id")
                version = (body.get("meta") or {}).get("versionId")
        if version is None and response.headers.get("etag"):
            version = response.headers["etag"].removeprefix("W/").strip('"')
        return WriteResult(response.status_code, remote_id or fallback_id, version)

    async def _send(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        token = await self.tokens.get_token()
        response = await self._request(method, url, json=json, headers=headers, token=token)
        if response.status_code == 401 and token:
            # The token may have been revoked: replace it once. A fresh token refused again
            # is a configuration problem (client not authorised), not a reason to loop.
            await self.tokens.invalidate(token)
            token = await self.tokens.get_token()
            response = await self._request(method, url, json=json, headers=headers, token=token)
            if response.status_code == 401 and token:
                await self.tokens.refused(token)
                raise EhrConfigError(
                    "the EHR refused a freshly fetched access token (401)", status_code=401
                )
        return self._check(response)

    async def _request(
        self,
        method: str,
        url: str,
        *,
        token: str | None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        if self.before_request is not None:
            await self.before_request()
        sent = {"Accept": FHIR_JSON, **(headers or {})}
        if json is not None:
            sent["Content-Type"] = FHIR_JSON
        if token:
            sent["Authorization"] = f"Bearer {token}"
        try:
            return await self.http.request(
                method, url, json=json, headers=sent, timeout=self.target.timeout_s
            )
        except httpx.TimeoutException as exc:
            raise EhrUnavailableError(
                f"timeout after {self.target.timeout_s:g}s ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise EhrUnavailableError(f"transport error ({type(exc).__name__})") from exc

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        status = response.status_code
        if status < 300:
            return response
        if status < 400:
            # httpx follows no redirects, and a POST must not be replayed to another URL
            # unseen: http:// for https://, a moved base. The target's base_url is wrong.
            raise EhrConfigError(
                f"EHR answered {status} (a redirect): set the target's base_url to the URL "
                "it points to",
                status_code=status,
            )
        if _retryable(status):
            raise EhrUnavailableError(
                f"EHR answered {status}",
                status_code=status,
                retry_after_s=parse_retry_after(response.headers.get("retry-after")),
            )
        outcome = _operation_outcome(response)
        raise EhrRejectedError(
            f"EHR answered {status} ({outcome_summary(outcome)})",
            status_code=status,
            operation_outcome=outcome,
        )
