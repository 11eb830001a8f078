"""Secrets at rest (issue 11): database files and ``.env`` created 0600; EHR access
tokens, subscriber secrets and private keys envelope-encrypted with the key encryption key
(AES-256-GCM); ``fhir-gateway keys rotate-kek`` re-encrypts everything (plaintext and
legacy Fernet values included); with ``GATEWAY_ENV=production`` start-up refuses a missing
key encryption key, plaintext secrets and world-readable secret files."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, text
from typer.testing import CliRunner

from gateway.app import UnsafeStartError, create_app
from gateway.cli import app as cli_app
from gateway.db.encryption import (
    Keyring,
    SecretDecryptionError,
    attach_keyring,
    new_kek,
)
from gateway.db.engine import make_engine, make_sessionmaker
from gateway.db.models import OAuthToken, SigningKey, Subscriber
from gateway.db.types import utcnow
from gateway.oauth import keys
from gateway.runtime import Runtime
from gateway.settings import Settings

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


async def invoke(args: list[str]) -> Any:
    """The CLI from an async test (it runs its own event loop: in a thread)."""
    return await asyncio.to_thread(runner.invoke, cli_app, args)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def cli_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A migrated SQLite file the CLI is pointed at, no GATEWAY_* from outside."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "gw.db"
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{path}")
    result = runner.invoke(cli_app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    return path


# --------------------------------------------------------------------------- files


def test_the_sqlite_database_and_its_wal_are_created_0600(cli_db: Path) -> None:
    assert mode(cli_db) == 0o600
    with sqlite3.connect(cli_db) as conn:  # WAL and shared memory take the file's mode
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        for suffix in ("-wal", "-shm"):
            side = cli_db.with_name(cli_db.name + suffix)
            if side.exists():
                assert mode(side) & 0o077 == 0, suffix


def test_an_existing_world_readable_database_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    path.touch()
    path.chmod(0o644)
    make_engine(f"sqlite:///{path}")
    assert mode(path) == 0o600


def test_make_writes_the_env_file_0600(tmp_path: Path) -> None:
    subprocess.run(
        ["make", "-s", "-f", str(REPO / "Makefile"), ".env", "PYTHON=python3"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    assert mode(tmp_path / ".env") == 0o600
    assert (tmp_path / ".env").read_text().startswith("GATEWAY_STRIPE_WEBHOOK_SECRET=whsec_")


# --------------------------------------------------------------------------- encryption


async def raw(runtime: Runtime, sql: str) -> list[Any]:
    async with runtime.sessionmaker() as session:
        return list(await session.scalars(text(sql)))


async def test_tokens_and_subscriber_secrets_are_stored_encrypted(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    attach_keyring(runtime.engine, Keyring(new_kek()))
    r = await client.post(
        "/v1/ops/subscribers",
        json={
            "name": "crm",
            "url": "https://crm.example.org/hooks",
            "event_types": ["case.state_changed"],
        },
        headers=admin_headers,
    )
    assert r.status_code == 201, r.text
    secret = r.json()["secret"]
    async with runtime.sessionmaker() as session:
        session.add(OAuthToken(target="acme", access_token="tok-123", failures=0))
        await session.commit()

    (stored_secret,) = await raw(runtime, "SELECT secret FROM subscribers")
    (stored_token,) = await raw(runtime, "SELECT access_token FROM oauth_tokens")
    for stored, plain in ((stored_secret, secret), (stored_token, "tok-123")):
        assert stored.startswith("enc:v1:") and plain not in stored
    async with runtime.sessionmaker() as session:  # the code reads them as before
        assert (await session.scalar(select(Subscriber.secret))) == secret
        assert (await session.scalar(select(OAuthToken.access_token))) == "tok-123"

    # A ciphertext is bound to its column: moved to another, it does not open.
    async with runtime.sessionmaker() as session:
        await session.execute(
            text("UPDATE oauth_tokens SET access_token = :v"), {"v": stored_secret}
        )
        await session.commit()
    async with runtime.sessionmaker() as session:
        with pytest.raises(SecretDecryptionError, match="integrity"):
            await session.scalar(select(OAuthToken.access_token))


def test_values_under_an_unknown_key_or_altered_do_not_decrypt() -> None:
    ring = Keyring(new_kek())
    sealed = ring.encrypt("s3cret", context="subscribers.secret")
    assert ring.decrypt(sealed, context="subscribers.secret") == "s3cret"
    with pytest.raises(SecretDecryptionError, match="not configured"):
        Keyring(new_kek()).decrypt(sealed, context="subscribers.secret")
    flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(SecretDecryptionError):
        ring.decrypt(flipped, context="subscribers.secret")


# --------------------------------------------------------------------------- rotate-kek


async def seed_legacy(path: Path, legacy_kek: str) -> None:
    """What an earlier release left: a plaintext token and subscriber secret, and a
    private key as a Fernet token."""
    engine = make_engine(f"sqlite:///{path}")
    material = keys.generate_key("ES384")
    now = utcnow()
    async with make_sessionmaker(engine)() as session:
        session.add(OAuthToken(target="acme", access_token="tok-legacy", failures=0))
        session.add(
            Subscriber(
                name="crm", url="https://crm.example.org", secret="whsec_legacy", event_types=[]
            )
        )
        session.add(
            SigningKey(
                kid=material.kid,
                alg="ES384",
                private_key=Fernet(legacy_kek.encode())
                .encrypt(material.key.as_pem(private=True))
                .decode(),
                encrypted=True,
                public_jwk=keys.public_jwk(material.key, kid=material.kid, alg="ES384"),
                created_at=now,
                activates_at=now,
            )
        )
        await session.commit()
    await engine.dispose()


def stored(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [
            conn.execute("SELECT access_token FROM oauth_tokens").fetchone()[0],
            conn.execute("SELECT secret FROM subscribers").fetchone()[0],
            conn.execute("SELECT private_key FROM signing_keys").fetchone()[0],
        ]


async def read_back(path: Path, ring: Keyring) -> tuple[str | None, str, str]:
    engine = make_engine(f"sqlite:///{path}", keyring=ring)
    try:
        async with make_sessionmaker(engine)() as session:
            key = await session.scalar(select(SigningKey))
            assert key is not None and not key.encrypted
            return (
                await session.scalar(select(OAuthToken.access_token)),
                (await session.scalar(select(Subscriber.secret))) or "",
                key.private_key,
            )
    finally:
        await engine.dispose()


async def test_rotate_kek_encrypts_legacy_values_then_moves_them_to_a_new_key(
    cli_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = new_kek(), new_kek()
    await seed_legacy(cli_db, legacy_kek=first)

    monkeypatch.setenv("GATEWAY_KEY_ENCRYPTION_KEY", first)
    result = await invoke(["keys", "rotate-kek"])
    assert result.exit_code == 0, result.output
    assert (
        "signing_keys.private_key: 1 re-encrypted; now 1 under the current key, 0 not"
        in result.stdout
    )
    ring = Keyring(first)
    assert all(value.startswith(f"enc:v1:{ring.current_id}:") for value in stored(cli_db))
    token, secret, pem = await read_back(cli_db, ring)
    assert (token, secret) == ("tok-legacy", "whsec_legacy") and "PRIVATE KEY" in pem

    # A new key: the old one stays readable as PREVIOUS until rotate-kek has run.
    monkeypatch.setenv("GATEWAY_KEY_ENCRYPTION_KEY", second)
    monkeypatch.setenv("GATEWAY_KEY_ENCRYPTION_KEY_PREVIOUS", first)
    result = await invoke(["keys", "rotate-kek"])
    assert result.exit_code == 0, result.output
    new_ring = Keyring(second)
    assert all(value.startswith(f"enc:v1:{new_ring.current_id}:") for value in stored(cli_db))
    assert (await read_back(cli_db, new_ring))[:2] == ("tok-legacy", "whsec_legacy")
    with pytest.raises(SecretDecryptionError):
        await read_back(cli_db, Keyring(first))

    # With a key that opens nothing: refused, nothing changed.
    before = stored(cli_db)
    monkeypatch.setenv("GATEWAY_KEY_ENCRYPTION_KEY", new_kek())
    monkeypatch.delenv("GATEWAY_KEY_ENCRYPTION_KEY_PREVIOUS")
    result = await invoke(["keys", "rotate-kek"])
    assert result.exit_code == 1
    assert "nothing was changed" in result.stderr
    assert stored(cli_db) == before


def test_rotate_kek_needs_a_key(cli_db: Path) -> None:
    result = runner.invoke(cli_app, ["keys", "rotate-kek"])
    assert result.exit_code == 2
    assert "GATEWAY_KEY_ENCRYPTION_KEY is not set" in result.stderr


def test_encryption_key_prints_a_usable_kek(cli_db: Path) -> None:
    result = runner.invoke(cli_app, ["keys", "encryption-key"])
    assert result.exit_code == 0
    Keyring(result.stdout.strip())  # 32 bytes of base64url


# --------------------------------------------------------------------------- production


def production(cli_db: Path, **overrides: Any) -> Settings:
    return Settings(
        database_url=f"sqlite:///{cli_db}",
        env="production",
        run_worker=False,
        _env_file=None,  # type: ignore[call-arg]
        **overrides,
    )


async def start(settings: Settings) -> None:
    app = create_app(settings, run_worker=False)
    async with app.router.lifespan_context(app):
        pass


async def test_production_refuses_a_missing_key_and_plaintext_secrets(
    cli_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kek = new_kek()
    await seed_legacy(cli_db, legacy_kek=kek)
    with pytest.raises(UnsafeStartError, match="GATEWAY_KEY_ENCRYPTION_KEY is not set"):
        await start(production(cli_db))
    with pytest.raises(
        UnsafeStartError, match=r"1 secret\(s\) in subscribers.secret are stored in plaintext"
    ):
        await start(production(cli_db, key_encryption_key=kek))

    monkeypatch.setenv("GATEWAY_KEY_ENCRYPTION_KEY", kek)
    assert (await invoke(["keys", "rotate-kek"])).exit_code == 0
    await start(production(cli_db, key_encryption_key=kek))  # starts

    (cli_db.parent / ".env").write_text("GATEWAY_LOG_LEVEL=info\n")
    (cli_db.parent / ".env").chmod(0o644)
    with pytest.raises(UnsafeStartError, match=r"\.env may be read by group or others"):
        await start(production(cli_db, key_encryption_key=kek))
    development = production(cli_db).model_copy(update={"env": "development"})
    await start(development)  # development: no checks


def test_the_worker_refuses_to_start_in_production_without_a_key(
    cli_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ENV", "production")
    result = runner.invoke(cli_app, ["worker"])
    assert result.exit_code == 2
    assert "refusing to start" in result.stderr and "GATEWAY_KEY_ENCRYPTION_KEY" in result.stderr


async def test_counts_and_reencryption_on_each_database(runtime: Runtime) -> None:
    """The raw-text counts and rotate-kek's service on SQLite and PostgreSQL alike."""
    from gateway.db.encryption import secret_counts
    from gateway.db.rekey import reencrypt_all

    async with runtime.sessionmaker() as session:  # no keyring yet: plaintext, as before
        session.add(OAuthToken(target="acme", access_token="tok-1", failures=0))
        session.add(
            Subscriber(name="crm", url="https://crm.example.org", secret="s", event_types=[])
        )
        await session.commit()
        counts = await secret_counts(session, keyring=None)
    assert counts["oauth_tokens.access_token"]["plaintext"] == 1
    assert counts["subscribers.secret"]["plaintext"] == 1

    ring = Keyring(new_kek())
    attach_keyring(runtime.engine, ring)
    async with runtime.sessionmaker() as session:
        moved = await reencrypt_all(session, legacy_keys=[ring.current_text])
        await session.commit()
        counts = await secret_counts(session, keyring=ring)
    assert moved["oauth_tokens.access_token"] == moved["subscribers.secret"] == 1
    assert counts["oauth_tokens.access_token"] == {
        "plaintext": 0,
        "legacy": 0,
        "current": 1,
        "older": 0,
    }
    async with runtime.sessionmaker() as session:
        assert await session.scalar(select(OAuthToken.access_token)) == "tok-1"
