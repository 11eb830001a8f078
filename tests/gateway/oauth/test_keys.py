"""Signing keys: rotation schedule, the JWKS endpoint, encryption at rest, key files, and
an EHR that verifies our assertions against the JWKS we publish."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy import delete, text
from typer.testing import CliRunner

from gateway.cli import app as cli_app
from gateway.clock import ManualClock
from gateway.db.encryption import Keyring, SecretDecryptionError, attach_keyring, new_kek
from gateway.db.models import OAuthToken, SigningKey
from gateway.db.types import utcnow
from gateway.ehr.errors import EhrConfigError
from gateway.oauth import keys
from gateway.oauth.keys import (
    KeyCipher,
    KeyDecryptionError,
    KeyFileError,
    NoSigningKeyError,
    RotationPendingError,
    rotate,
    signing_material,
)
from gateway.oauth.tokens import token_provider_for
from gateway.runtime import Runtime
from mappers.profiles.ehr import EhrAuth, EhrTargetProfile
from testkit.ehr import LocalEhr, run_ehr_async

HOUR = timedelta(hours=1)
PLAIN = KeyCipher(None)


async def _published(runtime: Runtime, at: object) -> set[str]:
    async with runtime.sessionmaker() as session:
        return {k["kid"] for k in await keys.published_jwks(session, now=at)}  # type: ignore[arg-type]


async def _signing(runtime: Runtime, at: object) -> str:
    async with runtime.sessionmaker() as session:
        return (await signing_material(session, alg="RS384", now=at, cipher=PLAIN)).kid  # type: ignore[arg-type]


async def test_rotation_publishes_the_new_key_before_it_signs_and_keeps_the_old_one(
    runtime: Runtime,
) -> None:
    t0 = utcnow()
    async with runtime.sessionmaker() as session:
        first = await rotate(
            session, alg="RS384", now=t0, publish_lead=HOUR, retire_grace=HOUR, cipher=PLAIN
        )
        await session.commit()
    k1 = first.new.kid
    assert first.replaced is None
    assert await _signing(runtime, t0) == k1  # the first key signs at once

    t1 = t0 + 2 * HOUR
    lead, grace = timedelta(minutes=30), HOUR
    async with runtime.sessionmaker() as session:
        second = await rotate(
            session, alg="RS384", now=t1, publish_lead=lead, retire_grace=grace, cipher=PLAIN
        )
        await session.commit()
    k2 = second.new.kid

    assert await _published(runtime, t1) == {k1, k2}  # published now...
    assert await _signing(runtime, t1) == k1  # ...but not signing yet
    assert await _signing(runtime, t1 + lead - timedelta(seconds=1)) == k1
    assert await _signing(runtime, t1 + lead) == k2
    # the old key stays published while assertions it signed may still be presented
    assert await _published(runtime, t1 + lead + grace - timedelta(seconds=1)) == {k1, k2}
    assert await _published(runtime, t1 + lead + grace) == {k2}


async def test_a_second_rotation_waits_for_the_pending_one(runtime: Runtime) -> None:
    now = utcnow()
    async with runtime.sessionmaker() as session:
        await rotate(
            session, alg="ES384", now=now, publish_lead=HOUR, retire_grace=HOUR, cipher=PLAIN
        )
        pending = await rotate(
            session, alg="ES384", now=now, publish_lead=HOUR, retire_grace=HOUR, cipher=PLAIN
        )
        with pytest.raises(RotationPendingError):
            await rotate(
                session, alg="ES384", now=now, publish_lead=HOUR, retire_grace=HOUR, cipher=PLAIN
            )
        replaced = await rotate(
            session,
            alg="ES384",
            now=now,
            publish_lead=HOUR,
            retire_grace=HOUR,
            cipher=PLAIN,
            force=True,
        )
        await session.commit()
        kids = {k["kid"] for k in await keys.published_jwks(session, now=now)}
    assert pending.new.kid not in kids
    assert replaced.new.kid in kids


async def test_retire_grace_must_outlive_an_assertion(runtime: Runtime) -> None:
    async with runtime.sessionmaker() as session:
        with pytest.raises(ValueError, match="5 minutes"):
            await rotate(
                session,
                alg="RS384",
                now=utcnow(),
                publish_lead=HOUR,
                retire_grace=timedelta(minutes=4),
                cipher=PLAIN,
            )


async def test_no_key_is_a_clear_error(runtime: Runtime) -> None:
    async with runtime.sessionmaker() as session:
        with pytest.raises(NoSigningKeyError, match="keys rotate --alg RS384"):
            await signing_material(session, alg="RS384", now=utcnow(), cipher=PLAIN)


async def test_private_keys_are_encrypted_at_rest_with_the_configured_key(
    runtime: Runtime,
) -> None:
    kek = new_kek()
    attach_keyring(runtime.engine, Keyring(kek))
    cipher = KeyCipher(kek)
    now = utcnow()
    async with runtime.sessionmaker() as session:
        result = await rotate(
            session, alg="RS384", now=now, publish_lead=HOUR, retire_grace=HOUR, cipher=cipher
        )
        await session.commit()
        stored = await session.scalar(
            text("SELECT private_key FROM signing_keys WHERE kid = :kid"), {"kid": result.new.kid}
        )
        assert stored.startswith("enc:v1:") and "PRIVATE KEY" not in stored
        assert (await signing_material(session, alg="RS384", now=now, cipher=cipher)).kid == (
            result.new.kid
        )
    attach_keyring(runtime.engine, Keyring(new_kek()))  # the wrong key encryption key
    async with runtime.sessionmaker() as session:
        with pytest.raises(SecretDecryptionError):
            await signing_material(session, alg="RS384", now=now, cipher=cipher)


async def test_legacy_fernet_private_keys_stay_readable(runtime: Runtime) -> None:
    kek = new_kek()
    material = keys.generate_key("RS384")
    now = utcnow()
    async with runtime.sessionmaker() as session:
        session.add(
            SigningKey(
                kid=material.kid,
                alg="RS384",
                private_key=Fernet(kek.encode())
                .encrypt(material.key.as_pem(private=True))
                .decode(),
                encrypted=True,
                public_jwk=keys.public_jwk(material.key, kid=material.kid, alg="RS384"),
                created_at=now,
                activates_at=now,
            )
        )
        await session.commit()
        assert (
            await signing_material(session, alg="RS384", now=now, cipher=KeyCipher(kek))
        ).kid == (material.kid)
        with pytest.raises(KeyDecryptionError):
            await signing_material(session, alg="RS384", now=now, cipher=PLAIN)


def test_key_files_must_hold_a_fitting_private_key(tmp_path: Path) -> None:
    rsa = RSAKey.generate_key(2048, private=True)
    public = tmp_path / "public.pem"
    public.write_bytes(rsa.as_pem(private=False))
    ec = tmp_path / "ec.pem"
    ec.write_bytes(ECKey.generate_key("P-384", private=True).as_pem(private=True))
    p256 = tmp_path / "p256.json"
    p256.write_text(json.dumps(ECKey.generate_key("P-256", private=True).as_dict(private=True)))

    with pytest.raises(KeyFileError, match="public key"):
        keys.load_key_file(public, alg="RS384")
    with pytest.raises(KeyFileError):
        keys.load_key_file(ec, alg="RS384")
    with pytest.raises(KeyFileError, match="P-384"):
        keys.load_key_file(p256, alg="ES384")
    with pytest.raises(KeyFileError, match="cannot read"):
        keys.load_key_file(tmp_path / "missing.pem", alg="RS384")
    assert (
        keys.load_key_file(ec, alg="ES384").kid
        == keys.load_key_file(ec, alg="ES384").key.thumbprint()
    )


async def test_jwks_endpoint_publishes_public_keys_only(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    now = utcnow()
    async with runtime.sessionmaker() as session:
        rsa = await rotate(
            session, alg="RS384", now=now, publish_lead=HOUR, retire_grace=HOUR, cipher=PLAIN
        )
        ec = await rotate(
            session, alg="ES384", now=now, publish_lead=HOUR, retire_grace=HOUR, cipher=PLAIN
        )
        await session.commit()

    response = await client.get("/.well-known/jwks.json")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jwk-set+json")
    assert response.headers["cache-control"] == "public, max-age=300"
    body = response.json()
    by_kid = {k["kid"]: k for k in body["keys"]}
    assert set(by_kid) == {rsa.new.kid, ec.new.kid}
    assert by_kid[rsa.new.kid]["alg"] == "RS384" and by_kid[ec.new.kid]["alg"] == "ES384"
    for key in body["keys"]:
        assert key["use"] == "sig"
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)  # no private members


async def test_ehr_accepts_assertions_signed_with_a_rotated_key_it_saw_published(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    now = utcnow()
    async with runtime.sessionmaker() as session:
        first = await rotate(
            session, alg="RS384", now=now, publish_lead=HOUR, retire_grace=HOUR, cipher=PLAIN
        )
        await session.commit()
    ehr = LocalEhr()
    async with run_ehr_async(ehr) as running:
        profile = EhrTargetProfile(
            name="epic-like",
            base_url=running.fhir_base,
            auth=EhrAuth(
                method="private_key_jwt",
                token_url=running.token_url,
                client_id="gateway",
                scopes=["system/*.cruds"],
            ),
        )
        jwks_before = (await client.get("/.well-known/jwks.json")).json()
        ehr.set_jwks(jwks_before)  # the EHR fetched our JWKS URL
        tokens = token_provider_for(
            profile, sessionmaker=runtime.sessionmaker, profiles_root=Path(".")
        )
        assert await tokens.get_token()

        async with runtime.sessionmaker() as session:
            second = await rotate(
                session,
                alg="RS384",
                now=utcnow(),
                publish_lead=HOUR,
                retire_grace=HOUR,
                cipher=PLAIN,
            )
            await session.execute(delete(OAuthToken))  # force a new token request
            await session.commit()
        later = utcnow() + 2 * HOUR  # past the publish lead: the new key signs
        after_lead = token_provider_for(
            profile,
            sessionmaker=runtime.sessionmaker,
            profiles_root=Path("."),
            clock=ManualClock(later),
        )
        # An EHR that never saw the new key refuses it: why the key is published first.
        with pytest.raises(EhrConfigError):
            await after_lead.get_token()
        async with runtime.sessionmaker() as session:
            await session.execute(delete(OAuthToken))
            await session.commit()
        ehr.set_jwks((await client.get("/.well-known/jwks.json")).json())  # cache refreshed
        after_refetch = token_provider_for(
            profile,
            sessionmaker=runtime.sessionmaker,
            profiles_root=Path("."),
            clock=ManualClock(later),
        )
        assert await after_refetch.get_token()

    assert {k["kid"] for k in jwks_before["keys"]} == {first.new.kid}
    assert [r.status for r in ehr.token_requests] == [200, 401, 200]
    assert "kid" in ehr.token_errors[0] and second.new.kid in ehr.token_errors[0]


def test_keys_cli_rotate_list_jwks_prune(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", database_url)
    runner = CliRunner()

    first = runner.invoke(cli_app, ["keys", "rotate", "--alg", "ES384"])
    second = runner.invoke(cli_app, ["keys", "rotate", "--alg", "ES384", "--publish-lead-s", "600"])
    again = runner.invoke(cli_app, ["keys", "rotate", "--alg", "ES384"])
    listing = runner.invoke(cli_app, ["keys", "list"])
    jwks = runner.invoke(cli_app, ["keys", "jwks"])
    pruned = runner.invoke(cli_app, ["keys", "prune"])

    assert first.exit_code == 0, first.output
    assert "signs from" in first.output
    assert second.exit_code == 0, second.output
    assert "signs until" in second.output
    assert again.exit_code == 1 and "--force" in again.output
    states = [line.split("\t")[2] for line in listing.stdout.strip().splitlines()]
    assert states == ["active", "pending"]
    assert len(json.loads(jwks.stdout)["keys"]) == 2
    assert pruned.exit_code == 0 and "deleted 0 keys" in pruned.output
