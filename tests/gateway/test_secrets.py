"""``SecretStore``: the environment first, then the secret env file (dotenv), re-read
when the file changes."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.runtime import Runtime
from gateway.secrets import SecretStore, unset_target_secrets
from gateway.settings import BUNDLED_PROFILES_DIR, Settings
from mappers.profiles import load_profiles
from tests.support.profiles import copy_profiles


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


# --------------------------------------------------------------- one way everywhere (issue 15)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``tmp_path`` (where ``make run`` would have written ``.env``)."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_") or name.startswith("NC_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_settings_store_reads_dotenv_after_the_secret_env_file(in_tmp: Path) -> None:
    (in_tmp / ".env").write_text(
        "GATEWAY_STRIPE_WEBHOOK_SECRET=whsec_x\nNC_TEST_EHR=from-dotenv\nNC_TEST_BOTH=dotenv\n"
    )
    (in_tmp / "secrets.env").write_text("NC_TEST_BOTH=secret-file\n")
    settings = Settings(secret_env_file=in_tmp / "secrets.env")
    store = SecretStore.from_settings(settings)
    assert settings.stripe_webhook_secret is not None  # the settings read .env ...
    assert store.get("NC_TEST_EHR") == "from-dotenv"  # ... and so do target secrets
    assert store.get("NC_TEST_BOTH") == "secret-file"  # the named file first
    os.environ["NC_TEST_BOTH"] = "environment"
    try:
        assert store.get("NC_TEST_BOTH") == "environment"  # the environment before both
    finally:
        del os.environ["NC_TEST_BOTH"]


async def test_a_token_request_uses_the_client_secret_from_dotenv(in_tmp: Path) -> None:
    """The worker's token providers read through the runtime's store, ``.env`` included."""
    from gateway.oauth.tokens import token_provider_for
    from mappers.profiles.ehr import EhrAuth, EhrTargetProfile

    (in_tmp / ".env").write_text("NC_TEST_CLIENT_SECRET=dotenv-secret\n")
    settings = Settings(database_url=f"sqlite:///{in_tmp / 'x.db'}")
    runtime = Runtime.create(settings)
    seen: list[str] = []

    def token_endpoint(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(200, json={"access_token": "t", "token_type": "bearer"})

    try:
        from gateway.db.migrate import upgrade_async

        await upgrade_async(settings.database_url)
        target = EhrTargetProfile(
            name="acme",
            base_url="http://ehr.test/fhir",
            auth=EhrAuth(
                method="client_secret_basic",
                token_url="http://ehr.test/token",
                client_id="gateway",
                client_secret_env="NC_TEST_CLIENT_SECRET",
            ),
        )
        provider = token_provider_for(
            target,
            sessionmaker=runtime.sessionmaker,
            profiles_root=in_tmp,
            secrets=runtime.secrets,
            transport=httpx.MockTransport(token_endpoint),
        )
        assert await provider.get_token() == "t"
    finally:
        await runtime.close()
    [basic] = seen
    assert base64.b64decode(basic.split()[1]) == b"gateway:dotenv-secret"


def _enabled_target(root: Path, *, secret_env: str, notifications_env: str | None) -> None:
    target: dict[str, object] = {
        "kind": "ehr",
        "name": "nc-ehr",
        "enabled": True,
        "base_url": "https://ehr.example.org/fhir",
        "auth": {
            "method": "client_secret_post",
            "token_url": "https://ehr.example.org/token",
            "client_id": "gateway",
            "client_secret_env": secret_env,
        },
    }
    if notifications_env:
        target["events"] = {
            "notifications": {"secret_env": notifications_env},
            "resources": [{"resource": "Encounter", "event": "appointment_booked"}],
        }
    (root / "ehr" / "nc-ehr.yaml").write_text(yaml.safe_dump(target))


def test_unset_target_secrets_names_what_an_enabled_target_lacks(in_tmp: Path) -> None:
    root = copy_profiles(in_tmp / "p")
    _enabled_target(root, secret_env="NC_TEST_A", notifications_env="NC_TEST_B")
    profiles = load_profiles(root)
    store = SecretStore(environ={"NC_TEST_B": "set"})
    [unset] = unset_target_secrets(profiles, store)
    assert (unset.target, unset.setting, unset.variable) == (
        "nc-ehr",
        "auth.client_secret_env",
        "NC_TEST_A",
    )
    assert (
        unset_target_secrets(profiles, SecretStore(environ={"NC_TEST_A": "a", "NC_TEST_B": "b"}))
        == []
    )
    # the bundled targets are disabled: nothing to say about them
    assert unset_target_secrets(load_profiles(BUNDLED_PROFILES_DIR), SecretStore(environ={})) == []


async def test_start_up_warns_of_an_enabled_targets_unset_secret(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.app import create_app
    from gateway.db.migrate import upgrade_async

    root = copy_profiles(in_tmp / "p")
    _enabled_target(root, secret_env="NC_TEST_UNSET_SECRET", notifications_env=None)
    settings = Settings(database_url=f"sqlite:///{in_tmp / 'x.db'}", profiles_dir=root)
    runtime = Runtime.create(settings)
    try:
        await upgrade_async(settings.database_url)
        app = create_app(settings, runtime=runtime, run_worker=False)
        capsys.readouterr()
        async with app.router.lifespan_context(app):
            pass
    finally:
        await runtime.close()
    [line] = [x for x in capsys.readouterr().out.splitlines() if "target_secret_unset" in x]
    assert "nc-ehr" in line and "NC_TEST_UNSET_SECRET" in line


def test_profiles_check_warns_of_an_unset_secret_without_failing_strict(in_tmp: Path) -> None:
    from typer.testing import CliRunner

    from gateway.cli import app

    root = copy_profiles(in_tmp / "p")
    _enabled_target(root, secret_env="NC_TEST_UNSET_SECRET", notifications_env=None)
    r = CliRunner().invoke(app, ["profiles", "check", str(root), "--strict"])
    assert r.exit_code == 0, r.output
    [line] = [x for x in r.output.splitlines() if "[secret-unset]" in x]
    assert "'nc-ehr'" in line and "NC_TEST_UNSET_SECRET" in line
    (in_tmp / ".env").write_text("NC_TEST_UNSET_SECRET=now-set\n")
    r = CliRunner().invoke(app, ["profiles", "check", str(root)])
    assert "[secret-unset]" not in r.output
