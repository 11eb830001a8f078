"""``SecretStore``: the environment first, then the secret env file (dotenv), re-read
when the file changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.runtime import Runtime
from gateway.secrets import SecretStore
from gateway.settings import Settings


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    env_file = tmp_path / "secrets.env"
    env_file.write_text("A=from-file\nB=only-in-file\n")
    store = SecretStore(env_file, environ={"A": "from-env"})
    assert store.get("A") == "from-env"
    assert store.get("B") == "only-in-file"
    assert store.get("C") is None


def test_an_empty_variable_does_not_hide_the_file(tmp_path: Path) -> None:
    env_file = tmp_path / "secrets.env"
    env_file.write_text("A=from-file\nEMPTY=\n")
    store = SecretStore(env_file, environ={"A": ""})
    assert store.get("A") == "from-file"
    assert store.get("EMPTY") is None


def test_a_rotated_file_is_read_again(tmp_path: Path) -> None:
    env_file = tmp_path / "secrets.env"
    env_file.write_text("A=old\n")
    store = SecretStore(env_file, environ={})
    assert store.get("A") == "old"
    env_file.write_text("A=rotated-value\n")
    assert store.get("A") == "rotated-value"


@pytest.mark.parametrize("kind", ["missing", "directory", "none"])
def test_no_file_is_no_secret(tmp_path: Path, kind: str) -> None:
    path = {"missing": tmp_path / "nope.env", "directory": tmp_path, "none": None}[kind]
    assert SecretStore(path, environ={}).get("A") is None


def test_the_process_environment_is_read_at_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SecretStore()
    monkeypatch.setenv("GATEWAY_TEST_SECRET_X", "set-later")
    assert store.get("GATEWAY_TEST_SECRET_X") == "set-later"
    assert "GATEWAY_TEST_SECRET_Y" not in os.environ
    assert store.get("GATEWAY_TEST_SECRET_Y") is None


def test_the_runtime_store_reads_the_settings_file(tmp_path: Path) -> None:
    env_file = tmp_path / "secrets.env"
    env_file.write_text("GATEWAY_TEST_SECRET_Z=z\n")
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'x.db'}",
        secret_env_file=env_file,
        _env_file=None,  # type: ignore[call-arg]
    )
    runtime = Runtime.create(settings)
    assert runtime.secrets.get("GATEWAY_TEST_SECRET_Z") == "z"
