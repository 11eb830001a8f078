"""OAuth 2.0 access tokens for EHR targets (client credentials grant, RFC 6749 section 4.4;
SMART Backend Services, https://hl7.org/fhir/smart-app-launch/backend-services.html).

One token per target, shared by every worker process through ``oauth_tokens``:

* each process keeps the token in memory until its refresh time (``expires_at`` minus
  ``auth.refresh_ahead_s``, at most half its lifetime), so the hot path touches nothing;
* then it reads the shared row; if another process refreshed already, it takes that token;
* otherwise it locks the row (``SELECT ... FOR UPDATE`` on PostgreSQL) and calls the token
  endpoint while holding it: processes that need a token meanwhile wait on the lock and
  then read the new token. (SQLite: a short lease on the row, ``refresh_lease_until``,
  elects the refresher; the others poll the row.) Within a process an ``asyncio.Lock``
  lets one coroutine do this;
* a failure is stored on the row: ``failures``, ``next_attempt_at`` (equal-jitter backoff
  with a cap, at least ``Retry-After``: :func:`gateway.queue.policy.token_backoff_s`),
  ``last_error``, ``error_kind``. Until ``next_attempt_at`` nobody calls the endpoint (the
  target's *auth circuit* is open); a still-valid token is used meanwhile, and without
  one :class:`TokenUnavailableError` (timeouts, 5xx, 429) or :class:`EhrConfigError`
  (400/401/403: credentials refused) tells the worker to let deliveries wait;
* a 401 from the FHIR server invalidates the token (only if it is still the current one);
  a freshly fetched token refused again is a configuration error and backs off too.

The token request is made by authlib's ``AsyncOAuth2Client.fetch_token`` with
``client_secret_basic``, ``client_secret_post`` or ``private_key_jwt``
(:class:`SmartPrivateKeyJWT`). Tokens are stored in the database (they live minutes, and
the database already holds the PHI they protect); they are never logged.

Transactions: the token manager's public methods are entry points, each owning its own
short units of work on its own sessions (:func:`gateway.db.uow.unit_of_work`), never the
caller's: the shared row must be committed (a new token, a failure and its backoff, a
refresh lease) for the other processes at once, whatever the caller is doing, and the
row lock that makes the refresh single-flight must end with the refresh, not with the
caller's transaction. Callers (the EHR client, before a request) hold no transaction
meanwhile. All times come from the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import authlib.deprecate  # noqa: F401 - installs its own "always" filter when imported
import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

with warnings.catch_warnings():
    # Authlib 1.9 prefers the "httpx2" fork and warns when it falls back to httpx, which is
    # the client this project uses everywhere; the httpx integration is still supported.
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
    from authlib.oauth2.rfc7523 import PrivateKeyJWT, private_key_jwt_sign

from gateway import metrics
from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.db.models import OAuthToken
from gateway.db.uow import unit_of_work
from gateway.ehr.client import TokenProvider
from gateway.ehr.errors import EhrConfigError, TokenUnavailableError, parse_retry_after
from gateway.logging import get_logger
from gateway.oauth import repository as repo
from gateway.oauth.keys import (
    ASSERTION_LIFETIME,
    KeyCipher,
    SigningKeyError,
    SigningMaterial,
    load_key_file,
    signing_material,
)
from gateway.queue.policy import config_error_backoff_s, token_backoff_s, transient_status
from gateway.secrets import SecretStore
from mappers.profiles.ehr import EhrTargetProfile

log = get_logger(__name__)

#: Lifetime assumed when the token response has no ``expires_in`` (SMART: SHOULD NOT
#: exceed 300 s).
DEFAULT_LIFETIME = timedelta(seconds=300)
#: How often a process waiting for another's refresh reads the shared row (SQLite).
REFRESH_POLL_S = 0.05


class NoAuth:
    """For targets with ``auth.method: none`` (test servers, networks with mTLS)."""

    async def get_token(self) -> str | None:
        """No token."""
        return None

    async def invalidate(self, token: str) -> None:
        """Nothing to forget."""

    async def refused(self, token: str) -> None:
        """Nothing to do."""


class SmartPrivateKeyJWT(PrivateKeyJWT):  # type: ignore[misc]
    """authlib's ``private_key_jwt`` client authentication, made SMART-conformant.

    Stock ``PrivateKeyJWT`` signs RS256 with ``exp = iat + 3600``, sends no ``kid``, and
    reuses the first ``jti`` when given ``claims`` (``reference/standards.md`` section 6).
    This one signs with the caller's ``alg`` and ``kid`` (``typ: JWT``), ``exp`` 5 minutes
    after ``iat``, and a fresh ``jti`` for every assertion.
    """

    def sign(self, auth: Any, token_endpoint: str) -> Any:
        """Sign one client assertion (a new ``jti`` each call)."""
        return private_key_jwt_sign(
            auth.client_secret,
            client_id=auth.client_id,
            token_endpoint=token_endpoint,
            claims=dict(self.claims or {}),  # a copy: authlib writes the jti into it
            header=dict(self.headers or {}),
            alg=self.alg,
            expires_in=int(ASSERTION_LIFETIME.total_seconds()),
        )


def _raise_for_token_status(response: httpx.Response) -> httpx.Response:
    """authlib compliance hook: classify the token endpoint's answer before parsing."""
    status = response.status_code
    if transient_status(status):
        raise TokenUnavailableError(
            f"token endpoint answered {status}",
            status_code=status,
            retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    code = (
        "".join(c for c in error[:64] if c.isalnum() or c in "_-") if isinstance(error, str) else ""
    )
    if status >= 400 or code:
        # RFC 6749 section 5.2 says 400 (401 for client authentication); some servers
        # answer the error JSON with 200, some a plain-text or HTML page.
        raise EhrConfigError(
            f"token endpoint refused the client ({status} {code or 'unknown'})", status_code=status
        )
    if not isinstance(body, dict):
        # A login or portal page (text/html) answering 200: the URL is not a token endpoint.
        media = response.headers.get("content-type", "none").split(";", 1)[0].strip()[:64]
        raise EhrConfigError(
            f"token endpoint answered {status} without a JSON object ({media}); "
            "check auth.token_url",
            status_code=status,
        )
    expires_in = body.get("expires_in")
    if isinstance(expires_in, str) and not expires_in.strip().isdigit():
        # authlib takes int(expires_in): "3599.0" would fail the whole response.
        fixed = {k: v for k, v in body.items() if k != "expires_in"}
        with contextlib.suppress(ValueError):  # unreadable: the default lifetime applies
            fixed["expires_in"] = max(0, int(float(expires_in)))
        return httpx.Response(status, json=fixed, request=response.request)
    return response


@dataclass(frozen=True)
class _Cached:
    token: str
    use_until: datetime  # refresh time, or the end of a backoff while the token is valid


@dataclass(frozen=True)
class _Fetched:
    token: str
    token_type: str | None
    scope: str | None
    lifetime: timedelta
    kid: str | None


def auth_wait_until(row: OAuthToken | None, now: datetime) -> datetime | None:
    """Until when a target's deliveries must wait for a token (its auth circuit is open),
    or None: backing off after a failure and no still-valid token to use meanwhile."""
    if row is None or row.next_attempt_at is None or row.next_attempt_at <= now:
        return None
    if row.access_token and row.expires_at is not None and row.expires_at > now:
        return None
    return row.next_attempt_at


def refresh_at(row: OAuthToken, refresh_ahead_s: float) -> datetime | None:
    """When a stored token should be replaced: ``refresh_ahead_s`` before it expires, at
    most half its lifetime before; None without a token."""
    if not row.access_token or row.expires_at is None:
        return None
    lifetime = (
        row.expires_at - row.refreshed_at if row.refreshed_at is not None else DEFAULT_LIFETIME
    )
    ahead = min(timedelta(seconds=refresh_ahead_s), lifetime / 2)
    return row.expires_at - ahead


SecretLookup = Callable[[str], str | None]
KeyLoader = Callable[[], Awaitable[SigningMaterial]]


class SharedTokenManager:
    """The access token of one target, shared with every process through the database.

    Args:
        target: the EHR target profile (``auth`` block).
        sessionmaker: sessions on the gateway database.
        secret: the client secret (``client_secret_*`` methods), or None.
        signing_key: loads the private key (``private_key_jwt``), or None.
        transport: httpx transport for the token endpoint (tests), or None.
        clock: the clock (tests: :class:`~gateway.clock.ManualClock`).
        rng: jitter source (tests).
    """

    def __init__(
        self,
        target: EhrTargetProfile,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        secret: str | None = None,
        signing_key: KeyLoader | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.target = target
        self.name = target.name
        self._sessionmaker = sessionmaker
        self._secret = secret
        self._signing_key = signing_key
        self._transport = transport
        self._clock = clock
        self._rng = rng
        self._lock = asyncio.Lock()
        self._cached: _Cached | None = None
        self._row_locks = sessionmaker.kw.get("bind") is not None and (
            sessionmaker.kw["bind"].dialect.name == "postgresql"
        )

    # ------------------------------------------------------------------ public

    async def get_token(self) -> str:
        """A valid token: cached, shared by another process, or fetched now.

        Raises:
            TokenUnavailableError: the endpoint failed now or is being backed off.
            EhrConfigError: missing secret or key, or credentials refused.
        """
        cached = self._cached
        if cached is not None and self._clock.now() < cached.use_until:
            return cached.token
        async with self._lock:
            cached = self._cached
            if cached is not None and self._clock.now() < cached.use_until:
                return cached.token
            async with self._sessionmaker() as session:
                row = await repo.get_token_row(session, self.name)
            token = self._usable(row, self._clock.now())
            if token is not None:
                return token
            return await self._refresh()

    async def invalidate(self, token: str) -> None:
        """Drop ``token`` here and in the shared row, if it is still the current one."""
        async with self._lock:
            if self._cached is not None and self._cached.token == token:
                self._cached = None
            async with unit_of_work(self._sessionmaker) as session:
                cleared = await repo.clear_token(session, target=self.name, token=token)
        if cleared:
            log.info("oauth.token_invalidated", target=self.name)

    async def refused(self, token: str) -> None:
        """The FHIR server refused a fresh token: a configuration error; back off."""
        async with self._lock:
            self._cached = None
            async with unit_of_work(self._sessionmaker) as session:
                row = await repo.lock_token_row(session, self.name)
                if row.access_token in (None, token):
                    self._record_failure(
                        row,
                        EhrConfigError("the EHR refused a freshly fetched token (401)"),
                        now=self._clock.now(),
                    )
                    row.access_token = None
                    row.expires_at = None

    # ------------------------------------------------------------------ internals

    def _usable(self, row: OAuthToken | None, now: datetime) -> str | None:
        """The row's token if it may be used now (caching it), else None.

        Raises:
            TokenUnavailableError, EhrConfigError: backing off and no valid token.
        """
        if row is None:
            return None
        wait_until = auth_wait_until(row, now)
        if wait_until is not None:
            retry_after_s = (wait_until - now).total_seconds()
            message = row.last_error or "token endpoint backing off"
            if row.error_kind == "config":
                raise EhrConfigError(message, retry_after_s=retry_after_s)
            raise TokenUnavailableError(message, retry_after_s=retry_after_s)
        refresh = refresh_at(row, self.target.auth.refresh_ahead_s)
        if refresh is None or row.access_token is None or row.expires_at is None:
            return None
        if now < refresh:
            self._cached = _Cached(row.access_token, refresh)
            return row.access_token
        if row.next_attempt_at is not None and now < row.next_attempt_at and now < row.expires_at:
            # Due for refresh, but the endpoint is backing off: use the token meanwhile.
            self._cached = _Cached(row.access_token, min(row.next_attempt_at, row.expires_at))
            return row.access_token
        return None

    async def _refresh(self) -> str:
        if self._row_locks:
            # One unit of work around the endpoint call: the row lock is the single
            # flight, and it ends with this transaction.
            async with unit_of_work(self._sessionmaker) as session:
                row = await repo.lock_token_row(session, self.name)
                token = self._usable(row, self._clock.now())  # refreshed while we waited?
                if token is not None:
                    return token
                outcome = await self._call_endpoint()
                self._record(row, outcome)
        else:
            # SQLite has no row locks, and holding its write lock across an HTTP call
            # would stall every writer: a short lease on the row elects one refresher,
            # the others poll the row until it has a result.
            while True:
                async with unit_of_work(self._sessionmaker) as session:
                    lease_until = self._clock.now() + timedelta(
                        seconds=self.target.auth.token_timeout_s + 5
                    )
                    won = await repo.take_refresh_lease(
                        session, self.name, now=self._clock.now(), until=lease_until
                    )
                    current = await repo.get_token_row(session, self.name)
                try:
                    token = self._usable(current, self._clock.now())  # refreshed meanwhile?
                except (TokenUnavailableError, EhrConfigError):
                    if won:
                        await self._release_refresh_lease()
                    raise
                if token is not None:
                    if won:
                        await self._release_refresh_lease()
                    return token
                if won:
                    break
                await self._clock.sleep(REFRESH_POLL_S)
            outcome = await self._call_endpoint()
            async with unit_of_work(self._sessionmaker) as session:
                row = await repo.lock_token_row(session, self.name)
                self._record(row, outcome)
                row.refresh_lease_until = None
        if isinstance(outcome, Exception):
            with contextlib.suppress(TokenUnavailableError, EhrConfigError):
                still_valid = self._usable(row, self._clock.now())
                if still_valid is not None:  # the refresh ahead of expiry failed: keep it
                    return still_valid
            raise outcome
        return outcome.token

    async def _release_refresh_lease(self) -> None:
        async with unit_of_work(self._sessionmaker) as session:
            row = await repo.lock_token_row(session, self.name)
            row.refresh_lease_until = None

    def _record(
        self, row: OAuthToken, outcome: _Fetched | EhrConfigError | TokenUnavailableError
    ) -> None:
        now = self._clock.now()
        if isinstance(outcome, Exception):
            self._record_failure(row, outcome, now=now)
            metrics.TOKEN_REQUESTS.labels(
                target=self.name,
                outcome="config_error" if isinstance(outcome, EhrConfigError) else "unavailable",
            ).inc()
            return
        row.access_token = outcome.token
        row.token_type = outcome.token_type
        row.scope = outcome.scope
        row.refreshed_at = now
        row.expires_at = now + outcome.lifetime
        row.failures = 0
        row.next_attempt_at = None
        row.error_kind = None
        row.signed_with_kid = outcome.kid
        refresh = refresh_at(row, self.target.auth.refresh_ahead_s)
        self._cached = _Cached(outcome.token, refresh or row.expires_at)
        metrics.TOKEN_REQUESTS.labels(target=self.name, outcome="success").inc()
        log.info(
            "oauth.token_refreshed",
            target=self.name,
            expires_in_s=outcome.lifetime.total_seconds(),
            kid=outcome.kid,
        )

    def _record_failure(
        self, row: OAuthToken, exc: EhrConfigError | TokenUnavailableError, *, now: datetime
    ) -> None:
        row.failures = (row.failures or 0) + 1
        policy = self.target.auth.retry
        if isinstance(exc, EhrConfigError):
            delay_s = config_error_backoff_s(row.failures, policy, rng=self._rng)
        else:
            delay_s = token_backoff_s(
                row.failures, policy, retry_after_s=exc.retry_after_s, rng=self._rng
            )
        row.next_attempt_at = now + timedelta(seconds=delay_s)
        row.last_error = str(exc)[:500]
        row.last_error_at = now
        row.error_kind = "config" if isinstance(exc, EhrConfigError) else "unavailable"
        exc.retry_after_s = delay_s
        self._cached = None
        log.warning(
            "oauth.token_failed",
            target=self.name,
            failures=row.failures,
            error_kind=row.error_kind,
            status_code=exc.status_code,
            retry_in_s=round(delay_s, 3),
        )

    async def _call_endpoint(self) -> _Fetched | EhrConfigError | TokenUnavailableError:
        """One token request; failures are returned (to be recorded), not raised."""
        auth = self.target.auth
        kid: str | None = None
        kwargs: dict[str, Any] = {
            "client_id": auth.client_id,
            "token_endpoint": auth.token_url,
            "grant_type": "client_credentials",
            "scope": " ".join(auth.scopes) or None,
            "timeout": auth.token_timeout_s,
            "transport": self._transport,
        }
        try:
            if auth.method == "private_key_jwt":
                if self._signing_key is None:
                    return EhrConfigError("no signing key is configured")
                material = await self._signing_key()
                kid = material.kid
                client = AsyncOAuth2Client(
                    client_secret=material.key, token_endpoint_auth_method=auth.method, **kwargs
                )
                client.register_client_auth_method(
                    SmartPrivateKeyJWT(
                        auth.token_url, alg=material.alg, headers={"kid": kid, "typ": "JWT"}
                    )
                )
            else:
                if not self._secret:
                    return EhrConfigError(
                        f"environment variable {auth.client_secret_env} is not set"
                    )
                client = AsyncOAuth2Client(
                    client_secret=self._secret, token_endpoint_auth_method=auth.method, **kwargs
                )
        except SigningKeyError as exc:
            return EhrConfigError(f"signing key unavailable ({exc})")
        client.register_compliance_hook("access_token_response", _raise_for_token_status)
        try:
            async with client:
                token: dict[str, Any] = await client.fetch_token(
                    auth.token_url, grant_type="client_credentials"
                )
        except (TokenUnavailableError, EhrConfigError) as exc:
            return exc
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            return TokenUnavailableError(f"token endpoint unreachable ({type(exc).__name__})")
        except (OAuthError, ValueError, httpx.HTTPStatusError) as exc:
            return TokenUnavailableError(f"token endpoint answer unusable ({type(exc).__name__})")
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            return TokenUnavailableError("token response without access_token")
        expires_in = token.get("expires_in")
        try:
            lifetime = timedelta(seconds=float(expires_in)) if expires_in else DEFAULT_LIFETIME
        except (TypeError, ValueError):
            lifetime = DEFAULT_LIFETIME
        if lifetime <= timedelta(0):
            lifetime = DEFAULT_LIFETIME
        token_type = token.get("token_type")
        scope = token.get("scope")
        not_granted = set(auth.scopes) - set(str(scope).split()) if scope else set()
        if not_granted:
            # RFC 6749 section 3.3: the server may grant less than asked; the FHIR server
            # then answers 403 to what the token does not cover.
            log.warning("oauth.scope_narrowed", target=self.name, not_granted=sorted(not_granted))
        return _Fetched(
            access,
            str(token_type)[:32] if token_type else None,
            str(scope) if scope else None,
            lifetime,
            kid,
        )


def token_provider_for(
    target: EhrTargetProfile,
    *,
    sessionmaker: async_sessionmaker[AsyncSession],
    profiles_root: Path,
    cipher: KeyCipher | None = None,
    secrets: SecretStore | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> TokenProvider:
    """The token provider a target's ``auth.method`` calls for, in any process.

    Args:
        target: the EHR target profile.
        sessionmaker: sessions on the gateway database (the shared token row).
        profiles_root: resolves a relative ``auth.private_key_file``.
        cipher: decrypts the gateway's stored signing keys.
        secrets: where ``auth.client_secret_env`` is looked up (the runtime's
            :class:`~gateway.secrets.SecretStore`; None: the environment only).
        transport: httpx transport for the token endpoint (tests).
        clock: the clock (tests).
    """
    auth = target.auth
    if auth.method == "none":
        return NoAuth()
    if auth.method != "private_key_jwt":
        secret = (secrets or SecretStore()).get(auth.client_secret_env or "")
        return SharedTokenManager(
            target, sessionmaker=sessionmaker, secret=secret, transport=transport, clock=clock
        )
    key_file = auth.private_key_file
    alg = auth.alg

    async def load_key() -> SigningMaterial:
        if key_file:
            path = Path(key_file)
            return load_key_file(
                path if path.is_absolute() else profiles_root / path, alg=alg, kid=auth.kid
            )
        async with sessionmaker() as session:
            return await signing_material(
                session, alg=alg, now=clock.now(), cipher=cipher or KeyCipher(None)
            )

    return SharedTokenManager(
        target, sessionmaker=sessionmaker, signing_key=load_key, transport=transport, clock=clock
    )
