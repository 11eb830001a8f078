"""The audit trail's hash chain: tamper-evident, verifiable, with a retention period.

Entries are added cheaply in their own unit of work, unchained (``seq`` NULL). The sealer
(:func:`seal`: the worker's ``audit-seal`` loop every ``GATEWAY_AUDIT_SEAL_INTERVAL``,
and every ``audit`` CLI command first) takes the chain's head row (a write lock on SQLite,
``FOR UPDATE`` on PostgreSQL: one sealer at a time across processes) and gives each new
entry, in id order, the next ``seq``, the previous entry's hash (``prev_hash``) and its
own hash::

    hash = SHA-256( prev_hash || "\\n" || canonical JSON of the entry's fields )

(canonical JSON: sorted keys, no spaces, UTF-8; times as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``).
The first entry's ``prev_hash`` is 64 zeros. Sealing outside the writers' transactions
keeps them from queuing on one lock: on PostgreSQL several processes write concurrently,
and ids commit out of order, which is why the chain's order is ``seq``, not ``id``.

:func:`verify` walks the chain from the anchor in ``seq`` order and reports the first
entry whose fields, ``prev_hash`` or place do not match, and a head that does not match
the last entry (entries deleted from the end). A changed, deleted or inserted entry is
found; someone who can rewrite the whole table and the head can forge a chain, so keep
the head hash the verification prints somewhere else (a ticket, the SIEM) too.

Retention (:func:`purge`) deletes sealed entries older than ``GATEWAY_AUDIT_RETENTION``
and moves the anchor (the last deleted entry's ``seq`` and hash) forward, so what remains
still verifies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import AuditChain, AuditEntry
from gateway.db.types import utcnow
from gateway.db.uow import SessionFactory, unit_of_work

GENESIS = "0" * 64
#: The fields an entry's hash covers, in the canonical form's key names.
HASHED_FIELDS = (
    "id",
    "seq",
    "at",
    "actor",
    "agent_kind",
    "client_id",
    "source_address",
    "action",
    "code",
    "outcome",
    "entity_type",
    "entity_id",
    "patient_id",
    "query",
    "detail",
)


def _time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(row: AuditEntry, *, seq: int, prev_hash: str) -> str:
    """SHA-256 (hex) of ``prev_hash`` and the canonical JSON of ``row``'s fields at
    place ``seq``.

    >>> from datetime import datetime, UTC
    >>> row = AuditEntry(id=1, at=datetime(2026, 1, 1, tzinfo=UTC), actor="a", agent_kind="client",
    ...     action="read", code="R", outcome="0", entity_type="Patient", entity_id="p1")
    >>> entry_hash(row, seq=1, prev_hash=GENESIS)[:16]
    '1959b3ae9ffc9aac'
    """
    fields: dict[str, Any] = {
        "id": row.id,
        "seq": seq,
        "at": _time(row.at),
        "actor": row.actor,
        "agent_kind": row.agent_kind,
        "client_id": row.client_id,
        "source_address": row.source_address,
        "action": row.action,
        "code": row.code,
        "outcome": row.outcome,
        "entity_type": row.entity_type,
        "entity_id": row.entity_id,
        "patient_id": row.patient_id,
        "query": row.query,
        "detail": row.detail,
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{prev_hash}\n{canonical}".encode()).hexdigest()


async def _lock_head(session: AsyncSession) -> AuditChain:
    """The chain's head row, locked: an UPDATE first (SQLite takes its write lock, so two
    sealers never read the same head), ``FOR UPDATE`` on PostgreSQL."""
    await session.execute(update(AuditChain).where(AuditChain.id == 1).values(sealed_at=utcnow()))
    stmt = select(AuditChain).where(AuditChain.id == 1).execution_options(populate_existing=True)
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    head = await session.scalar(stmt)
    if head is None:  # a database created from the models, not the migrations (tests)
        head = AuditChain(id=1, last_seq=0, last_hash=GENESIS, anchor_seq=0, anchor_hash=GENESIS)
        session.add(head)
        await session.flush()
    return head


async def seal(session: AsyncSession, *, limit: int = 2000) -> int:
    """Chain up to ``limit`` unchained entries, oldest id first; returns how many. Flushes
    (the caller commits, ending the head's lock). Takes no lock when nothing waits."""
    waiting = await session.scalar(select(AuditEntry.id).where(AuditEntry.seq.is_(None)).limit(1))
    if waiting is None:
        return 0
    head = await _lock_head(session)
    rows = list(
        await session.scalars(
            select(AuditEntry).where(AuditEntry.seq.is_(None)).order_by(AuditEntry.id).limit(limit)
        )
    )
    for row in rows:
        seq = head.last_seq + 1
        row.prev_hash = head.last_hash
        row.hash = entry_hash(row, seq=seq, prev_hash=head.last_hash)
        row.seq = seq
        head.last_seq, head.last_hash = seq, row.hash
    await session.flush()
    return len(rows)


class Sealer:
    """The worker's ``audit-seal`` step: chains new entries (:func:`seal`) and, hourly,
    deletes entries past the retention period (:func:`purge`).

    Args:
        sessions: write sessions (``runtime.write_session``); each step its own unit of work.
        retention: how long entries are kept (``GATEWAY_AUDIT_RETENTION``).
        now: the clock's ``now``.
        limit: entries chained per step.
    """

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        retention: timedelta,
        now: Callable[[], datetime],
        limit: int = 2000,
    ) -> None:
        self._sessions = sessions
        self._retention = retention
        self._now = now
        self._limit = limit
        self._next_purge_at: datetime | None = None

    async def step(self) -> int:
        """One round; returns a positive number only when a full batch was chained (so
        the loop goes again at once), else 0 (it waits its poll interval)."""
        async with unit_of_work(self._sessions) as session:
            sealed = await seal(session, limit=self._limit)
        now = self._now()
        if self._next_purge_at is None or now >= self._next_purge_at:
            self._next_purge_at = now + timedelta(hours=1)
            async with unit_of_work(self._sessions) as session:
                await purge(session, before=now - self._retention)
        return sealed if sealed >= self._limit else 0


