"""The gateway's tables (SQLAlchemy 2 declarative, async).

Every table works on SQLite (embedded default, one process) and PostgreSQL (production,
several API processes and workers). Schema changes go through Alembic migrations in
``gateway/migrations``; tests check that the models and the migrations agree.

Status vocabularies are :class:`enum.StrEnum` stored as short strings. The audit trail's
tables are in :mod:`gateway.db.audit_models` (re-exported here).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.audit_models import AuditChain as AuditChain
from gateway.db.audit_models import AuditEntry as AuditEntry
from gateway.db.base import NAMING_CONVENTION as NAMING_CONVENTION
from gateway.db.base import Base as Base
from gateway.db.encryption import EncryptedText
from gateway.db.types import BigIntPK, JSONDoc, utcnow

# --------------------------------------------------------------------------- clients


class ApiClient(Base):
    """A caller of the ``/v1`` API: an API key (stored as a SHA-256 hash) and its scopes."""

    __tablename__ = "api_clients"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSONDoc)
    # Senders this client may send clinical events as (POST /v1/events); NULL: any.
    event_sources: Mapped[list[str] | None] = mapped_column(JSONDoc, nullable=True)
    # HL7 v2 partners this client may send as (POST /v1/hl7v2, MSH-4/MSH-3); NULL: any.
    # Migration 0012_sec_hl7.
    partners: Mapped[list[str] | None] = mapped_column(JSONDoc, nullable=True)
    # Programs whose cases, resources and messages this client sees; NULL: all.
    programs: Mapped[list[str] | None] = mapped_column(JSONDoc, nullable=True)
    #: SMART Backend Services: the client's public keys (a JWKS), or the URL they are
    #: published at; either lets it get tokens at ``POST /oauth/token``.
    jwks: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    jwks_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


# --------------------------------------------------------------------------- inbox


class MessageStatus(StrEnum):
    """Lifecycle of an inbound message."""

    RECEIVED = "received"  # stored, not yet processed (events are applied after the ack)
    PROCESSED = "processed"  # mapped/applied
    IGNORED = "ignored"  # acknowledged and recorded, nothing to do (e.g. other Stripe types)
    FAILED = "failed"  # processing failed after the ack: see the exceptions queue


class InboundMessage(Base):
    """Every message the gateway acknowledged, stored raw before the acknowledgement.

    ``dedupe_key`` is unique: ``<channel>:<sender>:<external id>`` (the sender's own id for
    the message: intake ``submission_id``, Stripe event id, event ``event_id``, MSH-10...),
    so a retried message is recognised and answered with the stored ``response``.
    """

    __tablename__ = "inbound_messages"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    sender: Mapped[str] = mapped_column(String(128))
    external_id: Mapped[str] = mapped_column(String(256))
    dedupe_key: Mapped[str] = mapped_column(String(512), unique=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(128))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.RECEIVED)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    processed_at: Mapped[datetime | None]
    response: Mapped[dict[str, Any] | None]
    revision: Mapped[int] = mapped_column(Integer, default=1)
    # The inbox, a queue of the one queue (gateway.queue): applying clinical events after
    # the acknowledgement; a lease with its owner, and backoff after a transient failure
    # (an EHR that cannot be reached for an id-only notification). Migration 0009.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    available_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    locked_until: Mapped[datetime | None]
    locked_by: Mapped[str | None] = mapped_column(String(128))
    # Who authenticated the message (``client:<name>``, ``cert:<CN>:sha256:<hex>``,
    # ``signature:<partner>``, ...); see docs/SECURITY.md. Migration 0012_sec_hl7.
    principal: Mapped[str | None] = mapped_column(String(256))

    __table_args__ = (
        Index("ix_inbound_messages_pending", "status", "channel"),
        # The inbox claim's scan: waiting messages in due order (migration 0009).
        Index(
            "ix_inbound_messages_due",
            "available_at",
            "received_at",
            postgresql_where=text("status = 'received'"),
            sqlite_where=text("status = 'received'"),
        ),
    )


# --------------------------------------------------------------------------- FHIR store


class FhirResource(Base):
    """The current version of a FHIR resource the gateway produced (R4 JSON).

    ``identifier_system``/``identifier_value`` hold the business identifier used for
    conditional create (``ifNoneExist``); unique per resource type.
    """

    __tablename__ = "fhir_resources"

    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, default=1)
    resource: Mapped[dict[str, Any]]
    identifier_system: Mapped[str | None] = mapped_column(String(256))
    identifier_value: Mapped[str | None] = mapped_column(String(256))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    inbound_message_id: Mapped[str | None] = mapped_column(String(64), index=True)
    profile_id: Mapped[str | None] = mapped_column(String(128))
    profile_version: Mapped[str | None] = mapped_column(String(32))
    profile_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint(
            "resource_type",
            "identifier_system",
            "identifier_value",
            name="uq_fhir_resources_business_identifier",
        ),
    )


class FhirResourceVersion(Base):
    """Superseded versions of resources (history); the current version of each resource
    is in ``fhir_resources``. Written when a resource is updated."""

    __tablename__ = "fhir_resource_versions"

    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource: Mapped[dict[str, Any]]
    inbound_message_id: Mapped[str | None] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class PatientKey(Base):
    """A key that identifies a canonical Patient across sources.

    ``key_type`` is ``external_id`` (the intake app's / checkout metadata's patient id),
    ``submission_id`` (an intake submission), ``email`` (normalized) or ``identifier``
    (``system|value`` of any other identifier, e.g. an EHR MRN). Whichever arrives first
    creates the Patient; later messages that share any key reuse it.
    """

    __tablename__ = "patient_keys"

    key_type: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_value: Mapped[str] = mapped_column(String(320), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- outbox


class DeliveryStatus(StrEnum):
    """Lifecycle of an outbox row."""

    PENDING = "pending"  # waiting for its ``available_at``
    IN_FLIGHT = "in_flight"  # claimed by a worker until ``locked_until``
    DELIVERED = "delivered"
    DEAD = "dead"  # dead letter: gave up; replayable
    REVIEW = "review"  # needs a person (e.g. several matching patients in the EHR)
    SHADOWED = "shadowed"  # a target in shadow mode: read and compared, nothing written
    SUPPRESSED = "suppressed"  # an import's webhook, recorded without notifying (issue 16)


class Delivery(Base):
    """An outbox row: deliver one inbound message's resources to one target.

    Written in the same transaction as the resources. Holds ids, never payloads: the
    Bundle is built from ``fhir_resources`` at send time (``resource_refs`` lists
    ``Type/id`` in dependency order). ``ordering_key`` (the patient id for EHR deliveries,
    the case id for webhooks) keeps per-patient order: a row is only claimed when no older
    row with the same (target, ordering_key) is still pending.
    """

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), default="ehr")  # ehr | webhook
    target: Mapped[str] = mapped_column(String(128))
    ordering_key: Mapped[str] = mapped_column(String(128))
    inbound_message_id: Mapped[str | None] = mapped_column(String(64), index=True)
    resource_refs: Mapped[list[str]] = mapped_column(JSONDoc)
    payload: Mapped[dict[str, Any] | None]  # webhooks: the event body (no PHI)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    available_at: Mapped[datetime] = mapped_column(default=utcnow)
    locked_until: Mapped[datetime | None]
    locked_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    source_received_at: Mapped[datetime | None]
    first_attempt_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    operation_outcome: Mapped[dict[str, Any] | None]
    dead_reason: Mapped[str | None] = mapped_column(String(64))
    replay_count: Mapped[int] = mapped_column(Integer, default=0)
    replayed_at: Mapped[datetime | None]  # the retry policy's max_age counts from here
    review: Mapped[dict[str, Any] | None]  # status review: what a person must look at (ids)

    __table_args__ = (
        Index("ix_deliveries_claim", "status", "available_at"),
        Index("ix_deliveries_order", "target", "ordering_key", "id"),
        # The claim's scan: a target's pending rows in due order (migration 0008).
        Index(
            "ix_deliveries_due",
            "kind",
            "target",
            "available_at",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # The console's deliveries per minute and 24-hour sparkline (migration 0013).
        Index(
            "ix_deliveries_delivered_at",
            "delivered_at",
            postgresql_where=text("status = 'delivered'"),
            sqlite_where=text("status = 'delivered'"),
        ),
    )


class DeliveryAttempt(Base):
    """One try of one delivery: when, how long, and what came back (never the body)."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    status_code: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))  # delivered | transient | permanent
    error: Mapped[str | None] = mapped_column(Text)


