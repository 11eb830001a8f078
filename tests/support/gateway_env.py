"""Helpers to point a test gateway at a local EHR (:mod:`testkit.ehr`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from gateway.settings import BUNDLED_PROFILES_DIR
from testkit.ehr import RunningEhr

SECRET_ENV = "TEST_EHR_CLIENT_SECRET"


def profiles_with_target(
    dest: Path,
    running: RunningEhr,
    *,
    name: str = "test-ehr",
    auth_method: str = "client_secret_basic",
    client_id: str = "gateway",
    extra: dict[str, object] | None = None,
) -> Path:
    """Copy the bundled profiles to ``dest`` and add an enabled EHR target for ``running``.

    The client secret is read from the environment variable :data:`SECRET_ENV`.
    """
    shutil.copytree(BUNDLED_PROFILES_DIR, dest)
    target: dict[str, object] = {
        "kind": "ehr",
        "name": name,
        "enabled": True,
        "base_url": running.fhir_base,
        "auth": {
            "method": auth_method,
            "token_url": running.token_url,
            "client_id": client_id,
            "client_secret_env": SECRET_ENV,
            "scopes": ["system/*.cruds"],
        },
        "timeout_s": 2,
        "retry": {"base_delay_s": 0.01, "max_delay_s": 0.05, "max_attempts": 6},
    }
    target.update(extra or {})
    (dest / "ehr" / f"{name}.yaml").write_text(yaml.safe_dump(target))
    return dest
