"""Verifying partner webhook signatures.

* Standard Webhooks (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md):
  verified with the ``standardwebhooks`` reference library. Its quirks are handled here:
  the signature header is a space-separated list (secret rotation), and the library
  raises ``binascii.Error`` / ``ValueError`` on a malformed entry *before* trying the
  valid ones, so malformed entries are dropped first; its tolerance is a fixed 5 minutes,
  so a narrower profile tolerance is checked here too. The HMAC key is the base64-decoded
  ``whsec_`` secret (the library does that).
* HMAC-SHA256 over the raw body (or ``<timestamp>.<body>``), keyed with the UTF-8 secret,
  hex or base64 in a named header, compared in constant time.

Always over the raw body bytes: re-serialized JSON does not verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from mappers.profiles import SignatureSpec


class SignatureError(Exception):
    """The webhook's signature does not verify; ``reason`` is ``missing``, ``invalid`` or
    ``stale`` (timestamp outside the tolerance)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def usable_secret(spec: SignatureSpec, secret: str) -> bool:
    """True if ``secret`` can sign for ``spec`` (a Standard Webhooks secret must be
    ``whsec_`` + base64 of at least 24 bytes)."""
    if spec.scheme != "standard-webhooks":
        return bool(secret)
    if not secret.startswith("whsec_"):
        return False
    try:
        return len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24
    except (binascii.Error, ValueError):
        return False


def _well_formed_v1(entry: str) -> bool:
    version, sep, signature = entry.partition(",")
    if not sep or version != "v1" or not signature:
        return False
    try:
        base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _check_timestamp(value: str, tolerance_s: float, now: float) -> None:
    if not value.strip().isdigit():
        raise SignatureError("invalid", "the timestamp header is not Unix seconds")
    if abs(now - int(value)) > tolerance_s:
        raise SignatureError("stale", "the timestamp is outside the tolerance")


def verify_signature(
    spec: SignatureSpec,
    *,
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    now: float | None = None,
) -> None:
    """Verify a partner webhook.

    Args:
        spec: the partner's signature block.
        secret: the signing secret (``whsec_...`` for Standard Webhooks).
        body: the raw request body.
        headers: the request headers (any case).
        now: Unix time (tests).

    Raises:
        SignatureError: missing headers, no matching signature, or a stale timestamp.
    """
    now = time.time() if now is None else now
    h = {k.lower(): v for k, v in headers.items()}
    tolerance_s = spec.tolerance.total_seconds()
    if spec.scheme == "standard-webhooks":
        msg_id = h.get("webhook-id", "")
        timestamp = h.get("webhook-timestamp", "")
        signatures = h.get("webhook-signature", "")
        if not (msg_id and timestamp and signatures):
            raise SignatureError(
                "missing", "webhook-id, webhook-timestamp and webhook-signature are required"
            )
        _check_timestamp(timestamp, tolerance_s, now)
        entries = [e for e in signatures.split(" ") if _well_formed_v1(e)]
        if not entries:
            raise SignatureError("invalid", "no well-formed v1 signature")
        try:
            Webhook(secret).verify(
                body,
                {
                    "webhook-id": msg_id,
                    "webhook-timestamp": timestamp,
                    "webhook-signature": " ".join(entries),
                },
                json_parse=False,
            )
        except WebhookVerificationError as exc:
            reason = "stale" if "timestamp" in str(exc).lower() else "invalid"
            raise SignatureError(reason, "no signature matches") from exc
        except (UnicodeDecodeError, binascii.Error, ValueError) as exc:
            raise SignatureError("invalid", "the signature cannot be checked") from exc
        return
    assert spec.header is not None
    given = h.get(spec.header.lower(), "").strip()
    if not given:
        raise SignatureError("missing", f"the {spec.header} header is required")
    signed = body
    if spec.timestamp_header:
        timestamp = h.get(spec.timestamp_header.lower(), "")
        if not timestamp:
            raise SignatureError("missing", f"the {spec.timestamp_header} header is required")
        _check_timestamp(timestamp, tolerance_s, now)
        signed = timestamp.strip().encode() + b"." + body
    if spec.prefix and given.startswith(spec.prefix):
        given = given[len(spec.prefix) :]
    try:
        candidate = (
            bytes.fromhex(given)
            if spec.encoding == "hex"
            else base64.b64decode(given, validate=True)
        )
    except (ValueError, binascii.Error) as exc:
        raise SignatureError("invalid", "the signature is not valid hex/base64") from exc
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, candidate):
        raise SignatureError("invalid", "the signature does not match")