class RemoteId(Base):
    """The id a target EHR assigned to one of our resources (from its transaction-response)."""

    __tablename__ = "remote_ids"

    target: Mapped[str] = mapped_column(String(128), primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    local_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    remote_id: Mapped[str] = mapped_column(String(128))
    remote_version: Mapped[str | None] = mapped_column(String(64))
    delivered_version: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class TargetState(Base):
    """Health of one delivery target (per kind): circuit breaker, throttling, request
    rate bucket and last success. Shared by every worker."""

    __tablename__ = "target_states"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True, default="ehr")
    target: Mapped[str] = mapped_column(String(128), primary_key=True)
    circuit: Mapped[str] = mapped_column(String(16), default="closed")  # closed|open|half_open
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime | None]
    next_probe_at: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]
    last_failure_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    probe_failures: Mapped[int] = mapped_column(Integer, default=0)
    throttled_until: Mapped[datetime | None]  # Retry-After of a 429/503: nobody sends before
    rate_tokens: Mapped[float | None] = mapped_column(Float)  # request rate token bucket
    rate_updated_s: Mapped[float | None] = mapped_column(Float)  # epoch seconds
    # issue 17: the failure-rate window (a sliding-window counter: this window's and the
    # previous one's calls and failures), the half-open trial round, and why it opened
    window_started_at: Mapped[datetime | None]
    window_calls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    window_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prev_window_calls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prev_window_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    trial_successes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    trial_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    open_reason: Mapped[str | None] = mapped_column(Text)
    # issue 12: a person paused the target (no delivery is claimed until resumed), who
    # and why (migration 0013_console)
    paused_at: Mapped[datetime | None]
    paused_by: Mapped[str | None] = mapped_column(String(128))
    pause_reason: Mapped[str | None] = mapped_column(Text)


