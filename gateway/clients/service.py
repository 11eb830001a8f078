"""Creating API clients and authenticating requests with their keys.

A key looks like ``fgw_<key id>_<secret>``. Only SHA-256 of the whole key is stored (the
key has 256 bits of randomness, so a slow password hash adds nothing); the key id finds
the row, and the hash is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import AccessToken, ApiClient
from gateway.db.types import utcnow

#: Every scope a route checks. ``ops:admin`` implies ``ops:read``.
SCOPES = {
    "intake:write": "submit intake (POST /v1/intake-submissions)",
    "checkout:write": "submit canonical checkouts (POST /v1/checkouts)",
    "events:write": "send clinical events (POST /v1/events)",
    "hl7:write": "send HL7 v2 messages over HTTP (POST /v1/hl7v2)",
    "fhir:read": "read FHIR resources (GET /fhir/...)",
    "cases:read": "read cases (GET /v1/cases)",
    "profiles:write": "preview and reload profiles",
    "ops:read": "read deliveries, targets, exceptions",
    "ops:admin": "replay deliveries, resolve exceptions, manage subscribers",
    "audit:read": "search the audit trail (GET /fhir/AuditEvent)",
}

_IMPLIED = {"ops:admin": {"ops:read"}}


#: Scopes whose routes show every program's data (exceptions with their payloads,
#: deliveries): a client limited to programs may not hold them.
UNSCOPED_SCOPES = frozenset({"ops:read", "ops:admin"})


def scopes_granting(scope: str) -> frozenset[str]:
    """Every scope that grants ``scope``: itself and the scopes implying it
    (``"ops:read"`` -> ``{"ops:read", "ops:admin"}``)."""
    return frozenset({scope} | {s for s, implied in _IMPLIED.items() if scope in implied})


class UnknownScopeError(ValueError):
    """A scope that no route checks."""


class ClientLimitError(ValueError):
    """A client limited to programs asked for a scope whose routes see every program."""


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    client_id: int
    name: str
    scopes: frozenset[str]
    event_sources: frozenset[str] | None = None
    partners: frozenset[str] | None = None
    programs: frozenset[str] | None = None
    #: The FHIR resource types ``fhir:read`` opens (a SMART token's ``system/<Type>.rs``
    #: scopes); None: every type.
    resource_types: frozenset[str] | None = None
    #: When the credential stops working (an access token's expiry); None: an API key.
    expires_at: datetime | None = None

    def reads_type(self, resource_type: str) -> bool:
        """True if the caller may read FHIR resources of ``resource_type``."""
        return self.resource_types is None or resource_type in self.resource_types

    @property
    def label(self) -> str:
        """How the caller is recorded as a message's or event's principal:
        ``client:<name>``."""
        return f"client:{self.name}"

    def may_send_as_partner(self, partner: str) -> bool:
        """True if the caller may send HL7 v2 messages as partner profile ``partner``; a
        client created without ``--partner`` may send as any."""
        return self.partners is None or partner in self.partners

    def sees_program(self, program: str | None) -> bool:
        """True if the caller may see data of ``program`` (None: data of no program, which
        a limited client does not see); a client created without ``--program`` sees
        all."""
        return self.programs is None or (program is not None and program in self.programs)

    def may_send_as(self, source: str) -> bool:
        """True if the caller may send clinical events as ``source`` (a sender of the
        workflow's ownership matrix); a client created without ``--event-source`` may
        send as any."""
        return self.event_sources is None or source in self.event_sources

    def has(self, scope: str) -> bool:
        """True if the caller holds ``scope`` (directly or implied); a client limited to
        programs never holds one of :data:`UNSCOPED_SCOPES` (creation refuses it; a row
        changed by hand does not get it either)."""
        if self.programs is not None and scope in UNSCOPED_SCOPES:
            return False
        if scope in self.scopes:
            return True
        return any(scope in _IMPLIED.get(s, ()) for s in self.scopes)


def hash_key(key: str) -> str:
    """Hex SHA-256 of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


async def create_client(
    session: AsyncSession,
    *,
    name: str,
    scopes: list[str],
    event_sources: list[str] | None = None,
    partners: list[str] | None = None,
    programs: list[str] | None = None,
    jwks: dict[str, Any] | None = None,
    jwks_url: str | None = None,
) -> tuple[ApiClient, str]:
    """Create a client and return it with its new key (shown once, never stored).

    Args:
        event_sources: the senders (``ehr``, ``pharmacy``...) this client may send
            clinical events as on ``POST /v1/events``; None: any.
        partners: the partner profiles (names) this client may send HL7 v2 messages as
            on ``POST /v1/hl7v2`` (MSH-4 and MSH-3 must be theirs); None: any.
        programs: the programs whose cases, resources and messages this client sees;
            None: all.
        jwks: a SMART Backend Services client's public keys (a JWK Set), or
        jwks_url: where it publishes them: either lets it get tokens at
            ``POST /oauth/token`` (:mod:`gateway.oauth.server`); it keeps its API key.

    Raises:
        UnknownScopeError: a scope is not in :data:`SCOPES`.
        ClientLimitError: ``programs`` with a scope of :data:`UNSCOPED_SCOPES`.
    """
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise UnknownScopeError(
            f"unknown scope(s): {', '.join(unknown)}; known: {', '.join(SCOPES)}"
        )
    if programs is not None and set(scopes) & UNSCOPED_SCOPES:
        raise ClientLimitError(
            f"a client limited to programs cannot hold {', '.join(sorted(UNSCOPED_SCOPES))}: "
            "those routes show every program's data"
        )
    key_id = secrets.token_hex(6)
    key = f"fgw_{key_id}_{secrets.token_urlsafe(32)}"
    client = ApiClient(
        name=name,
        key_id=key_id,
        key_hash=hash_key(key),
        scopes=sorted(set(scopes)),
        event_sources=sorted(set(event_sources)) if event_sources is not None else None,
        partners=sorted(set(partners)) if partners is not None else None,
        programs=sorted(set(programs)) if programs is not None else None,
        jwks=jwks,
        jwks_url=jwks_url,
    )
    session.add(client)
    await session.flush()
    return client, key


async def authenticate(session: AsyncSession, *, key: str) -> Principal | None:
    """The principal for ``key`` (an API key ``fgw_...``, or an access token ``fgt_...``
    that ``POST /oauth/token`` issued and that has not expired), or None when it is
    unknown, malformed, expired or its client revoked."""
    parts = key.split("_")
    if len(parts) < 3 or parts[0] not in ("fgw", "fgt"):
        return None
    if parts[0] == "fgt":
        return await _token_principal(session, token_id=parts[1], key=key)
    row = await session.scalar(select(ApiClient).where(ApiClient.key_id == parts[1]))
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.key_hash, hash_key(key)):
        return None
    return _principal(row)


