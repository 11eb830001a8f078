"""``fhir-gateway keys rotate|list|jwks|prune|encryption-key|rotate-kek``: the gateway's SMART signing
keys (see :mod:`gateway.oauth.keys` for the rotation schedule).

Private keys never leave the database through these commands; ``jwks`` prints public keys.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated, Any, Literal

import typer

from gateway.cli.common import Database, fail, run_on_database, settings_or_exit

app = typer.Typer(help="SMART Backend Services signing keys (JWKS).", no_args_is_help=True)


def _cipher(settings: Any) -> Any:
    from gateway.oauth.keys import KeyCipher

    secret = settings.key_encryption_key
    previous = settings.key_encryption_key_previous
    return KeyCipher(
        secret.get_secret_value() if secret is not None else None,
        previous.get_secret_value().split(",") if previous is not None else (),
    )


@app.command("rotate")
def rotate_cmd(
    alg: Annotated[str, typer.Option(help="RS384 or ES384")] = "RS384",
    publish_lead_s: Annotated[
        int,
        typer.Option(
            min=0, help="Seconds the new key is published before it signs (> EHRs' JWKS cache)"
        ),
    ] = 3600,
    retire_grace_s: Annotated[
        int,
        typer.Option(min=300, help="Seconds the old key stays published after it stops signing"),
    ] = 3600,
    rsa_bits: Annotated[int, typer.Option(min=2048, max=8192)] = 2048,
    force: Annotated[bool, typer.Option(help="Replace a key still waiting to activate")] = False,
) -> None:
    """Create a new signing key: published now, signing after --publish-lead-s (at once if
    it is the first key of its alg); the current key keeps signing until then and stays in
    the JWKS for --retire-grace-s more."""
    from gateway.db.types import utcnow
    from gateway.oauth.keys import RotationPendingError, rotate

    if alg not in ("RS384", "ES384"):
        typer.secho("--alg must be RS384 or ES384", fg="red", err=True)
        raise typer.Exit(2)
    chosen: Literal["RS384", "ES384"] = "RS384" if alg == "RS384" else "ES384"

    async def work(db: Database) -> tuple[Any, Any, bool]:
        cipher = _cipher(db.settings)
        async with db.session() as session:
            result = await rotate(
                session,
                alg=chosen,
                now=utcnow(),
                publish_lead=timedelta(seconds=publish_lead_s),
                retire_grace=timedelta(seconds=retire_grace_s),
                cipher=cipher,
                rsa_bits=rsa_bits,
                force=force,
            )
            await session.commit()
            return result.new, result.replaced, cipher.encrypts

    try:
        new, replaced, encrypted = run_on_database(work)
    except RotationPendingError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"new {alg} key {new.kid}: published now, signs from {new.activates_at.isoformat()}")
    if replaced is not None:
        typer.echo(
            f"key {replaced.kid} signs until {replaced.retired_at.isoformat()}, "
            f"published until {replaced.published_until.isoformat()}"
        )
    if not encrypted:
        typer.secho(
            "note: GATEWAY_KEY_ENCRYPTION_KEY is not set; the private key is stored as PEM",
            fg="yellow",
            err=True,
        )


@app.command("list")
def list_cmd() -> None:
    """List the gateway's keys and their schedule (no key material)."""
    from gateway.db.types import utcnow
    from gateway.oauth import repository as repo

    async def work(db: Database) -> list[Any]:
        async with db.session() as session:
            return await repo.all_keys(session)

    def when(value: Any) -> str:
        return str(value.isoformat(timespec="seconds")) if value is not None else "-"

    now = utcnow()
    for key in run_on_database(work):
        if key.published_until is not None and key.published_until <= now:
            state = "unpublished"
        elif key.activates_at > now:
            state = "pending"
        elif key.retired_at is not None and key.retired_at <= now:
            state = "retired"
        else:
            state = "active"
        typer.echo(
            "\t".join(
                [
                    key.kid,
                    key.alg,
                    state,
                    f"activates={when(key.activates_at)}",
                    f"retires={when(key.retired_at)}",
                    f"published_until={when(key.published_until)}",
                    "encrypted" if key.encrypted else "pem",
                ]
            )
        )


@app.command("jwks")
def jwks_cmd() -> None:
    """Print the JWKS of the gateway's published keys (what /.well-known/jwks.json serves,
    without targets' key files)."""
    from gateway.db.types import utcnow
    from gateway.oauth.keys import published_jwks

    async def work(db: Database) -> list[dict[str, Any]]:
        async with db.session() as session:
            return await published_jwks(session, now=utcnow())

    typer.echo(json.dumps({"keys": run_on_database(work)}, indent=2))


@app.command("prune")
def prune_cmd() -> None:
    """Delete keys that are no longer published."""
    from gateway.db.types import utcnow
    from gateway.oauth import repository as repo

    async def work(db: Database) -> list[str]:
        async with db.session() as session:
            kids = await repo.delete_unpublished(session, now=utcnow())
            await session.commit()
            return kids

    kids = run_on_database(work)
    typer.echo(f"deleted {len(kids)} keys" + (f": {' '.join(kids)}" if kids else ""))


@app.command("encryption-key")
def encryption_key_cmd() -> None:
    """Print a new key encryption key for GATEWAY_KEY_ENCRYPTION_KEY (32 random bytes,
    base64url). Store it in your secrets manager, not beside the database; then run
    `keys rotate-kek` to encrypt what is stored (see docs/SECURITY.md)."""
    from gateway.db.encryption import new_kek

    typer.echo(new_kek())


@app.command("rotate-kek")
def rotate_kek_cmd() -> None:
    """Re-encrypt every stored secret (EHR access tokens, subscriber secrets, private
    signing keys) under GATEWAY_KEY_ENCRYPTION_KEY, reading values wrapped by the keys in
    GATEWAY_KEY_ENCRYPTION_KEY_PREVIOUS and values stored in plaintext. One transaction:
    all or nothing. Afterwards GATEWAY_KEY_ENCRYPTION_KEY_PREVIOUS can be removed."""
    from gateway.audit import service as audit
    from gateway.db.encryption import SecretDecryptionError, secret_counts, session_keyring
    from gateway.db.rekey import reencrypt_all

    settings = settings_or_exit()
    if settings.key_encryption_key is None:
        raise fail("GATEWAY_KEY_ENCRYPTION_KEY is not set (`fhir-gateway keys encryption-key`)")
    legacy = [settings.key_encryption_key.get_secret_value()]
    if settings.key_encryption_key_previous is not None:
        legacy += settings.key_encryption_key_previous.get_secret_value().split(",")

    async def work(db: Database) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        async with db.session() as session:
            keyring = session_keyring(session)
            counts = await reencrypt_all(session, legacy_keys=[k for k in legacy if k])
            audit.record(
                session,
                action="update",
                entity_type="KeyEncryptionKey",
                entity_id=keyring.current_id if keyring else "-",
                detail={k: str(v) for k, v in counts.items()},
            )
            await session.commit()
            return counts, await secret_counts(session, keyring=keyring)

    try:
        counts, after = run_on_database(work, settings)
    except SecretDecryptionError as exc:
        raise fail(f"nothing was changed: {exc}", code=1) from exc
    for column, n in counts.items():
        left = after[column]
        typer.echo(
            f"{column}: {n} re-encrypted; now {left['current']} under the current key, "
            f"{left['plaintext'] + left['legacy'] + left['older']} not"
        )
