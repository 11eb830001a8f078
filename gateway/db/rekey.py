"""``fhir-gateway keys rotate-kek``: re-encrypt every stored secret under the current key
encryption key (:mod:`gateway.db.encryption`).

Each secret is read (decrypted with whichever KEK of the keyring wrapped it, or read as
plaintext when it was stored before encryption, or as a legacy Fernet token for private
signing keys of earlier releases) and written again, which encrypts it under the current
KEK with a fresh data key. Run it after setting a new ``GATEWAY_KEY_ENCRYPTION_KEY`` with
the old one in ``GATEWAY_KEY_ENCRYPTION_KEY_PREVIOUS``, or once after upgrading to encrypt
what was stored in plaintext; then drop ``..._PREVIOUS``. Idempotent: running it twice
re-encrypts twice, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import flag_modified

from gateway.db.encryption import SecretDecryptionError
from gateway.db.models import OAuthToken, SigningKey, Subscriber


def _open_fernet(token: str, keys: Sequence[str], *, kid: str) -> str:
    for key in keys:
        try:
            return Fernet(key.encode()).decrypt(token.encode()).decode()
        except (InvalidToken, ValueError):
            continue
    raise SecretDecryptionError(
        f"signing key {kid} is a legacy Fernet token that none of the configured key "
        "encryption keys opens"
    )


async def reencrypt_all(session: AsyncSession, *, legacy_keys: Sequence[str]) -> dict[str, int]:
    """Write every secret again (the engine's keyring encrypts it under the current KEK);
    returns how many per ``table.column``. Flushes; the caller commits.

    Args:
        legacy_keys: KEKs to try on legacy Fernet-encrypted private keys (current first).

    Raises:
        SecretDecryptionError: a value cannot be decrypted with the configured KEKs
            (nothing is written: the caller rolls back).
    """
    counts = {
        "oauth_tokens.access_token": 0,
        "subscribers.secret": 0,
        "signing_keys.private_key": 0,
    }
    for token in await session.scalars(
        select(OAuthToken).where(OAuthToken.access_token.is_not(None))
    ):
        flag_modified(token, "access_token")
        counts["oauth_tokens.access_token"] += 1
    for subscriber in await session.scalars(select(Subscriber)):
        flag_modified(subscriber, "secret")
        counts["subscribers.secret"] += 1
    for key in await session.scalars(select(SigningKey)):
        if key.encrypted:
            key.private_key = _open_fernet(key.private_key, legacy_keys, kid=key.kid)
            key.encrypted = False
        flag_modified(key, "private_key")
        counts["signing_keys.private_key"] += 1
    await session.flush()
    return counts
