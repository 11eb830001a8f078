"""The tables of identity: the credentials the gateway holds and issues, and the
patient merge-review queue. Re-exported by :mod:`gateway.db.models`.

* ``oauth_tokens``: each EHR target's access token (encrypted at rest);
* ``signing_keys``: the keys the gateway signs SMART client assertions with;
* ``access_tokens`` and ``assertion_jtis``: tokens the gateway issues to SMART Backend
  Services clients (hashed), and the client assertion ``jti`` values seen (replay
  protection; migration ``0014_fhir_face``);
* ``patient_reviews``: probable duplicate Patients waiting for a person's decision;
* ``patient_review_features``: what duplicate review compares of each stored Patient
  (migration ``0021_patient_review_features``);
* ``staff_users`` and ``staff_sessions``: the people who sign in to the ops console and
  their server-side sessions (migration ``0013_console``).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Executable,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.base import Base
from gateway.db.encryption import EncryptedText
from gateway.db.types import BigIntPK, JSONDoc, utcnow
from mappers.patient_match import features

# --------------------------------------------------------------------------- EHR credentials


class OAuthToken(Base):
    """The access token of one target, shared by every worker process.

    The row is also the target's auth circuit: while ``next_attempt_at`` is in the future
    after a failure, nobody calls the token endpoint and the target's deliveries wait.
    ``error_kind`` is ``unavailable`` (timeouts, 5xx, 429) or ``config`` (credentials
    refused, or a fresh token refused by the FHIR server).
    """

    __tablename__ = "oauth_tokens"

    target: Mapped[str] = mapped_column(String(128), primary_key=True)
    # Envelope-encrypted with the key encryption key (gateway.db.encryption).
    access_token: Mapped[str | None] = mapped_column(EncryptedText("oauth_tokens.access_token"))
    token_type: Mapped[str | None] = mapped_column(String(32))
    scope: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime | None]
    refreshed_at: Mapped[datetime | None]
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    error_kind: Mapped[str | None] = mapped_column(String(16))
    signed_with_kid: Mapped[str | None] = mapped_column(String(128))
    refresh_lease_until: Mapped[datetime | None]  # SQLite: who refreshes (no row locks)


class SigningKey(Base):
    """A key the gateway signs SMART client assertions with (``private_key_jwt``).

    Rotation (``fhir-gateway keys rotate``): a new key is published in the JWKS from
    ``created_at`` and signs from ``activates_at``; the key it replaces stops signing then
    (``retired_at``) and stays published until ``published_until``, after the last
    assertion it signed has expired. ``private_key`` is PEM, or a Fernet token of the PEM
    when ``encrypted`` (``GATEWAY_KEY_ENCRYPTION_KEY``).
    """

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(128), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    private_key: Mapped[str] = mapped_column(EncryptedText("signing_keys.private_key"))
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    public_jwk: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activates_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]
    published_until: Mapped[datetime | None]

    __table_args__ = (Index("ix_signing_keys_alg", "alg", "activates_at"),)


# --------------------------------------------------------------------------- SMART tokens


class AccessToken(Base):
    """An access token the gateway issued (``POST /oauth/token``): only SHA-256 of the
    token is kept, with the client, the gateway scopes and FHIR types it grants, and
    when it expires."""

    __tablename__ = "access_tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("api_clients.id"), index=True)
    scopes: Mapped[list[str]] = mapped_column(JSONDoc)
    resource_types: Mapped[list[str] | None] = mapped_column(JSONDoc, nullable=True)
    granted: Mapped[str] = mapped_column(Text)  # the scope string answered
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]


class AssertionJti(Base):
    """A client assertion's ``jti`` seen, until the assertion expires: a second use is
    refused (SMART Backend Services, replay protection)."""

    __tablename__ = "assertion_jtis"

    client_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    jti: Mapped[str] = mapped_column(String(256), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


# --------------------------------------------------------------------------- merge review


class ReviewStatus(StrEnum):
    """A probable duplicate's review: open until a person accepts or rejects it; linked
    when the score was above the link threshold (merged without review)."""

    OPEN = "open"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    LINKED = "linked"


class PatientReview(Base):
    """Two Patients that are probably the same person, with the score and its parts
    (:mod:`gateway.patients.review`): a merge-review queue entry."""

    __tablename__ = "patient_reviews"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)  # the newer record
    candidate_id: Mapped[str] = mapped_column(String(64), index=True)  # the one it resembles
    score: Mapped[float] = mapped_column(Float)
    parts: Mapped[dict[str, Any]]  # element -> its score (no values)
    status: Mapped[str] = mapped_column(String(16), default=ReviewStatus.OPEN)
    reason: Mapped[str | None] = mapped_column(Text)
    decided_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("patient_id", "candidate_id", name="uq_patient_reviews_pair"),
        Index("ix_patient_reviews_status", "status"),
    )


class PatientFeatures(Base):
    """What duplicate review compares of one stored Patient (:mod:`mappers.patient_match`):
    a row per Patient that has a name and a birth date, written with the Patient
    (:func:`gateway.fhir.repository.save_resource`), so that a new patient's candidates
    (those born on the same date or a typo of it) are read as a few short columns through
    ``ix_patient_review_features_birth_date`` rather than as whole resources decoded and
    normalized again for each. Values are normalized (names folded, phone digits, email
    case-folded); the resource in ``fhir_resources`` stays the record."""

    __tablename__ = "patient_review_features"

    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    birth_date: Mapped[str] = mapped_column(Text)  # Patient.birthDate as stored
    family: Mapped[str] = mapped_column(Text)
    given: Mapped[str] = mapped_column(Text)
    phone: Mapped[str | None] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    address_line: Mapped[str | None] = mapped_column(Text)  # None with postal_code: no address
    postal_code: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool]  # Patient.active is not false
    updated_at: Mapped[datetime]  # the Patient's, for "the most recently updated first"

    __table_args__ = (Index("ix_patient_review_features_birth_date", "birth_date"),)

    @staticmethod
    def upsert(dialect: str, *, newer_only: bool = False) -> Executable:
        """``INSERT`` of a row (parameters: its columns) that replaces the Patient's row
        if it has one (PostgreSQL or SQLite 3.24+ ``ON CONFLICT``). ``newer_only``: a
        row from a Patient version not older than the stored row's (``updated_at``), so
        a rebuild that read a Patient before a live write does not undo that write."""
        table = cast(Table, PatientFeatures.__table__)
        stmt = (pg_insert if dialect == "postgresql" else sqlite_insert)(table)
        return stmt.on_conflict_do_update(
            index_elements=["patient_id"],
            set_={c.key: getattr(stmt.excluded, c.key) for c in table.c if c.key != "patient_id"},
            where=(table.c.updated_at <= stmt.excluded.updated_at) if newer_only else None,
        )

    @staticmethod
    def row_of(patient: dict[str, Any], *, now: datetime) -> dict[str, Any] | None:
        """The row of a Patient resource (R4 JSON; :func:`mappers.patient_match.features`)
        stored at ``now``, as column values; None when it has no name or no birth date
        (duplicate review cannot score it)."""
        found = features(patient)
        if found.names is None or not found.birth_date:
            return None
        line, postal = found.address if found.address is not None else (None, None)
        return {
            "patient_id": patient["id"],
            "birth_date": found.birth_date,
            "family": found.names[0],
            "given": found.names[1],
            "phone": found.phone,
            "email": found.email,
            "address_line": line,
            "postal_code": postal,
            "active": patient.get("active") is not False,
            "updated_at": now,
        }


# --------------------------------------------------------------------------- staff


class StaffRole(StrEnum):
    """What a staff user may do on the console: ``viewer`` reads, ``operator`` also acts
    (assign, resolve, retry, replay, override, pause), ``admin`` also manages
    subscribers."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class StaffUser(Base):
    """A person who signs in to the ops console (not an API client): argon2id password
    hash, role, and whether the account may sign in."""

    __tablename__ = "staff_users"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(128))
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), default=StaffRole.VIEWER)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    password_changed_at: Mapped[datetime | None]
    last_login_at: Mapped[datetime | None]


class StaffSession(Base):
    """A signed-in console session, held server-side: the cookie carries a random token
    whose SHA-256 is the row's id; the CSRF token every form must send back; expiry by
    idle time (``last_seen_at``)."""

    __tablename__ = "staff_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the token
    staff_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("staff_users.id", ondelete="CASCADE"), index=True
    )
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    address: Mapped[str | None] = mapped_column(String(64))
