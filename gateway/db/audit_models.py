"""The audit trail's tables: ``audit_log`` (IHE BALP AuditEvents in columns, in a hash
chain) and ``audit_chain`` (the chain's head). Re-exported by :mod:`gateway.db.models`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.base import Base
from gateway.db.types import BigIntPK, utcnow

#: ``Session.info`` key of the audit entries a transaction will insert when it commits
#: (``gateway.audit.service.record``); the request dependency checks it to take SQLite's
#: write lock for a read that recorded some.
AUDIT_PENDING = "gateway.audit.pending"


class AuditEntry(Base):
    """One audited action on PHI or on the gateway's configuration: an IHE BALP
    AuditEvent (https://profiles.ihe.net/ITI/BALP/) in columns. Ids only, never content.

    ``actor`` is the agent (API client name, ``cli:<user>``, ``worker``), ``agent_kind``
    ``client`` | ``user`` | ``system``; ``action`` the interaction (``read``, ``search``,
    ``create``, ``update``, ``ingest``, ``replay``...) and ``code`` its AuditEvent.action
    (C, R, U, D, E); ``outcome`` AuditEvent.outcome (0, 4, 8, 12); ``entity_type`` /
    ``entity_id`` the resource and ``patient_id`` the Patient it belongs to.

    The hash chain (migration 0010): the sealer (:mod:`gateway.audit.chain`) gives each
    entry its place ``seq`` and ``hash`` = SHA-256 of the previous entry's hash and this
    entry's fields; ``seq`` is NULL until then (about a second).
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    entity_type: Mapped[str] = mapped_column(String(64))
    entity_id: Mapped[str] = mapped_column(String(128))
    detail: Mapped[dict[str, Any] | None]
    code: Mapped[str] = mapped_column(String(1), default="E", server_default="E")
    outcome: Mapped[str] = mapped_column(String(2), default="0", server_default="0")
    agent_kind: Mapped[str] = mapped_column(String(16), default="system", server_default="system")
    client_id: Mapped[int | None] = mapped_column(BigInteger)
    source_address: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    query: Mapped[str | None] = mapped_column(Text)
    seq: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_log_patient", "patient_id", "at"),
        Index("ix_audit_log_actor", "actor", "at"),
        Index("ix_audit_log_at", "at"),
        # The last recorded mode of each EHR target (read at start-up and on reload).
        Index(
            "ix_audit_log_target_mode",
            "entity_id",
            "id",
            postgresql_where=text("entity_type = 'EhrTargetMode'"),
            sqlite_where=text("entity_type = 'EhrTargetMode'"),
        ),
        # The sealer's scan: entries not chained yet.
        Index(
            "ix_audit_log_unsealed",
            "id",
            postgresql_where=text("seq IS NULL"),
            sqlite_where=text("seq IS NULL"),
        ),
    )


class AuditChain(Base):
    """The head of the audit hash chain (one row, ``id = 1``): the last sealed entry's
    ``seq`` and ``hash``, and the anchor retention left (the last purged entry's ``seq``
    and ``hash``; verification starts after it)."""

    __tablename__ = "audit_chain"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    last_hash: Mapped[str] = mapped_column(String(64))
    anchor_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    anchor_hash: Mapped[str] = mapped_column(String(64))
    sealed_at: Mapped[datetime | None]
