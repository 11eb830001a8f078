"""Secrets at rest: envelope encryption of stored secrets with the key encryption key.

What is encrypted: EHR access tokens (``oauth_tokens.access_token``), ops subscribers'
signing secrets (``subscribers.secret``) and the gateway's private signing keys
(``signing_keys.private_key``). Their columns are :class:`EncryptedText`: a value is
encrypted when it is written and decrypted when it is read, so the code that uses them
sees plain strings.

Envelope encryption (NIST SP 800-57 part 1, "key-wrapping key"): every value gets a fresh
256-bit data encryption key (DEK); the value is encrypted with the DEK (AES-256-GCM,
96-bit random nonce, the column name as associated data so a ciphertext cannot be moved
to another column), and the DEK is wrapped with the key encryption key (KEK, AES-256-GCM
too). Stored text::

    enc:v1:<kek id>:<base64url(nonce || wrapped DEK)>:<base64url(nonce || ciphertext)>

``<kek id>`` (8 hex digits of SHA-256 of the KEK) names the KEK that wrapped the DEK, so
values written under an earlier KEK stay readable while ``GATEWAY_KEY_ENCRYPTION_KEY_PREVIOUS``
lists it, until ``fhir-gateway keys rotate-kek`` re-encrypts them under the current one.

A KEK is 32 random bytes, base64url (``fhir-gateway keys encryption-key`` prints one; the
Fernet keys earlier releases used have the same form and keep working). The keyring is
per engine (:func:`attach_keyring`), not global. Without a keyring values are written as
plaintext (development only: with ``GATEWAY_ENV=production`` the gateway refuses to start,
:func:`plaintext_secret_counts`). Values stored as plaintext before (no ``enc:v1:``
prefix) are still read as they are until ``rotate-kek`` encrypts them.

Errors::

    SecretEncryptionError
     ├── KeyringError            a KEK is not 32 bytes of base64url
     └── SecretDecryptionError   a value's KEK is not configured, or it was tampered with
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Text, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.types import TypeDecorator

from gateway.settings import Settings

PREFIX = "enc:v1:"
_NONCE_BYTES = 12

#: The columns that hold secrets: (table, column).
SECRET_COLUMNS: tuple[tuple[str, str], ...] = (
    ("oauth_tokens", "access_token"),
    ("subscribers", "secret"),
    ("signing_keys", "private_key"),
)


class SecretEncryptionError(Exception):
    """Base of the errors of secrets at rest."""


class KeyringError(SecretEncryptionError):
    """A key encryption key is not 32 bytes of base64url."""


class SecretDecryptionError(SecretEncryptionError):
    """A stored secret cannot be decrypted: its KEK is not configured, or it was altered."""


def _b64d(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _b64e(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def new_kek() -> str:
    """A new key encryption key: 32 random bytes, base64url (with padding, like Fernet)."""
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode()


def kek_id(kek: bytes) -> str:
    """The id stored with values wrapped by ``kek``: 8 hex digits of its SHA-256."""
    return hashlib.sha256(kek).hexdigest()[:8]


def parse_kek(value: str) -> bytes:
    """The 32 bytes of a base64url KEK.

    Raises:
        KeyringError: not base64url, or not 32 bytes.
    """
    try:
        raw = _b64d(value.strip())
    except (ValueError, TypeError) as exc:
        raise KeyringError("the key encryption key is not base64url") from exc
    if len(raw) != 32:
        raise KeyringError("the key encryption key must be 32 bytes (base64url)")
    return raw


class Keyring:
    """The current KEK (encrypts) and earlier ones (still decrypt), by id.

    Args:
        current: the KEK new values are wrapped with (base64url).
        previous: earlier KEKs whose values are still readable (base64url), during a
            rotation.

    Raises:
        KeyringError: a KEK is malformed.
    """

    def __init__(self, current: str, previous: Sequence[str] = ()) -> None:
        self._current = parse_kek(current)
        self.current_id = kek_id(self._current)
        self._keys = {kek_id(k): k for k in (parse_kek(p) for p in previous if p.strip())}
        self._keys[self.current_id] = self._current
        self.current_text = current.strip()

    def encrypt(self, plaintext: str, *, context: str) -> str:
        """``plaintext`` sealed under a new DEK wrapped with the current KEK.

        Args:
            plaintext: the secret (UTF-8 text).
            context: associated data bound to the ciphertext (the column name).
        """
        dek = AESGCM.generate_key(bit_length=256)
        dek_nonce, value_nonce = os.urandom(_NONCE_BYTES), os.urandom(_NONCE_BYTES)
        wrapped = AESGCM(self._current).encrypt(dek_nonce, dek, self.current_id.encode())
        sealed = AESGCM(dek).encrypt(value_nonce, plaintext.encode(), context.encode())
        return (
            f"{PREFIX}{self.current_id}:{_b64e(dek_nonce + wrapped)}:{_b64e(value_nonce + sealed)}"
        )

    def decrypt(self, stored: str, *, context: str) -> str:
        """The plaintext of a value :meth:`encrypt` produced.

        Raises:
            SecretDecryptionError: malformed, wrapped by a KEK not in the ring, or altered.
        """
        try:
            key_id, wrapped_b64, sealed_b64 = stored[len(PREFIX) :].split(":")
            wrapped, sealed = _b64d(wrapped_b64), _b64d(sealed_b64)
        except ValueError as exc:
            raise SecretDecryptionError(f"a stored {context} value is malformed") from exc
        kek = self._keys.get(key_id)
        if kek is None:
            raise SecretDecryptionError(
                f"a stored {context} value was encrypted with key {key_id}, which is not "
                "configured (GATEWAY_KEY_ENCRYPTION_KEY or ..._PREVIOUS)"
            )
        try:
            dek = AESGCM(kek).decrypt(
                wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], key_id.encode()
            )
            return (
                AESGCM(dek)
                .decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], context.encode())
                .decode()
            )
        except InvalidTag as exc:
            raise SecretDecryptionError(
                f"a stored {context} value fails its integrity check"
            ) from exc

    def is_current(self, stored: str) -> bool:
        """True if ``stored`` is encrypted under the current KEK."""
        return stored.startswith(f"{PREFIX}{self.current_id}:")


def keyring_from_settings(current: str | None, previous: str | None) -> Keyring | None:
    """The keyring of ``GATEWAY_KEY_ENCRYPTION_KEY`` and ``..._PREVIOUS`` (comma-separated),
    or None without a current KEK.

    Raises:
        KeyringError: a KEK is malformed.
    """
    if not current:
        return None
    return Keyring(current, (previous or "").split(","))


def keyring_for(settings: Settings) -> Keyring | None:
    """The keyring of ``settings`` (``GATEWAY_KEY_ENCRYPTION_KEY`` and ``..._PREVIOUS``).

    Raises:
        KeyringError: a KEK is malformed.
    """
    current, previous = settings.key_encryption_key, settings.key_encryption_key_previous
    return keyring_from_settings(
        current.get_secret_value() if current else None,
        previous.get_secret_value() if previous else None,
    )


def attach_keyring(engine: AsyncEngine, keyring: Keyring | None) -> None:
    """Encrypt and decrypt the secret columns of ``engine`` with ``keyring`` (None:
    plaintext is written, encrypted values cannot be read)."""
    engine.sync_engine.dialect.gateway_keyring = keyring  # type: ignore[attr-defined]


def engine_keyring(engine: AsyncEngine) -> Keyring | None:
    """The keyring :func:`attach_keyring` gave ``engine``."""
    return getattr(engine.sync_engine.dialect, "gateway_keyring", None)


def session_keyring(session: AsyncSession) -> Keyring | None:
    """The keyring of the engine ``session`` is bound to."""
    return getattr(session.get_bind().dialect, "gateway_keyring", None)


class EncryptedText(TypeDecorator[str]):
    """A text column holding a secret, envelope-encrypted with the engine's keyring.

    Args:
        context: the associated data (``table.column``) the ciphertext is bound to.
    """

    impl = Text
    cache_ok = True

    def __init__(self, context: str) -> None:
        super().__init__()
        self.context = context

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        keyring: Keyring | None = getattr(dialect, "gateway_keyring", None)
        if value is None or keyring is None:
            return value
        return keyring.encrypt(value, context=self.context)

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if value is None or not str(value).startswith(PREFIX):
            return value  # type: ignore[no-any-return]  # plaintext (legacy or dev)
        keyring: Keyring | None = getattr(dialect, "gateway_keyring", None)
        if keyring is None:
            raise SecretDecryptionError(
                f"{self.context} is encrypted and GATEWAY_KEY_ENCRYPTION_KEY is not set"
            )
        return keyring.decrypt(str(value), context=self.context)


async def secret_counts(
    session: AsyncSession, *, keyring: Keyring | None
) -> dict[str, dict[str, int]]:
    """Per secret column (``table.column``): how many values are ``plaintext``, under the
    ``current`` KEK, under an ``older`` one, and ``legacy`` (Fernet-encrypted private keys
    of earlier releases). Reads the raw column text (no decryption)."""
    current = f"{PREFIX}{keyring.current_id}:%" if keyring else None
    out: dict[str, dict[str, int]] = {}
    for table, column in SECRET_COLUMNS:
        legacy = "encrypted = true" if table == "signing_keys" else "1 = 0"
        row = (
            await session.execute(
                text(
                    f"SELECT "  # noqa: S608 - table and column names are constants
                    f"SUM(CASE WHEN {column} NOT LIKE 'enc:v1:%' AND NOT ({legacy}) THEN 1 ELSE 0 END), "
                    f"SUM(CASE WHEN {column} NOT LIKE 'enc:v1:%' AND ({legacy}) THEN 1 ELSE 0 END), "
                    f"SUM(CASE WHEN {column} LIKE :current THEN 1 ELSE 0 END), "
                    f"SUM(CASE WHEN {column} LIKE 'enc:v1:%' THEN 1 ELSE 0 END) "
                    f"FROM {table} WHERE {column} IS NOT NULL"
                ),
                {"current": current or "-"},
            )
        ).one()
        plain, legacy_n, cur, enc = (int(v or 0) for v in row)
        out[f"{table}.{column}"] = {
            "plaintext": plain,
            "legacy": legacy_n,
            "current": cur,
            "older": enc - cur,
        }
    return out


def file_too_open(path: Path) -> bool:
    """True if ``path`` exists and its group or others have any permission on it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(stat.S_IMODE(mode) & 0o077)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist, and take group and
    others' permissions away if it does (files that hold PHI or secrets: the SQLite
    database, ``.env``, key files)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        if file_too_open(path):
            os.chmod(path, 0o600)
        return
    os.close(fd)