async def _token_principal(session: AsyncSession, *, token_id: str, key: str) -> Principal | None:
    token = await session.get(AccessToken, token_id)
    if token is None or token.expires_at <= utcnow():
        return None
    if not hmac.compare_digest(token.token_hash, hash_key(key)):
        return None
    row = await session.get(ApiClient, token.client_id)
    if row is None or row.revoked_at is not None:
        return None
    principal = _principal(row)
    return Principal(
        client_id=principal.client_id,
        name=principal.name,
        scopes=frozenset(token.scopes) & principal.scopes,
        event_sources=principal.event_sources,
        partners=principal.partners,
        programs=principal.programs,
        resource_types=(
            frozenset(token.resource_types) if token.resource_types is not None else None
        ),
        expires_at=token.expires_at,
    )


def _principal(row: ApiClient) -> Principal:
    return Principal(
        client_id=row.id,
        name=row.name,
        scopes=frozenset(row.scopes),
        event_sources=frozenset(row.event_sources) if row.event_sources is not None else None,
        partners=frozenset(row.partners) if row.partners is not None else None,
        programs=frozenset(row.programs) if row.programs is not None else None,
    )


async def touch_client(
    session: AsyncSession, *, client_id: int, now: datetime, every: timedelta
) -> None:
    """Set the client's ``last_used_at`` to ``now`` unless it is already within ``every``
    of it (a write that changes no row when another process just did it)."""
    await session.execute(
        update(ApiClient)
        .where(
            ApiClient.id == client_id,
            or_(ApiClient.last_used_at.is_(None), ApiClient.last_used_at < now - every),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )


async def revoke_client(session: AsyncSession, *, name: str) -> bool:
    """Revoke a client's key; False when no such client."""
    row = await session.scalar(select(ApiClient).where(ApiClient.name == name))
    if row is None:
        return False
    row.revoked_at = utcnow()
    return True