# --------------------------------------------------------------------------- workflow


class Case(Base):
    """One patient's journey through one program; its state moves with clinical events."""

    __tablename__ = "cases"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    program: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    state_entered_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_occurred_at: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(Integer, default=1)
    # issue 5: SLA timers (profiles/workflow.yaml ``sla``): when the running timer expires,
    # which one, and when the case was flagged overdue (a case.overdue webhook was sent)
    sla_due_at: Mapped[datetime | None]
    sla_timer: Mapped[str | None] = mapped_column(String(64))
    overdue_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_cases_state", "state"),
        Index("ix_cases_sla_due_at", "sla_due_at"),
    )
    # Optimistic concurrency: an update of a case that changed meanwhile fails
    # (StaleDataError) instead of overwriting it; PostgreSQL also locks the row.
    __mapper_args__ = {"version_id_col": version}


class CaseEventOutcome(StrEnum):
    """What applying a clinical event did to its case."""

    APPLIED = "applied"  # moved the case (or opened it)
    RECORDED = "recorded"  # kept in history, state unchanged (allowed, no move)
    LATE = "late"  # occurred before the latest applied event: history only
    REJECTED = "rejected"  # not allowed (transition or ownership): exceptions queue
    PENDING = "pending"  # not allowed yet: waits (reorder window) for earlier events


