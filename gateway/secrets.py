"""The secrets profiles name by environment variable, from one place.

A profile never holds a secret: it names the variable that does (an EHR target's
``auth.client_secret_env``, a partner's ``webhook.signature.secret_env``, a target's
``events.notifications.secret_env``). :class:`SecretStore` answers those names for every
consumer the same way: the process environment first, then the secret env file
(``GATEWAY_SECRET_ENV_FILE``, dotenv syntax), then the ``.env`` of the working directory
(the file the settings are read from, and that ``make run`` writes), so a secret kept in
either file works for token requests and webhook checks alike, as the Stripe secret does.

The files are read again when they change (modification time or size), so a rotated
secret is picked up without a restart; values are never logged.
:func:`unset_target_secrets` names what an enabled EHR target needs and does not have
(start-up and ``profiles check`` warn with it).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from threading import Lock

from dotenv import dotenv_values

from gateway.logging import get_logger
from gateway.settings import SETTINGS_DOTENV, Settings
from mappers.profiles import ProfileSet

log = get_logger(__name__)


class SecretStore:
    """Secrets by variable name: the environment, else the first file that has it, else None.

    Args:
        env_files: dotenv files of secrets (``NAME=value`` lines), in order; None entries
            are skipped, a missing file holds nothing.
        environ: the environment to read (the process environment when None; tests).
    """

    def __init__(self, *env_files: Path | None, environ: Mapping[str, str] | None = None):
        self.env_files = [_DotenvFile(path) for path in env_files if path is not None]
        self._environ = environ

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretStore:
        """The store of ``settings``: ``GATEWAY_SECRET_ENV_FILE``, then ``./.env``."""
        return cls(settings.secret_env_file, SETTINGS_DOTENV.resolve())

    def get(self, name: str) -> str | None:
        """The secret in variable ``name``; None when it is unset or empty everywhere.

        An empty value in the environment does not hide a file's value (an unset
        variable in a container is often an empty one).
        """
        if not name:
            return None
        environ = os.environ if self._environ is None else self._environ
        value = environ.get(name)
        if value:
            return value
        for env_file in self.env_files:
            value = env_file.values().get(name)
            if value:
                return value
        return None


class _DotenvFile:
    """One dotenv file, read again when its modification time or size changes."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = Lock()
        self._stamp: tuple[int, int] | None = None
        self._values: dict[str, str | None] = {}

    def values(self) -> dict[str, str | None]:
        try:
            found = self.path.stat()
        except OSError:
            return {}
        if not stat.S_ISREG(found.st_mode):
            return {}
        stamp = (found.st_mtime_ns, found.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._values = dict(dotenv_values(self.path))
                self._stamp = stamp
            return self._values


@dataclass(frozen=True)
class UnsetSecret:
    """A secret an enabled EHR target names and no source holds (names only)."""

    target: str
    setting: str  # the profile field: ``auth.client_secret_env``...
    variable: str

    def __str__(self) -> str:
        return (
            f"EHR target {self.target!r}: {self.setting} names {self.variable}, which is not "
            "set (environment, GATEWAY_SECRET_ENV_FILE or .env)"
        )


def unset_target_secrets(profiles: ProfileSet, store: SecretStore) -> list[UnsetSecret]:
    """Every secret an enabled EHR target needs that ``store`` does not hold: the token
    request's client secret (``client_secret_basic``/``_post``) and the notification
    header secret (``events.notifications.secret_env``)."""
    unset: list[UnsetSecret] = []
    for target in profiles.enabled_targets():
        needed: list[tuple[str, str | None]] = []
        if target.auth.method in ("client_secret_basic", "client_secret_post"):
            needed.append(("auth.client_secret_env", target.auth.client_secret_env))
        if target.events is not None:
            needed.append(
                ("events.notifications.secret_env", target.events.notifications.secret_env)
            )
        for setting, variable in needed:
            if variable and store.get(variable) is None:
                unset.append(UnsetSecret(target.name, setting, variable))
    return unset


def warn_unset_target_secrets(profiles: ProfileSet, store: SecretStore) -> list[UnsetSecret]:
    """Log ``secrets.target_secret_unset`` (target, profile field, variable name; never a
    value) for each of :func:`unset_target_secrets`, and return them."""
    unset = unset_target_secrets(profiles, store)
    for item in unset:
        log.warning(
            "secrets.target_secret_unset",
            target=item.target,
            setting=item.setting,
            variable=item.variable,
        )
    return unset
