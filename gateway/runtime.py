"""The wired-up service: settings, database, profiles and shared clients.

Built once by :func:`Runtime.create` (in ``app.py``'s lifespan, the worker's entry point
and the CLI) and passed down; nothing global.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.clients.service import Principal, authenticate, hash_key, touch_client
from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.db.encryption import keyring_for
from gateway.db.engine import make_engine, make_read_sessionmaker, make_sessionmaker
from gateway.egress import EgressPolicy, EgressRefusedError
from gateway.secrets import SecretStore
from gateway.settings import Settings
from mappers.errors import Problem
from mappers.identifiers import IdentifierSystems
from mappers.profiles import ProfileLoadError, ProfileSet, load_profiles

#: A check of a loaded profile set against the process's settings (raises
#: ProfileLoadError).
ProfileCheck = Callable[[ProfileSet], None]


def egress_check(policy: EgressPolicy) -> ProfileCheck:
    """The check that every enabled EHR target's ``base_url`` and ``auth.token_url`` are
    URLs the egress policy allows (``https``, no credentials, no refused address)."""

    def check(profiles: ProfileSet) -> None:
        problems = []
        for name, target in profiles.ehr.items():
            if not target.enabled:
                continue
            urls = [("base_url", target.base_url)]
            if target.auth is not None and target.auth.token_url:
                urls.append(("auth.token_url", target.auth.token_url))
            for path, url in urls:
                try:
                    policy.check_url(url)
                except EgressRefusedError as exc:
                    source = profiles.sources.get(f"ehr/{name}")
                    where = f"{source.path}: {path}" if source else f"ehr/{name}: {path}"
                    problems.append(Problem(where, "egress_refused", str(exc)))
        if problems:
            raise ProfileLoadError(problems)

    return check


class ProfileHolder:
    """The profile set in use; replaced whole on reload so readers see one consistent set.

    ``check`` runs on every set before it is used (the egress check of the settings)."""

    def __init__(self, profiles: ProfileSet, check: ProfileCheck | None = None) -> None:
        self.check = check
        if check is not None:
            check(profiles)
        self.current = profiles
        #: when the running set was loaded at start-up; the last reload that took
        #: effect; the problems of the last reload attempt (empty when it worked)
        self.loaded_at: datetime = datetime.now(UTC)
        self.reloaded_at: datetime | None = None
        self.reload_problems: list[str] = []

    def reload(self) -> ProfileSet:
        """Load the profiles again; on any problem keep the running set.

        Raises:
            ProfileLoadError: the new set has problems (the current one stays).
        """
        try:
            new = load_profiles(self.current.root)
            if self.check is not None:
                self.check(new)
        except ProfileLoadError as exc:
            self.reload_problems = [f"{p.location}: {p.message} [{p.code}]" for p in exc.problems]
            raise
        self.current = new
        self.reloaded_at = datetime.now(UTC)
        self.reload_problems = []
        return new


class WriteLock:
    """One writer at a time in this process, re-entrant within a task.

    SQLite allows one write transaction at a time; when two sessions of one process both
    write, the second sleeps in SQLite's busy handler (backing off up to 100 ms a try),
    which wrecks latency under load. Serializing writers here, before they reach SQLite,
    replaces that polling with a queue. PostgreSQL needs none of this (``Runtime`` holds
    no lock there).
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is not None and self._owner is task:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner, self._depth = task, 1

    async def __aexit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


class AuthCache:
    """Authenticated principals by API key hash for a few seconds, so a burst of requests
    does not query ``api_clients`` each time. A revoked key stops working within
    ``ttl_s`` (default 10 s) in every process.

    It also keeps ``api_clients.last_used_at``, cheaply: at most one write per client per
    ``touch_every_s`` (default 60 s) per process, and one that changes nothing when
    another process wrote within that time (:func:`~gateway.clients.service.touch_client`).
    """

    def __init__(
        self, ttl_s: float = 10.0, max_entries: int = 1024, touch_every_s: float = 60.0
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.touch_every_s = touch_every_s
        self._entries: dict[str, tuple[Principal | None, float]] = {}
        self._touched: dict[int, float] = {}

    async def get(self, key: str, runtime: Runtime) -> Principal | None:
        """The principal for ``key`` (None when unknown or revoked)."""
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[1] > now:
            principal = hit[0]
        else:
            async with runtime.sessionmaker() as session:
                principal = await authenticate(session, key=key)
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[digest] = (principal, now + self.ttl_s)
        expires_at = principal.expires_at if principal is not None else None
        if expires_at is not None and expires_at <= runtime.clock.now():
            return None  # an access token ran out while cached
        if principal is not None:
            touched = self._touched.get(principal.client_id)
            if touched is None or now - touched >= self.touch_every_s:
                self._touched[principal.client_id] = now
                async with runtime.write_session() as session:
                    await touch_client(
                        session,
                        client_id=principal.client_id,
                        now=runtime.clock.now(),
                        every=timedelta(seconds=self.touch_every_s),
                    )
                    await session.commit()
        return principal


@dataclass
class Runtime:
    """Everything a request handler or worker needs."""

    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    profiles: ProfileHolder
    systems: IdentifierSystems
    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    auth_cache: AuthCache = field(default_factory=AuthCache)
    secrets: SecretStore = field(default_factory=SecretStore)
    write_lock: WriteLock | None = None
    clock: Clock = field(default_factory=lambda: SYSTEM_CLOCK)
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    #: Sessions for reads only (:func:`gateway.db.engine.make_read_sessionmaker`):
    #: one round trip per query on PostgreSQL. None: :attr:`sessionmaker`.
    read_sessionmaker: async_sessionmaker[AsyncSession] | None = None

    def read_session(self) -> AsyncSession:
        """A session for reads only (see :attr:`read_sessionmaker`)."""
        return (self.read_sessionmaker or self.sessionmaker)()

    @contextlib.asynccontextmanager
    async def write_session(self) -> AsyncIterator[AsyncSession]:
        """A session for a write transaction; on SQLite, writers of this process take
        turns (:class:`WriteLock`). The caller commits."""
        if self.write_lock is None:
            async with self.sessionmaker() as session:
                yield session
            return
        async with self.write_lock, self.sessionmaker() as session:
            yield session

    @classmethod
    def create(cls, settings: Settings, *, profiles: ProfileSet | None = None) -> Runtime:
        """Connect to the database (lazily) and load the profiles.

        Args:
            settings: the process's settings.
            profiles: the profiles of ``settings.profiles_dir`` when the caller loaded
                them already (a command checks them first); loaded here when None.

        Raises:
            ProfileLoadError: the profiles have problems (or an enabled EHR target's URL
                the egress policy refuses); the gateway must not start.
            KeyringError: the key encryption key is malformed.
        """
        if profiles is None:
            profiles = load_profiles(settings.profiles_dir)
        egress = settings.egress_policy()
        holder = ProfileHolder(profiles, egress_check(egress))
        engine = make_engine(
            settings.database_url,
            pre_ping=settings.database_pool_pre_ping,
            keyring=keyring_for(settings),
        )
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=make_sessionmaker(engine),
            read_sessionmaker=make_read_sessionmaker(engine),
            profiles=holder,
            systems=IdentifierSystems(settings.identifier_base),
            write_lock=WriteLock() if engine.dialect.name == "sqlite" else None,
            secrets=SecretStore.from_settings(settings),
            egress=egress,
        )

    async def close(self) -> None:
        """Release the database connections."""
        await self.engine.dispose()
