"""Unit tests of envelope encryption (gateway/db/encryption.py)."""

from __future__ import annotations

import base64

import pytest

from gateway.db.encryption import (
    Keyring,
    KeyringError,
    SecretDecryptionError,
    keyring_from_settings,
    new_kek,
)


def test_a_value_round_trips_and_each_encryption_differs() -> None:
    ring = Keyring(new_kek())
    one, two = (ring.encrypt("tok", context="t.c") for _ in range(2))
    assert one != two and one.startswith(f"enc:v1:{ring.current_id}:")
    assert ring.decrypt(one, context="t.c") == ring.decrypt(two, context="t.c") == "tok"
    assert ring.is_current(one)


def test_the_context_is_bound_and_previous_keys_still_read() -> None:
    old, new = new_kek(), new_kek()
    sealed = Keyring(old).encrypt("tok", context="t.c")
    with pytest.raises(SecretDecryptionError, match="integrity"):
        Keyring(old).decrypt(sealed, context="t.other")
    rotating = Keyring(new, [old])
    assert rotating.decrypt(sealed, context="t.c") == "tok" and not rotating.is_current(sealed)
    with pytest.raises(SecretDecryptionError, match="malformed"):
        rotating.decrypt("enc:v1:zz", context="t.c")


def test_keys_must_be_32_bytes_of_base64url() -> None:
    with pytest.raises(KeyringError):
        Keyring(base64.urlsafe_b64encode(b"short").decode())
    with pytest.raises(KeyringError):
        Keyring("not base64 !!")
    assert keyring_from_settings(None, None) is None
    ring = keyring_from_settings(new_kek(), f" ,{new_kek()}")
    assert ring is not None
