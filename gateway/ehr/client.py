"""FHIR REST client for one EHR target, with httpx errors translated at the boundary
into the errors of :mod:`gateway.ehr.errors`.

Messages never contain URLs with query strings, bodies or PHI.
"""

from __future__ import annotations

from typing import Any

import httpx

from gateway.ehr.errors import (
    EhrRejectedError,
    EhrUnavailableError,
    parse_retry_after,
)
from gateway.oauth.tokens import TokenProvider
from mappers.profiles import EhrTargetProfile

FHIR_JSON = "application/fhir+json"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


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
    issues = outcome.get("issue") or []
    return (
        ", ".join(f"{i.get('severity', '?')}/{i.get('code', '?')}" for i in issues[:5])
        or "empty OperationOutcome"
    )


class EhrClient:
    """Sends FHIR requests to one target with its token; retries a 401 once with a fresh
    token (the token may have been revoked), never in a loop."""

    def __init__(
        self, target: EhrTargetProfile, http: httpx.AsyncClient, tokens: TokenProvider
    ) -> None:
        self.target = target
        self.http = http
        self.tokens = tokens
        self.base_url = target.base_url.rstrip("/")

    async def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle to ``[base]`` and return the transaction-response.

        Raises:
            EhrUnavailableError, EhrRejectedError, EhrConfigError.
        """
        response = await self._send("POST", self.base_url, json=bundle)
        try:
            body = response.json()
        except ValueError as exc:
            raise EhrUnavailableError(
                "the EHR answered 2xx without JSON", status_code=response.status_code
            ) from exc
        if not isinstance(body, dict):
            raise EhrUnavailableError(
                "the EHR answered 2xx with unexpected JSON", status_code=response.status_code
            )
        return body

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET [base]/Type/id``.

        Raises:
            EhrUnavailableError, EhrRejectedError, EhrConfigError.
        """
        response = await self._send("GET", f"{self.base_url}/{resource_type}/{resource_id}")
        return response.json()  # type: ignore[no-any-return]

    async def _send(self, method: str, url: str, *, json: Any = None) -> httpx.Response:
        for attempt in (1, 2):
            token = await self.tokens.get_token()
            headers = {"Accept": FHIR_JSON}
            if json is not None:
                headers["Content-Type"] = FHIR_JSON
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                response = await self.http.request(
                    method, url, json=json, headers=headers, timeout=self.target.timeout_s
                )
            except httpx.TimeoutException as exc:
                raise EhrUnavailableError(
                    f"timeout after {self.target.timeout_s:g}s ({type(exc).__name__})"
                ) from exc
            except httpx.TransportError as exc:
                raise EhrUnavailableError(f"transport error ({type(exc).__name__})") from exc
            if response.status_code == 401 and token and attempt == 1:
                await self.tokens.invalidate(token)
                continue
            return self._check(response)
        raise EhrRejectedError(
            "401 again with a fresh token", status_code=401, operation_outcome=None
        )

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        status = response.status_code
        if status < 300:
            return response
        if status in RETRYABLE_STATUS or status >= 500:
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