class CaseEvent(Base):
    """One clinical event in a case's history, with its sender and both times.

    ``source`` is the sender's role (ownership matrix), ``sender`` the specific sender
    (partner or EHR target); an event id is unique per case and sender.
    """

    __tablename__ = "case_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    inbound_message_id: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[str] = mapped_column(String(256))
    type: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(String(64))
    occurred_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(64))
    to_state: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    sender: Mapped[str] = mapped_column(String(128), default="", server_default="")
    channel: Mapped[str | None] = mapped_column(String(32))
    reference: Mapped[str | None] = mapped_column(String(256))
    hold_until: Mapped[datetime | None]
    # The authenticated principal that sent the event (copied from its inbound message;
    # ``gateway`` for the gateway's own events). Migration 0012_sec_hl7.
    principal: Mapped[str | None] = mapped_column(String(256))

    __table_args__ = (
        UniqueConstraint("case_id", "sender", "event_id", name="uq_case_events_dedupe"),
        Index("ix_case_events_pending", "outcome", "hold_until"),
    )


# --------------------------------------------------------------------------- review


class ExceptionStatus(StrEnum):
    """Lifecycle of an exceptions-queue entry."""

    OPEN = "open"
    RESOLVED = "resolved"
    RETRIED = "retried"


class ExceptionRecord(Base):
    """Something a person must look at: a rejected payload (kept whole for review), an
    event that could not be applied, a transition the workflow does not allow."""

    __tablename__ = "exceptions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(32))
    sender: Mapped[str | None] = mapped_column(String(128))
    inbound_message_id: Mapped[str | None] = mapped_column(String(64), index=True)
    case_id: Mapped[str | None] = mapped_column(String(64))
    content_type: Mapped[str | None] = mapped_column(String(128))
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    problems: Mapped[list[dict[str, Any]]] = mapped_column(JSONDoc)
    status: Mapped[str] = mapped_column(String(16), default=ExceptionStatus.OPEN)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)  # guards' counts
    resolved_at: Mapped[datetime | None]
    resolved_by: Mapped[str | None] = mapped_column(String(128))
    # Who sent a refused payload (an HL7 v2 message refused for its credential): as
    # ``inbound_messages.principal``. Migration 0012_sec_hl7.
    principal: Mapped[str | None] = mapped_column(String(256))
    note: Mapped[str | None] = mapped_column(Text)
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # issue 12: who owns it now (a staff user name or an API client's), since when
    assigned_to: Mapped[str | None] = mapped_column(String(128))
    assigned_at: Mapped[datetime | None]
    # when it was escalated past its SLA (profiles/workflow.yaml ``exception_sla``)
    escalated_at: Mapped[datetime | None]
    # Repeated refusals of one client for one reason are one exception (migration
    # 0016_newcomer): ``group_key`` names the group (channel, sender, status, problem
    # codes; gateway.http.refusal_group_key), ``occurrences`` counts them, each payload
    # is a row of ``exception_payloads``.
    group_key: Mapped[str | None] = mapped_column(String(64))
    occurrences: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    last_seen_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_exceptions_status", "status", "kind"),
        Index("ix_exceptions_group", "group_key", "status"),
    )


class ExceptionPayload(Base):
    """One refused payload of a grouped exception (``seq`` 1 is the first), kept whole
    for review like ``exceptions.payload``."""

    __tablename__ = "exception_payloads"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    exception_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("exceptions.id"))
    seq: Mapped[int] = mapped_column(Integer)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    content_type: Mapped[str | None] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("exception_id", "seq", name="uq_exception_payloads_exception_id_seq"),
    )


class Subscriber(Base):
    """An ops-layer endpoint that receives signed case state-change webhooks."""

    __tablename__ = "subscribers"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(EncryptedText("subscribers.secret"))  # envelope-encrypted
    event_types: Mapped[list[str]] = mapped_column(JSONDoc)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retry: Mapped[dict[str, Any] | None]  # a RetryPolicy; None: the defaults


# --- issue 3: profiles


