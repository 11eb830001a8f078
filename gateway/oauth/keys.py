"""Signing keys for SMART Backend Services client assertions, and the JWKS that publishes
their public halves (https://hl7.org/fhir/smart-app-launch/backend-services.html,
"Registering a SMART Backend Service"; JWKS: RFC 7517 section 5).

Two sources:

* a key file named by a target (``auth.private_key_file``: PEM, or a JWK as JSON), whose
  ``kid`` is the profile's ``auth.kid``, else the JWK's ``kid``, else its RFC 7638
  thumbprint;
* the gateway's own keys (table ``signing_keys``), one active key per ``alg`` at a time,
  rotated with ``fhir-gateway keys rotate``:

  1. the new key is published at once and starts signing ``publish_lead`` later (EHRs
     cache JWKS: the lead must exceed their cache time and our ``Cache-Control``);
  2. when it starts signing the old key stops (``retired_at``) and stays published for
     ``retire_grace`` more, longer than the 5-minute life of the last assertion it
     signed, so no assertion is ever checked against a JWKS that lacks its key;
  3. ``fhir-gateway keys prune`` deletes keys no longer published.

Private keys are stored as PEM in an envelope-encrypted column (``GATEWAY_KEY_ENCRYPTION_KEY``,
:mod:`gateway.db.encryption`); keys of earlier releases stored as Fernet tokens of the
PEM (``encrypted``) are still read until ``fhir-gateway keys rotate-kek`` re-encrypts
them. Nothing here logs key material.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import SigningKey
from gateway.oauth import repository as repo

Alg = Literal["RS384", "ES384"]
SigningJwk = RSAKey | ECKey

#: SMART: the assertion's ``exp`` is at most 5 minutes after ``iat``.
ASSERTION_LIFETIME = timedelta(minutes=5)
KEY_TYPE: dict[str, Literal["RSA", "EC"]] = {"RS384": "RSA", "ES384": "EC"}


class SigningKeyError(Exception):
    """Base of signing-key errors."""


class KeyFileError(SigningKeyError):
    """A key file is missing, unreadable, or not a private key of the expected type."""


class NoSigningKeyError(SigningKeyError):
    """The gateway has no active signing key for an ``alg`` (run ``keys rotate``)."""


class RotationPendingError(SigningKeyError):
    """A rotation is already waiting for its key to activate."""


class KeyDecryptionError(SigningKeyError):
    """A stored private key cannot be decrypted (missing or wrong encryption key)."""


@dataclass(frozen=True)
class SigningMaterial:
    """A private key ready to sign: the joserfc key, its ``kid`` and ``alg``."""

    key: SigningJwk
    kid: str
    alg: Alg


def public_jwk(key: SigningJwk, *, kid: str, alg: str) -> dict[str, Any]:
    """The public JWK of ``key`` with ``kid``, ``alg``, ``use=sig`` (no private members)."""
    jwk: dict[str, Any] = dict(key.as_dict(private=False))
    jwk.update({"kid": kid, "alg": alg, "use": "sig", "key_ops": ["verify"]})
    return jwk


def _check_alg(key: SigningJwk, alg: str) -> None:
    if alg == "ES384" and (not isinstance(key, ECKey) or key.curve_name != "P-384"):
        raise KeyFileError("ES384 needs a P-384 EC key")
    if alg == "RS384" and not isinstance(key, RSAKey):
        raise KeyFileError("RS384 needs an RSA key")
    if not key.is_private:
        raise KeyFileError("the key file holds a public key; a private key is needed")


def parse_private_key(data: bytes, *, alg: Alg, kid: str | None = None) -> SigningMaterial:
    """A PEM or JWK (JSON) private key -> :class:`SigningMaterial`.

    Raises:
        KeyFileError: not a private key of the type ``alg`` needs.
    """
    key_type = KEY_TYPE[alg]
    text = data.strip()
    jwk_kid: str | None = None
    try:
        if text.startswith(b"{"):
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise KeyFileError("the JWK file is not a JSON object")
            jwk_kid = obj.get("kid") if isinstance(obj.get("kid"), str) else None
            key: Any = (RSAKey if key_type == "RSA" else ECKey).import_key(obj)
        else:
            key = (RSAKey if key_type == "RSA" else ECKey).import_key(text)
    except (JoseError, ValueError, TypeError) as exc:
        raise KeyFileError(f"not a {key_type} private key in PEM or JWK form") from exc
    _check_alg(key, alg)
    return SigningMaterial(key, kid or jwk_kid or key.thumbprint(), alg)


_file_cache: dict[tuple[str, str, str | None], tuple[float, SigningMaterial]] = {}


def load_key_file(path: Path, *, alg: Alg, kid: str | None = None) -> SigningMaterial:
    """Read a key file (cached until its modification time changes).

    Raises:
        KeyFileError: missing, unreadable or not a fitting private key.
    """
    cache_key = (str(path), alg, kid)
    try:
        mtime = os.stat(path).st_mtime
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path.name}") from exc
    cached = _file_cache.get(cache_key)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path.name}") from exc
    material = parse_private_key(data, alg=alg, kid=kid)
    _file_cache[cache_key] = (mtime, material)
    return material


def generate_key(alg: Alg, *, rsa_bits: int = 2048) -> SigningMaterial:
    """A new private key for ``alg`` (RSA ``rsa_bits`` for RS384, P-384 for ES384), its
    ``kid`` the RFC 7638 thumbprint."""
    key: SigningJwk = (
        RSAKey.generate_key(rsa_bits, private=True)
        if alg == "RS384"
        else ECKey.generate_key("P-384", private=True)
    )
    return SigningMaterial(key, key.thumbprint(), alg)


class KeyCipher:
    """Reads stored private keys: the PEM (the column's envelope encryption is the
    database engine's, :mod:`gateway.db.encryption`), or a legacy Fernet token of it.

    Args:
        encryption_key: the key encryption key (it also opened the legacy Fernet
            tokens), or None.
        previous: earlier key encryption keys, for legacy tokens.
    """

    def __init__(self, encryption_key: str | None, previous: Sequence[str] = ()) -> None:
        keys = [k for k in (encryption_key, *previous) if k]
        self._fernet = MultiFernet([Fernet(k.strip().encode()) for k in keys]) if keys else None

    @property
    def encrypts(self) -> bool:
        """True when private keys are encrypted at rest (a key encryption key is set)."""
        return self._fernet is not None

    def seal(self, pem: bytes) -> tuple[str, bool]:
        """``(stored text, legacy-encrypted)`` for a PEM private key: the PEM, which the
        column encrypts when it is written."""
        return pem.decode(), False

    def open(self, row: SigningKey) -> bytes:
        """The PEM of a stored key.

        Raises:
            KeyDecryptionError: encrypted, and no or the wrong encryption key is configured.
        """
        if not row.encrypted:
            return row.private_key.encode()
        if self._fernet is None:
            raise KeyDecryptionError(
                f"signing key {row.kid} is encrypted and GATEWAY_KEY_ENCRYPTION_KEY is not set"
            )
        try:
            return self._fernet.decrypt(row.private_key.encode())
        except InvalidToken as exc:
            raise KeyDecryptionError(
                f"signing key {row.kid} cannot be decrypted with GATEWAY_KEY_ENCRYPTION_KEY"
            ) from exc


@dataclass(frozen=True)
class Rotation:
    """What ``keys rotate`` did: the new key, and the key it replaces (if any)."""

    new: SigningKey
    replaced: SigningKey | None


async def rotate(
    session: AsyncSession,
    *,
    alg: Alg,
    now: datetime,
    publish_lead: timedelta,
    retire_grace: timedelta,
    cipher: KeyCipher,
    rsa_bits: int = 2048,
    force: bool = False,
) -> Rotation:
    """Create a new signing key for ``alg`` and schedule the switch to it. Flushes.

    The first key of an ``alg`` signs at once. Otherwise the new key signs from
    ``now + publish_lead``, when the current one retires; the current one stays in the
    JWKS until ``retire_grace`` after that.

    Raises:
        RotationPendingError: a new key is already waiting to activate (``force`` replaces
            that waiting key instead).
        ValueError: ``retire_grace`` is shorter than an assertion's lifetime (5 minutes).
    """
    if retire_grace < ASSERTION_LIFETIME:
        raise ValueError("retire_grace must be at least 5 minutes (the assertion lifetime)")
    pending = await repo.pending_keys(session, alg=alg, now=now)
    if pending and not force:
        raise RotationPendingError(
            f"key {pending[0].kid} activates at {pending[0].activates_at.isoformat()}; "
            "use --force to replace it"
        )
    for row in pending:
        await session.delete(row)
    current = await repo.active_key(session, alg=alg, now=now)
    material = generate_key(alg, rsa_bits=rsa_bits)
    stored, encrypted = cipher.seal(material.key.as_pem(private=True))
    activates_at = now if current is None else now + publish_lead
    new = SigningKey(
        kid=material.kid,
        alg=alg,
        private_key=stored,
        encrypted=encrypted,
        public_jwk=public_jwk(material.key, kid=material.kid, alg=alg),
        created_at=now,
        activates_at=activates_at,
    )
    session.add(new)
    if current is not None:
        current.retired_at = activates_at
        current.published_until = activates_at + retire_grace
    await session.flush()
    return Rotation(new, current)


async def signing_material(
    session: AsyncSession, *, alg: Alg, now: datetime, cipher: KeyCipher
) -> SigningMaterial:
    """The gateway key that signs ``alg`` assertions at ``now``.

    Raises:
        NoSigningKeyError: none is active (run ``fhir-gateway keys rotate``).
        KeyDecryptionError: it cannot be decrypted.
    """
    row = await repo.active_key(session, alg=alg, now=now)
    if row is None:
        raise NoSigningKeyError(
            f"the gateway has no active {alg} signing key (run `fhir-gateway keys rotate "
            f"--alg {alg}`)"
        )
    key_type = KEY_TYPE[alg]
    pem = cipher.open(row)
    key = (RSAKey if key_type == "RSA" else ECKey).import_key(pem)
    return SigningMaterial(key, row.kid, alg)


async def published_jwks(session: AsyncSession, *, now: datetime) -> list[dict[str, Any]]:
    """Public JWKs of the gateway keys published at ``now`` (pending, active, retiring)."""
    return [dict(row.public_jwk) for row in await repo.published_keys(session, now=now)]
