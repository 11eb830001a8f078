"""What every command does first: settings and profiles, loaded once or a clear exit (2),
then the database or the wired runtime for the command's work.

Settings come from ``GATEWAY_*`` environment variables (and ``.env``), as for the service.
A setting that does not validate is named with the reason, never echoed: a database URL
or a secret may be in it.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.settings import Settings, load_settings
from mappers.profiles import ProfileLoadError, ProfileSet, load_profiles

T = TypeVar("T")


def plain_help(text: str) -> str:
    """A docstring as ``--help`` text: reST literals (````x````) as plain ``x``, and the
    lines of each paragraph joined, so the terminal wraps them (typer keeps the source's
    line breaks after the first paragraph). Paragraphs (blank lines) stay."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    joined = [" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs]
    return "\n\n".join(p for p in joined if p).replace("``", "")


def plain_help_everywhere(app: typer.Typer) -> None:
    """Apply :func:`plain_help` to every command and group of ``app``, recursively."""
    if app.info.help:
        app.info.help = plain_help(str(app.info.help))
    for command in app.registered_commands:
        text = command.help or inspect.getdoc(command.callback)
        if text:
            command.help = plain_help(text)
    for group in app.registered_groups:
        if group.help:
            group.help = plain_help(str(group.help))
        if group.typer_instance is not None:
            plain_help_everywhere(group.typer_instance)


def fail(message: str, *, code: int = 2) -> typer.Exit:
    """Print ``message`` in red on stderr; the :class:`typer.Exit` to raise."""
    typer.secho(message, fg="red", err=True)
    return typer.Exit(code)


def settings_or_exit(**overrides: Any) -> Settings:
    """The settings, with the command-line ``overrides`` that were given (None: not given).

    Raises:
        typer.Exit: 2, a setting does not validate (each named, without its value).
    """
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"GATEWAY_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise fail(f"configuration error: {problems}") from exc
    except SettingsError as exc:  # an environment value that does not parse at all
        raise fail(f"configuration error: {exc}") from exc


def profiles_or_exit(settings: Settings) -> ProfileSet:
    """The profiles of ``settings.profiles_dir``, loaded once.

    Raises:
        typer.Exit: 2, the profiles have problems (each printed with file, line, path).
    """
    try:
        return load_profiles(settings.profiles_dir)
    except ProfileLoadError as exc:
        raise fail(str(exc)) from exc


@dataclass(frozen=True)
class Database:
    """The configured database, for a command's work."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]

    def session(self) -> AsyncSession:
        """A new session (the work commits)."""
        return self.sessionmaker()


def run_on_database(
    work: Callable[[Database], Awaitable[T]], settings: Settings | None = None
) -> T:
    """Run ``await work(database)`` on the configured database, then close it.

    Args:
        work: the command's work.
        settings: already loaded settings (loaded here when None).
    """
    from gateway.clients.actor import acting_as, cli_actor
    from gateway.db.encryption import KeyringError, keyring_for
    from gateway.db.engine import make_engine, make_sessionmaker

    chosen = settings or settings_or_exit()
    try:
        keyring = keyring_for(chosen)
    except KeyringError as exc:
        raise fail(str(exc)) from exc

    async def main() -> T:
        engine = make_engine(chosen.database_url, keyring=keyring)
        try:
            with acting_as(cli_actor()):
                return await work(Database(chosen, make_sessionmaker(engine)))
        finally:
            await engine.dispose()

    return asyncio.run(main())


def run_until_stopped(
    settings: Settings,
    profiles: ProfileSet,
    serve: Callable[[Any, asyncio.Event], Awaitable[None]],
) -> None:
    """Run a long-lived process: ``await serve(runtime, stop)``, ``stop`` set on SIGTERM or
    SIGINT; SIGHUP reloads the profiles (a set with problems is refused, the running one
    stays). The runtime is closed at the end.

    Args:
        settings: the process's settings.
        profiles: the profiles loaded at start-up (:func:`profiles_or_exit`).
        serve: the process's work (a worker loop, a listener).
    """
    from gateway.logging import configure_logging
    from gateway.profiles.service import install_sighup_reload
    from gateway.runtime import Runtime

    configure_logging(settings.log_level, json=settings.log_json)

    from gateway.db.encryption import KeyringError, startup_problems

    async def main() -> None:
        try:
            runtime = Runtime.create(settings, profiles=profiles)
        except KeyringError as exc:
            raise fail(str(exc)) from exc
        refused = await startup_problems(settings, runtime.engine)
        if refused:
            await runtime.close()
            raise fail("refusing to start (GATEWAY_ENV=production): " + "; ".join(refused))
        install_sighup_reload(runtime)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(runtime, stop)
        finally:
            await runtime.close()

    asyncio.run(main())