@dataclass
class Verification:
    """What :func:`verify` found: entries checked, the head, and the problems (each
    ``{"seq", "id", "problem"}``; empty when the chain holds)."""

    checked: int = 0
    unsealed: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    anchor_seq: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the chain verified."""
        return not self.problems


async def verify(session: AsyncSession, *, batch: int = 5000) -> Verification:
    """Check the chain from the anchor to the head (reads only).

    Problems found: an entry whose hash does not match its fields (changed), whose
    ``prev_hash`` is not the previous entry's hash, a gap or repeat in ``seq`` (deleted or
    inserted), and a head that is not the last entry (entries deleted from the end).
    """
    head = await session.scalar(select(AuditChain).where(AuditChain.id == 1))
    result = Verification()
    if head is None:
        return result
    result.head_seq, result.head_hash, result.anchor_seq = (
        head.last_seq,
        head.last_hash,
        head.anchor_seq,
    )
    result.unsealed = int(
        await session.scalar(
            select(func.count()).select_from(AuditEntry).where(AuditEntry.seq.is_(None))
        )
        or 0
    )
    expected_seq, prev_hash = head.anchor_seq + 1, head.anchor_hash
    while True:
        rows = list(
            await session.scalars(
                select(AuditEntry)
                .where(AuditEntry.seq >= expected_seq, AuditEntry.seq <= head.last_seq)
                .order_by(AuditEntry.seq)
                .limit(batch)
            )
        )
        for row in rows:
            assert row.seq is not None  # selected by seq
            if row.seq != expected_seq:
                result.problems.append(
                    {
                        "seq": expected_seq,
                        "id": None,
                        "problem": f"entries {expected_seq}..{row.seq - 1} are missing",
                    }
                )
            elif row.prev_hash != prev_hash:
                result.problems.append(
                    {
                        "seq": row.seq,
                        "id": row.id,
                        "problem": "prev_hash does not match the previous entry",
                    }
                )
            if row.hash != entry_hash(row, seq=row.seq, prev_hash=row.prev_hash or ""):
                result.problems.append(
                    {"seq": row.seq, "id": row.id, "problem": "the entry does not match its hash"}
                )
            result.checked += 1
            expected_seq, prev_hash = row.seq + 1, row.hash or ""
        if len(rows) < batch:
            break
    if expected_seq - 1 != head.last_seq or prev_hash != head.last_hash:
        result.problems.append(
            {
                "seq": head.last_seq,
                "id": None,
                "problem": f"the head names entry {head.last_seq}; the chain ends at {expected_seq - 1}",
            }
        )
    return result


async def purge(session: AsyncSession, *, before: datetime) -> int:
    """Delete sealed entries recorded before ``before`` (the retention period), oldest
    first without gaps, and move the anchor to the last one deleted; returns how many.
    Unchained entries are never deleted. Flushes."""
    head = await _lock_head(session)
    last = await session.scalar(
        select(AuditEntry)
        .where(AuditEntry.seq.is_not(None), AuditEntry.at < before)
        .order_by(AuditEntry.seq.desc())
        .limit(1)
    )
    if last is None or last.seq is None or last.seq <= head.anchor_seq:
        return 0
    # Entries are sealed in time order, nearly: stop at the first newer one so that what
    # remains is one unbroken chain.
    newer = await session.scalar(
        select(func.min(AuditEntry.seq)).where(
            AuditEntry.seq > head.anchor_seq, AuditEntry.seq <= last.seq, AuditEntry.at >= before
        )
    )
    upto = (
        last
        if newer is None
        else await session.scalar(select(AuditEntry).where(AuditEntry.seq == newer - 1))
    )
    if upto is None or upto.seq is None or upto.seq <= head.anchor_seq:
        return 0
    result = await session.execute(
        delete(AuditEntry)
        .where(AuditEntry.seq.is_not(None), AuditEntry.seq <= upto.seq)
        .execution_options(synchronize_session=False)
    )
    head.anchor_seq, head.anchor_hash = upto.seq, upto.hash or GENESIS
    await session.flush()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
