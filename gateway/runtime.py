"""The wired-up service: settings, database, profiles and shared clients.

Built once by :func:`Runtime.create` (in ``app.py``'s lifespan, the worker's entry point
and the CLI) and passed down; nothing global.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.db.engine import make_engine, make_sessionmaker
from gateway.settings import Settings
from mappers.identifiers import IdentifierSystems
from mappers.profiles import ProfileSet, load_profiles


class ProfileHolder:
    """The profile set in use; replaced whole on reload so readers see one consistent set."""

    def __init__(self, profiles: ProfileSet) -> None:
        self.current = profiles

    def reload(self) -> ProfileSet:
        """Load the profiles again; on any problem keep the running set.

        Raises:
            ProfileLoadError: the new set has problems (the current one stays).
        """
        new = load_profiles(self.current.root)
        self.current = new
        return new


@dataclass
class Runtime:
    """Everything a request handler or worker needs."""

    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    profiles: ProfileHolder
    systems: IdentifierSystems
    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        """Connect to the database (lazily) and load the profiles.

        Raises:
            ProfileLoadError: the profiles have problems; the gateway must not start.
        """
        profiles = load_profiles(settings.profiles_dir)
        engine = make_engine(settings.database_url)
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=make_sessionmaker(engine),
            profiles=ProfileHolder(profiles),
            systems=IdentifierSystems(settings.identifier_base),
        )

    async def close(self) -> None:
        """Release the database connections."""
        await self.engine.dispose()
