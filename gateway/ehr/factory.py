"""Building :class:`EhrClient`\\ s for targets, in any process (worker or API).

One :class:`EhrClients` per process keeps one client per target, with the target's shared
token manager and rate limit, and rebuilds it when the target's profile changes (the
worker wires one: :func:`gateway.worker.ehr_clients`)::

    clients = ehr_clients(runtime)
    patient = await clients.client_for(runtime.profiles.current.ehr["acme"]).read(
        "Patient", remote_id
    )
    await clients.aclose()
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.ehr.client import BeforeRequest, EhrClient, TokenProvider
from gateway.ehr.limits import RateLimiter
from gateway.queue.policy import rate_burst
from mappers.profiles.ehr import EhrTargetProfile

#: A new token provider for a target (the token itself is shared in the database).
TokensFor = Callable[[EhrTargetProfile], TokenProvider]


class EhrClients:
    """One :class:`EhrClient` per target for this process.

    Args:
        sessionmaker: sessions on the gateway database (the shared rate buckets).
        tokens: makes a target's token provider (the wiring passes
            :func:`gateway.oauth.tokens.token_provider_for` with its arguments).
        http: shared HTTP client for FHIR requests (created, and closed, when None).
        max_connections: the HTTP pool's size.
        transport: the transport of the client made when ``http`` is None (the egress
            guard, :func:`gateway.egress.egress_transport`); httpx's default when None.
        clock: the clock of the rate limits.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        tokens: TokensFor,
        http: httpx.AsyncClient | None = None,
        max_connections: int = 100,
        clock: Clock = SYSTEM_CLOCK,
        transport: Callable[[httpx.Limits], httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        self._tokens = tokens
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._http = http or httpx.AsyncClient(
            limits=limits, transport=transport(limits) if transport is not None else None
        )
        self._own_http = http is None
        self._limiter = RateLimiter(sessionmaker, clock=clock)
        self._clients: dict[str, tuple[EhrTargetProfile, EhrClient]] = {}

    def client_for(self, target: EhrTargetProfile) -> EhrClient:
        """The client of ``target`` (rebuilt, with a new token manager, when its profile
        changed)."""
        cached = self._clients.get(target.name)
        if cached is not None and cached[0] == target:
            return cached[1]
        client = EhrClient(
            target,
            self._http,
            self._tokens(target),
            before_request=self._before_request(target),
        )
        self._clients[target.name] = (target, client)
        return client

    def _before_request(self, target: EhrTargetProfile) -> BeforeRequest | None:
        rate = target.rate_limit_per_s
        if rate is None:
            return None
        burst = rate_burst(rate, target.rate_burst)
        limiter = self._limiter
        name = target.name

        async def acquire() -> None:
            await limiter.acquire(name, rate_per_s=rate, burst=burst)

        return acquire

    async def aclose(self) -> None:
        """Close the shared HTTP client (if this object created it)."""
        self._clients.clear()
        if self._own_http:
            await self._http.aclose()