async def startup_problems(settings: Settings, engine: AsyncEngine) -> list[str]:
    """Why a production process must not start (empty when it may, and always outside
    ``GATEWAY_ENV=production``): no key encryption key, secrets stored in plaintext, or a
    file holding secrets or PHI (the SQLite database, ``.env``, the secret env file) that
    group or others may read. Messages name the fix, never a secret."""
    if settings.env != "production":
        return []
    problems: list[str] = []
    keyring = engine_keyring(engine)
    if keyring is None:
        problems.append(
            "GATEWAY_KEY_ENCRYPTION_KEY is not set (`fhir-gateway keys encryption-key` makes one)"
        )
    async with AsyncSession(engine) as session:
        counts = await secret_counts(session, keyring=keyring)
    for column, count in counts.items():
        if count["plaintext"]:
            problems.append(
                f"{count['plaintext']} secret(s) in {column} are stored in plaintext "
                "(run `fhir-gateway keys rotate-kek`)"
            )
    files = [Path(".env")]
    if settings.secret_env_file is not None:
        files.append(settings.secret_env_file)
    if settings.is_sqlite:
        from sqlalchemy.engine import make_url

        database = make_url(settings.database_url).database
        if database and database != ":memory:":
            files.append(Path(database))
    for path in files:
        if file_too_open(path):
            problems.append(f"{path} may be read by group or others (chmod 600 {path})")
    return problems
