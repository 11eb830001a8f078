"""The shared per-target token manager against the local EHR's token endpoint (real HTTP)
and httpx.MockTransport handlers, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey, RSAKey

from gateway.clock import ManualClock
from gateway.db.models import OAuthToken
from gateway.ehr.client import EhrClient
from gateway.ehr.errors import EhrConfigError, TokenUnavailableError
from gateway.oauth import repository as repo
from gateway.oauth.tokens import SharedTokenManager, token_provider_for
from gateway.queue.policy import max_token_requests
from gateway.runtime import Runtime
from mappers.profiles.ehr import EhrAuth, EhrTargetProfile, TokenRetryPolicy
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async


def Clock() -> ManualClock:
    """A controllable UTC clock, frozen at 2026-11-24 12:00 until advanced."""
    return ManualClock(datetime(2026, 11, 24, 12, 0, tzinfo=UTC))


def target(running: RunningEhr | None, **auth: Any) -> EhrTargetProfile:
    base = running.base_url if running else "http://ehr.test"
    fields: dict[str, Any] = {
        "method": "client_secret_basic",
        "token_url": f"{base}/token",
        "client_id": "gateway",
        "client_secret_env": "UNUSED",
        "scopes": ["system/*.cruds"],
    }
    fields.update(auth)
    if fields["method"] == "private_key_jwt":
        fields.pop("client_secret_env", None)
    return EhrTargetProfile(name="acme", base_url=f"{base}/fhir", auth=EhrAuth(**fields))


def manager(runtime: Runtime, profile: EhrTargetProfile, **kwargs: Any) -> SharedTokenManager:
    kwargs.setdefault("secret", "s3cret")
    return SharedTokenManager(profile, sessionmaker=runtime.sessionmaker, **kwargs)


def claims_of(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload = (
        json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
        for seg in assertion.split(".")[:2]
    )
    return header, payload


@pytest.fixture
async def ehr() -> AsyncIterator[tuple[LocalEhr, RunningEhr]]:
    fake = LocalEhr()
    async with run_ehr_async(fake) as running:
        yield fake, running


async def test_separate_managers_share_one_token(
    runtime: Runtime, ehr: tuple[LocalEhr, RunningEhr]
) -> None:
    fake, running = ehr
    profile = target(running)
    managers = [manager(runtime, profile) for _ in range(4)]  # like 4 worker processes

    tokens = await asyncio.gather(*(m.get_token() for m in managers for _ in range(5)))

    assert len(set(tokens)) == 1
    assert len(fake.token_requests) == 1


@pytest.mark.postgres
async def test_one_refresh_at_a_time_across_processes(
    postgres_url: str, ehr: tuple[LocalEhr, RunningEhr]
) -> None:
    """Eight managers on their own engines (separate connection pools, as separate worker
    processes have) ask at once: the row lock lets one call the endpoint."""
    from gateway.db.engine import make_engine, make_sessionmaker

    fake, running = ehr
    fake.token_faults.clear()
    profile = target(running)
    engines = [make_engine(postgres_url, pool_size=2) for _ in range(8)]
    try:
        managers = [
            SharedTokenManager(profile, sessionmaker=make_sessionmaker(e), secret="s3cret")
            for e in engines
        ]
        tokens = await asyncio.gather(*(m.get_token() for m in managers for _ in range(3)))
    finally:
        for e in engines:
            await e.dispose()

    assert len(set(tokens)) == 1
    assert len(fake.token_requests) == 1


async def test_client_secret_post(runtime: Runtime, ehr: tuple[LocalEhr, RunningEhr]) -> None:
    fake, running = ehr

    await manager(runtime, target(running, method="client_secret_post")).get_token()

    assert [(r.method, r.status) for r in fake.token_requests] == [("client_secret_post", 200)]


@pytest.mark.parametrize("alg, form", [("RS384", "pem"), ("ES384", "jwk")])
async def test_private_key_jwt_from_a_key_file(
    runtime: Runtime, tmp_path: Path, alg: str, form: str
) -> None:
    key: RSAKey | ECKey = (
        RSAKey.generate_key(2048, private=True)
        if alg == "RS384"
        else ECKey.generate_key("P-384", private=True)
    )
    path = tmp_path / f"key.{form}"
    if form == "pem":
        path.write_bytes(key.as_pem(private=True))
        kid = "registered-kid-1"
    else:
        path.write_text(json.dumps({**key.as_dict(private=True), "kid": "jwk-kid-7"}))
        kid = "jwk-kid-7"
    public = {**key.as_dict(private=False), "kid": kid}
    fake = LocalEhr(jwks={"keys": [public]})
    seen: list[str] = []
    async with run_ehr_async(fake) as running:

        def record(request: httpx.Request) -> None:
            seen.append(dict(httpx.QueryParams(request.content.decode()))["client_assertion"])

        transport = httpx.AsyncHTTPTransport()
        profile = target(
            running,
            method="private_key_jwt",
            private_key_file=str(path),
            kid="registered-kid-1" if form == "pem" else None,
            alg=alg,
        )
        provider = token_provider_for(
            profile,
            sessionmaker=runtime.sessionmaker,
            profiles_root=tmp_path,
            transport=_Recording(transport, record),
        )
        first = await provider.get_token()
        assert first is not None
        await provider.invalidate(first)
        second = await provider.get_token()  # a second assertion: a fresh jti

    assert first != second
    assert [(r.method, r.status) for r in fake.token_requests] == [("private_key_jwt", 200)] * 2
    assert fake.token_errors == []
    (h1, c1), (_, c2) = (claims_of(a) for a in seen)
    assert h1 == {"alg": alg, "kid": kid, "typ": "JWT"}
    assert c1["iss"] == c1["sub"] == "gateway"
    assert c1["aud"] == running.token_url
    assert c1["exp"] - c1["iat"] == 300
    assert c1["jti"] != c2["jti"]


class _Recording(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, record: Any) -> None:
        self.inner = inner
        self.record = record

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.record(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_bad_credentials_are_a_configuration_error_that_backs_off(
    runtime: Runtime, ehr: tuple[LocalEhr, RunningEhr]
) -> None:
    fake, running = ehr
    tokens = manager(runtime, target(running), secret="wrong")

    with pytest.raises(EhrConfigError, match=r"refused the client \(401 invalid_client\)"):
        await tokens.get_token()
    with pytest.raises(EhrConfigError):  # backing off: no second request
        await tokens.get_token()

    assert len(fake.token_requests) == 1
    async with runtime.sessionmaker() as session:
        row = await repo.get_token_row(session, "acme")
    assert row is not None
    assert (row.error_kind, row.failures, row.access_token) == ("config", 1, None)
    assert row.next_attempt_at is not None


async def test_missing_secret_is_a_configuration_error(runtime: Runtime) -> None:
    tokens = manager(runtime, target(None), secret=None)

    with pytest.raises(EhrConfigError, match="UNUSED is not set"):
        await tokens.get_token()


def _token_handler(calls: list[str], *, status: int = 200, lifetime: int = 300) -> Any:
    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if status != 200:
            return httpx.Response(status, json={"error": "temporarily_unavailable"})
        return httpx.Response(
            200,
            json={
                "access_token": f"tok-{len(calls)}",
                "token_type": "bearer",
                "expires_in": lifetime,
            },
        )

    return handle


async def test_refreshes_ahead_of_expiry(runtime: Runtime) -> None:
    calls: list[str] = []
    clock = Clock()
    tokens = manager(
        runtime,
        target(None, refresh_ahead_s=60),
        transport=httpx.MockTransport(_token_handler(calls)),
        clock=clock,
    )

    assert await tokens.get_token() == "tok-1"
    clock.advance(239)  # 61 s left: still used
    assert await tokens.get_token() == "tok-1"
    clock.advance(2)  # 59 s left: refreshed before it expires
    assert await tokens.get_token() == "tok-2"
    assert len(calls) == 2


async def test_short_lived_token_refreshes_at_half_life(runtime: Runtime) -> None:
    calls: list[str] = []
    clock = Clock()
    tokens = manager(
        runtime,
        target(None, refresh_ahead_s=60),
        transport=httpx.MockTransport(_token_handler(calls, lifetime=30)),
        clock=clock,
    )

    await tokens.get_token()
    clock.advance(14)
    await tokens.get_token()
    clock.advance(2)
    await tokens.get_token()

    assert len(calls) == 2


async def test_valid_token_is_used_while_the_endpoint_backs_off(runtime: Runtime) -> None:
    calls: list[str] = []
    status = {"code": 200}

    def handle(request: httpx.Request) -> httpx.Response:
        if status["code"] != 200:
            calls.append("fail")
            return httpx.Response(503, headers={"Retry-After": "20"})
        return _token_handler(calls)(request)

    clock = Clock()
    tokens = manager(runtime, target(None), transport=httpx.MockTransport(handle), clock=clock)
    assert await tokens.get_token() == "tok-1"
    status["code"] = 503
    clock.advance(250)  # due for refresh, 50 s of validity left

    assert await tokens.get_token() == "tok-1"  # refresh failed; the token still works
    clock.advance(10)
    assert await tokens.get_token() == "tok-1"  # Retry-After 20 s: no new request yet
    assert calls == ["/token", "fail"]


async def test_invalidate_drops_only_the_current_token(runtime: Runtime) -> None:
    calls: list[str] = []
    tokens = manager(runtime, target(None), transport=httpx.MockTransport(_token_handler(calls)))
    other = manager(runtime, target(None), transport=httpx.MockTransport(_token_handler(calls)))
    first = await tokens.get_token()
    await tokens.invalidate(first)
    second = await other.get_token()  # another process refreshes

    await tokens.invalidate(first)  # a late 401 for the old token: the new one stays

    assert second != first
    assert await tokens.get_token() == second
    assert len(calls) == 2


async def test_fresh_token_refused_by_the_fhir_server_is_replaced_once_then_backs_off(
    runtime: Runtime,
) -> None:
    token_calls: list[str] = []
    fhir_calls: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return _token_handler(token_calls)(request)
        fhir_calls.append(request.headers.get("authorization"))
        return httpx.Response(401, json={"resourceType": "OperationOutcome", "issue": []})

    transport = httpx.MockTransport(handle)
    profile = target(None)
    tokens = manager(runtime, profile, transport=transport)
    async with httpx.AsyncClient(transport=transport) as http:
        client = EhrClient(profile, http, tokens)
        with pytest.raises(EhrConfigError, match="refused a freshly fetched access token"):
            await client.read("Patient", "1")
        with pytest.raises(EhrConfigError):  # the auth circuit is open: nothing is sent
            await client.read("Patient", "1")

    assert fhir_calls == ["Bearer tok-1", "Bearer tok-2"]
    assert len(token_calls) == 2
    async with runtime.sessionmaker() as session:
        row = await repo.get_token_row(session, "acme")
    assert row is not None and row.error_kind == "config"


async def test_two_minute_outage_calls_the_endpoint_at_most_the_bound(
    runtime: Runtime,
) -> None:
    """Simulated time: the default schedule (base 1 s, cap 120 s) over a two-minute 504
    outage, 4 processes asking every second: at most ``max_token_requests`` = 8 calls,
    then one successful call after recovery."""
    calls: list[datetime] = []
    clock = Clock()
    start = clock.now()
    outage = timedelta(minutes=2)

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(clock.now())
        if clock.now() - start < outage:
            return httpx.Response(504)
        return httpx.Response(200, json={"access_token": "ok", "expires_in": 300})

    profile = target(None)
    assert profile.auth.retry == TokenRetryPolicy(base_delay_s=1.0, max_delay_s=120.0)
    managers = [
        manager(runtime, profile, transport=httpx.MockTransport(handle), clock=clock)
        for _ in range(4)
    ]
    bound = max_token_requests(outage.total_seconds(), profile.auth.retry)
    got = None
    while got is None and clock.now() - start < timedelta(minutes=6):
        results = await asyncio.gather(*(m.get_token() for m in managers), return_exceptions=True)
        for result in results:
            if isinstance(result, str):
                got = result
            else:
                assert isinstance(result, TokenUnavailableError)
        clock.advance(1.0)

    in_outage = [c for c in calls if c - start < outage]
    assert bound == 8
    assert 1 <= len(in_outage) <= bound
    assert got == "ok"
    assert len(calls) == len(in_outage) + 1


async def test_token_row_never_holds_the_secret(
    runtime: Runtime, ehr: tuple[LocalEhr, RunningEhr]
) -> None:
    _, running = ehr
    await manager(runtime, target(running)).get_token()

    async with runtime.sessionmaker() as session:
        row = await session.get(OAuthToken, "acme")
    assert row is not None
    assert "s3cret" not in json.dumps({c.name: str(getattr(row, c.name)) for c in row.__table__.c})
