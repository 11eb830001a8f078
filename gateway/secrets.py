"""The secrets profiles name by environment variable, from one place.

A profile never holds a secret: it names the variable that does (an EHR target's
``auth.client_secret_env``, a partner's ``webhook.signature.secret_env``, a target's
``events.notifications.secret_env``). :class:`SecretStore` answers those names for every
consumer the same way: the process environment first, then the secret env file
(``GATEWAY_SECRET_ENV_FILE``, dotenv syntax), so a secret kept in that file works for
token requests and webhook checks alike.

The file is read again when it changes (its modification time or size), so a rotated
secret is picked up without a restart; values are never logged.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from threading import Lock

from dotenv import dotenv_values

from gateway.settings import Settings


class SecretStore:
    """Secrets by variable name: the environment, else the secret env file, else None.

    Args:
        env_file: a dotenv file of secrets (``NAME=value`` lines), or None.
        environ: the environment to read (the process environment when None; tests).
    """

    def __init__(self, env_file: Path | None = None, environ: Mapping[str, str] | None = None):
        self.env_file = env_file
        self._environ = environ
        self._lock = Lock()
        self._stamp: tuple[int, int] | None = None
        self._values: dict[str, str | None] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretStore:
        """The store of ``settings`` (``GATEWAY_SECRET_ENV_FILE``)."""
        return cls(settings.secret_env_file)

    def get(self, name: str) -> str | None:
        """The secret in variable ``name``; None when it is unset or empty everywhere.

        An empty value in the environment does not hide the file's value (an unset
        variable in a container is often an empty one).
        """
        if not name:
            return None
        environ = os.environ if self._environ is None else self._environ
        value = environ.get(name)
        if value:
            return value
        return self._from_file().get(name) or None

    def _from_file(self) -> dict[str, str | None]:
        if self.env_file is None:
            return {}
        try:
            found = self.env_file.stat()
        except OSError:
            return {}
        if not stat.S_ISREG(found.st_mode):
            return {}
        stamp = (found.st_mtime_ns, found.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._values = dict(dotenv_values(self.env_file))
                self._stamp = stamp
            return self._values
