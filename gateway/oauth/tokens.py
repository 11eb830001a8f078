"""OAuth 2.0 access tokens for EHR targets (client credentials grant, RFC 6749 section 4.4).

One :class:`ClientCredentialsTokens` per target and process: the token is cached until
shortly before it expires, one refresh runs at a time (others wait for its result), and a
failing token endpoint is backed off (exponential, full jitter, ``Retry-After``) instead
of being called on every delivery. The token request itself is made by authlib
(``AsyncOAuth2Client.fetch_token``) with ``client_secret_basic`` or ``client_secret_post``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import authlib.deprecate  # noqa: F401 - installs its own "always" filter when imported
import httpx

with warnings.catch_warnings():
    # Authlib 1.9 prefers the "httpx2" fork and warns when it falls back to httpx, which is
    # the client this project uses everywhere; the httpx integration is still supported.
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

from gateway.ehr.errors import EhrConfigError, TokenUnavailableError, parse_retry_after
from gateway.logging import get_logger
from mappers.profiles import EhrTargetProfile

log = get_logger(__name__)

#: Refresh this long before ``expires_in`` runs out.
REFRESH_AHEAD_S = 60.0
TOKEN_RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})


class TokenProvider(Protocol):
    """Gives the bearer token for a target's FHIR requests."""

    async def get_token(self) -> str | None:
        """A valid access token, or None when the target needs no authentication.

        Raises:
            TokenUnavailableError: the token endpoint is failing (deliveries should wait).
            EhrConfigError: the token endpoint refuses our credentials.
        """

    async def invalidate(self, token: str) -> None:
        """Forget ``token`` (the FHIR server answered 401 to it)."""


class NoAuth:
    """For targets with ``auth.method: none`` (test servers, networks with mTLS)."""

    async def get_token(self) -> str | None:
        """No token."""
        return None

    async def invalidate(self, token: str) -> None:
        """Nothing to forget."""


def _raise_for_token_status(response: httpx.Response) -> httpx.Response:
    """authlib compliance hook: classify the token endpoint's answer before parsing."""
    status = response.status_code
    if status in TOKEN_RETRYABLE or status >= 500:
        raise TokenUnavailableError(
            f"token endpoint answered {status}",
            status_code=status,
            retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        )
    if status in (400, 401, 403):
        error = "unknown"
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                error = body["error"][:64]
        except ValueError:
            pass
        raise EhrConfigError(
            f"token endpoint refused the client ({status} {error})", status_code=status
        )
    return response


class ClientCredentialsTokens:
    """Cached client-credentials tokens for one target in one process.

    Args:
        target: the EHR target profile (``auth`` block).
        transport: optional httpx transport (tests).
        clock: monotonic seconds (tests).
        base_backoff_s / max_backoff_s: token endpoint backoff.
    """

    def __init__(
        self,
        target: EhrTargetProfile,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
    ) -> None:
        self.target = target
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._failures = 0
        self._next_attempt_at = 0.0
        self._base_backoff_s = base_backoff_s
        self._max_backoff_s = max_backoff_s
        self.last_error: str | None = None
        self.requests = 0
        auth = target.auth
        secret_env = auth.client_secret_env or ""
        self._secret = os.environ.get(secret_env)
        self._client = AsyncOAuth2Client(
            client_id=auth.client_id,
            client_secret=self._secret,
            token_endpoint_auth_method=auth.method,
            scope=" ".join(auth.scopes) or None,
            timeout=target.timeout_s,
            transport=transport,
        )
        self._client.register_compliance_hook("access_token_response", _raise_for_token_status)

    @property
    def expires_in_s(self) -> float | None:
        """Seconds until the cached token expires, or None without one."""
        return None if self._token is None else self._expires_at - self._clock()

    async def get_token(self) -> str | None:
        """A valid token, fetched if needed (one fetch at a time).

        Raises:
            TokenUnavailableError: the endpoint failed now or is being backed off.
            EhrConfigError: missing secret, or credentials refused (400/401/403).
        """
        if self._token and self._clock() < self._expires_at - REFRESH_AHEAD_S:
            return self._token
        async with self._lock:
            now = self._clock()
            if self._token and now < self._expires_at - REFRESH_AHEAD_S:
                return self._token
            if now < self._next_attempt_at:
                raise TokenUnavailableError(
                    "token endpoint backing off", retry_after_s=self._next_attempt_at - now
                )
            return await self._fetch()

    async def _fetch(self) -> str:
        if not self._secret:
            self.last_error = (
                f"environment variable {self.target.auth.client_secret_env} is not set"
            )
            raise EhrConfigError(self.last_error)
        self.requests += 1
        try:
            token: dict[str, Any] = await self._client.fetch_token(
                self.target.auth.token_url, grant_type="client_credentials"
            )
        except TokenUnavailableError as exc:
            self._back_off(exc.retry_after_s, str(exc))
            raise
        except EhrConfigError as exc:
            self.last_error = str(exc)
            self._back_off(None, str(exc))
            raise
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            message = f"token endpoint unreachable ({type(exc).__name__})"
            self._back_off(None, message)
            raise TokenUnavailableError(message) from exc
        except (OAuthError, ValueError, httpx.HTTPStatusError) as exc:
            message = f"token endpoint answer unusable ({type(exc).__name__})"
            self._back_off(None, message)
            raise TokenUnavailableError(message) from exc
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            self._back_off(None, "token response without access_token")
            raise TokenUnavailableError("token response without access_token")
        expires_in = token.get("expires_in")
        lifetime = (
            float(expires_in)
            if isinstance(expires_in, int | float | str)
            and str(expires_in).replace(".", "", 1).isdigit()
            else 300.0
        )
        self._token = access
        self._expires_at = self._clock() + lifetime
        self._failures = 0
        self._next_attempt_at = 0.0
        self.last_error = None
        log.info("oauth.token_refreshed", target=self.target.name, expires_in_s=lifetime)
        return access

    def _back_off(self, retry_after_s: float | None, message: str) -> None:
        self._failures += 1
        cap = min(self._max_backoff_s, self._base_backoff_s * (2 ** (self._failures - 1)))
        delay = random.uniform(0, cap)  # noqa: S311 - jitter, not security
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        self._next_attempt_at = self._clock() + delay
        self.last_error = message
        log.warning(
            "oauth.token_failed",
            target=self.target.name,
            failures=self._failures,
            retry_in_s=round(delay, 3),
        )

    async def invalidate(self, token: str) -> None:
        """Drop ``token`` if it is still the cached one (a 401 from the FHIR server)."""
        async with self._lock:
            if self._token == token:
                self._token = None
                self._expires_at = 0.0
                log.info("oauth.token_invalidated", target=self.target.name)

    async def aclose(self) -> None:
        """Close the token endpoint's HTTP client."""
        await self._client.aclose()


def token_provider_for(
    target: EhrTargetProfile, *, transport: httpx.AsyncBaseTransport | None = None
) -> TokenProvider:
    """The token provider a target's ``auth.method`` calls for."""
    if target.auth.method == "none":
        return NoAuth()
    return ClientCredentialsTokens(target, transport=transport)