class ProfileMapping(Base):
    """Which mapping profile turned an inbound message into which resource versions.

    One row per ingest (``action = ingest``) and per applied re-map (``remap``), so every
    stored version can be traced to the profile id, version and content hash (SHA-256 of
    the profile file) that produced it. ``attribution`` holds the marketing attribution a
    processor profile keeps (never sent to an EHR).
    """

    __tablename__ = "profile_mappings"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    inbound_message_id: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(16))  # ingest | remap
    profile_kind: Mapped[str] = mapped_column(String(32))
    profile_id: Mapped[str] = mapped_column(String(128))
    profile_version: Mapped[str] = mapped_column(String(32))
    profile_hash: Mapped[str] = mapped_column(String(64))
    resource_versions: Mapped[list[str]] = mapped_column(JSONDoc)  # Type/id/_history/n
    attribution: Mapped[dict[str, Any] | None]
    actor: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PatientConflict(Base):
    """Two sources disagreed on a Patient element; the losing value is kept here.

    ``outcome``: ``kept_existing`` (the message's value lost) or ``replaced_existing``
    (the message's source owns the element and replaced the earlier value).
    ``lost_value`` is ``{"value": <FHIR JSON>}`` (PHI: never logged, never in errors).
    """

    __tablename__ = "patient_conflicts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    inbound_message_id: Mapped[str] = mapped_column(String(64))
    element: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(32))
    kept_source: Mapped[str] = mapped_column(String(32))
    lost_source: Mapped[str] = mapped_column(String(32))
    lost_value: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PatientElementSource(Base):
    """Which source (intake, checkout) set the current value of each Patient element."""

    __tablename__ = "patient_element_sources"

    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    element: Mapped[str] = mapped_column(String(32), primary_key=True)
    source: Mapped[str] = mapped_column(String(32))
    inbound_message_id: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- issue 5: events


class FhirSubscription(Base):
    """What the gateway knows of one FHIR Subscription of an EHR target (R5 Backport IG):
    its status, the highest event number seen, and the gaps (missed events) still open,
    each with its exceptions-queue entry (``[{"first", "last", "exception_id"}]``)."""

    __tablename__ = "fhir_subscriptions"

    target: Mapped[str] = mapped_column(String(128), primary_key=True)
    subscription: Mapped[str] = mapped_column(String(256), primary_key=True)
    topic: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(String(16))
    last_event_number: Mapped[int] = mapped_column(BigInteger, default=0)
    missing: Mapped[list[dict[str, Any]]] = mapped_column(JSONDoc, default=list)
    handshake_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    last_notification_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


from gateway.db.identity_models import AccessToken as AccessToken  # noqa: E402
from gateway.db.identity_models import AssertionJti as AssertionJti  # noqa: E402
from gateway.db.identity_models import OAuthToken as OAuthToken  # noqa: E402
from gateway.db.identity_models import PatientReview as PatientReview  # noqa: E402
from gateway.db.identity_models import ReviewStatus as ReviewStatus  # noqa: E402
from gateway.db.identity_models import SigningKey as SigningKey  # noqa: E402
from gateway.db.identity_models import StaffRole as StaffRole  # noqa: E402
from gateway.db.identity_models import StaffSession as StaffSession  # noqa: E402
from gateway.db.identity_models import StaffUser as StaffUser  # noqa: E402

# --- issue 16: migration tools (imports, shadow mode, reconciliation, cutover guards)
from gateway.db.migration_models import GuardBreach as GuardBreach  # noqa: E402
from gateway.db.migration_models import ImportFile as ImportFile  # noqa: E402
from gateway.db.migration_models import ImportJob as ImportJob  # noqa: E402
from gateway.db.migration_models import ImportRefusal as ImportRefusal  # noqa: E402
from gateway.db.migration_models import ImportStatus as ImportStatus  # noqa: E402
from gateway.db.migration_models import ReconcileJob as ReconcileJob  # noqa: E402
from gateway.db.migration_models import ShadowOutcome as ShadowOutcome  # noqa: E402
from gateway.db.migration_models import ShadowResult as ShadowResult  # noqa: E402
