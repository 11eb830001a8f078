"""The tables of the migration tools (issue 16, migration ``0015_migrate``): bulk imports
(``import_jobs``, ``import_files`` with a cursor per file, ``import_refusals``), what a
target in shadow mode would have written (``shadow_results``), reconciliation runs
(``reconcile_jobs``) and cutover guard breaches (``guard_breaches``). Re-exported by
:mod:`gateway.db.models`.

Ids and counts only, except a refused import record, which is kept whole (like a refused
payload in the exceptions queue) so it can be fixed and imported again.
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
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.base import Base
from gateway.db.types import BigIntPK, JSONDoc, utcnow


class ImportStatus(StrEnum):
    """Lifecycle of an import job (and of each of its files)."""

    RUNNING = "running"  # being read, or stopped mid-way (a crash): resumable
    COMPLETED = "completed"
    FAILED = "failed"  # a file could not be read at all


class ImportJob(Base):
    """One bulk import: its source system, whether live side effects were asked for,
    and the counts of its records (``delivered`` is read from the outbox).

    ``runner`` is the token of the run that owns the job now (a fencing token): each
    batch commits only while the job still names it, so a job resumed elsewhere (the
    API's resume, a restarted gateway taking over an upload, a second ``import`` of the
    same files) stops the run it replaced at that run's next batch. ``updated_at`` moves
    with every batch: the run's heartbeat.
    """

    __tablename__ = "import_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(128))
    notify: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default=ImportStatus.RUNNING)
    actor: Mapped[str] = mapped_column(String(128))
    csv_profile: Mapped[str | None] = mapped_column(String(128))
    read: Mapped[int] = mapped_column(Integer, default=0)
    mapped: Mapped[int] = mapped_column(Integer, default=0)
    refused: Mapped[int] = mapped_column(Integer, default=0)
    duplicate: Mapped[int] = mapped_column(Integer, default=0)
    suppressed_webhooks: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    runner: Mapped[str | None] = mapped_column(String(64))


class ImportFile(Base):
    """One input file of a job, or one part of it, and how far it was read: ``cursor`` is
    the byte offset of the next record, ``line`` its line number (1-based), committed
    with the records before it, so a crashed import resumes there. A file imported by
    several processes (``--workers``) has a row per part: the bytes from
    ``start_offset`` (a line start) to ``stop_offset`` (None: the end of the file)."""

    __tablename__ = "import_files"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("import_jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # files over 2 GB
    start_offset: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    stop_offset: Mapped[int | None] = mapped_column(BigInteger)
    cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    line: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default=ImportStatus.RUNNING)
    # An upload (``POST /v1/imports``) is kept here until the job completes, so the job
    # can be resumed after a crash; a file named on the command line is read in place.
    body: Mapped[bytes | None] = mapped_column(LargeBinary)


class ImportRefusal(Base):
    """A record an import refused, whole, with its problems (location, code, message;
    never a value): downloadable as NDJSON to fix and import again."""

    __tablename__ = "import_refusals"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("import_jobs.id"), index=True)
    file: Mapped[str] = mapped_column(String(512))
    line: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str | None] = mapped_column(String(32))
    business_id: Mapped[str | None] = mapped_column(String(256))
    problems: Mapped[list[dict[str, Any]]] = mapped_column(JSONDoc)
    record: Mapped[bytes] = mapped_column(LargeBinary)


class ShadowOutcome(StrEnum):
    """What a target in shadow mode would have done with one resource."""

    CREATE = "create"
    NO_CHANGE = "no_change"
    UPDATE = "update"


class ShadowResult(Base):
    """What a shadow delivery would have written for one resource: the EHR was read by
    the resource's business identifier; ``diff`` is the JSON Patch (RFC 6902) from the
    EHR's resource to ours over the elements we send (references left out)."""

    __tablename__ = "shadow_results"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    target: Mapped[str] = mapped_column(String(128))
    delivery_id: Mapped[int | None] = mapped_column(BigIntPK)
    message_id: Mapped[str | None] = mapped_column(String(64))
    resource_ref: Mapped[str] = mapped_column(String(128))
    identifier: Mapped[str | None] = mapped_column(String(512))
    outcome: Mapped[str] = mapped_column(String(16))
    remote_id: Mapped[str | None] = mapped_column(String(128))
    diff: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONDoc)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_shadow_results_target", "target", "outcome", "id"),)


class ReconcileJob(Base):
    """One reconciliation of a target: the summary and the mismatches found.

    ``runner`` is the process running it (``host:pid``) and ``heartbeat_at`` when that
    process last showed life (renewed while it runs): a ``running`` job whose heartbeat
    is stale lost its process (:func:`gateway.ops.reconcile.settle_interrupted`).
    """

    __tablename__ = "reconcile_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(128))
    since: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(16), default=ImportStatus.RUNNING)
    summary: Mapped[dict[str, Any] | None]
    items: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONDoc)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    runner: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None]


class GuardBreach(Base):
    """A cutover guard of a target over its threshold: open until ``cleared_at``."""

    __tablename__ = "guard_breaches"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    target: Mapped[str] = mapped_column(String(128))
    guard: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    breached_at: Mapped[datetime] = mapped_column(default=utcnow)
    cleared_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_guard_breaches_open", "target", "guard", "cleared_at"),)
