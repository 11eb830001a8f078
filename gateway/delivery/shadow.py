"""Shadow mode (issue 16): a target with ``mode: shadow`` in its profile is a cutover
rehearsal. Its deliveries are mapped and validated as for a live target, then, instead of
writing, the EHR is read by each resource's business identifier (``GET
[base]/Type?identifier=system|value``, read-only, with the target's token) and what a
write would have done is recorded in ``shadow_results``:

* ``create``: the EHR has no resource with that identifier;
* ``no_change``: it has one, and the elements we own are the same;
* ``update``: it has one that differs; ``diff`` is the RFC 6902 patch from the EHR's
  resource to ours over the elements we own (:func:`mappers.ehrdiff.owned_diff`).

The outbox row ends ``shadowed``; nothing is written to the EHR and no remote id is
learnt. Switching the target to ``mode: live`` is a profile change, audited
(:func:`audit_target_modes`); the shadowed rows are then sent by reconciliation's
requeue (``fhir-gateway reconcile TARGET --requeue``) or a replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, func, insert, null, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.db.models import AuditEntry, ReconcileJob, ShadowOutcome, ShadowResult
from gateway.ehr.client import EhrClient
from gateway.logging import get_logger
from mappers.bundle import RestCall, business_identifier, if_none_exist
from mappers.ehrdiff import owned_diff
from mappers.profiles import ProfileSet

log = get_logger(__name__)

#: Audit ``entity_type`` of a target's mode (its ``detail``: ``{"mode": ..., "from": ...}``).
MODE_ENTITY = "EhrTargetMode"


@dataclass(frozen=True)
class ShadowRow:
    """What a write of one resource would have done."""

    resource_ref: str
    identifier: str | None
    outcome: ShadowOutcome
    remote_id: str | None
    diff: list[dict[str, Any]] | None


async def compare_calls(
    client: EhrClient,
    calls: Sequence[RestCall],
    stored: Sequence[dict[str, Any]],
    *,
    provenance_tag_system: str,
) -> list[ShadowRow]:
    """Read the EHR for each call's resource by its business identifier (Provenance by
    its tag) and say what writing it would do.

    Args:
        client: the target's client (its token, limits).
        calls: the target's REST calls (:func:`mappers.bundle.rest_calls`), one per
            resource of ``stored``, in the same order.
        stored: the stored resources (local ids).
        provenance_tag_system: the ``meta.tag`` system of our Provenance.

    Returns:
        One row per call.

    Raises:
        EhrUnavailableError, EhrRejectedError, EhrConfigError: a search failed (the
            delivery is retried as any other).
    """
    rows = []
    for call, resource in zip(calls, stored, strict=True):
        search = if_none_exist(resource, provenance_tag_system)
        ident = business_identifier(resource)
        label = f"{ident[0]}|{ident[1]}" if ident else search
        if search is None:
            rows.append(ShadowRow(call.local_ref, None, ShadowOutcome.CREATE, None, None))
            continue
        found = await client.search(call.resource_type, search)
        if not found:
            rows.append(ShadowRow(call.local_ref, label, ShadowOutcome.CREATE, None, None))
            continue
        # A conditional create that finds one resource changes nothing; an update of the
        # EHR's resource (a known remote id) would write ours: compare with what it holds.
        theirs = found[0]
        diff = owned_diff(theirs, call.resource)
        rows.append(
            ShadowRow(
                call.local_ref,
                label,
                ShadowOutcome.UPDATE if diff else ShadowOutcome.NO_CHANGE,
                str(theirs.get("id")) if theirs.get("id") else None,
                diff or None,
            )
        )
    return rows


async def save_results(
    session: AsyncSession,
    *,
    target: str,
    delivery_id: int | None,
    message_id: str | None,
    rows: Sequence[ShadowRow],
    now: datetime,
) -> None:
    """Store what a shadow delivery found (one statement; flushes nothing else)."""
    if not rows:
        return
    await session.execute(
        insert(ShadowResult),
        [
            {
                "target": target,
                "delivery_id": delivery_id,
                "message_id": message_id,
                "resource_ref": r.resource_ref,
                "identifier": r.identifier[:512] if r.identifier else None,
                "outcome": r.outcome,
                "remote_id": r.remote_id,
                "diff": r.diff,
                "recorded_at": now,
            }
            for r in rows
        ],
    )


async def shadow_counts(session: AsyncSession) -> dict[str, dict[str, int]]:
    """Per target: results by outcome (``create``, ``no_change``, ``update``)."""
    rows = await session.execute(
        select(ShadowResult.target, ShadowResult.outcome, func.count()).group_by(
            ShadowResult.target, ShadowResult.outcome
        )
    )
    out: dict[str, dict[str, int]] = {}
    for target, outcome, count in rows.all():
        out.setdefault(str(target), {})[str(outcome)] = int(count)
    return out


async def list_results(
    session: AsyncSession,
    *,
    target: str,
    outcome: str | None,
    after_id: int,
    limit: int,
) -> Sequence[ShadowResult]:
    """A target's shadow results (optionally of one outcome), oldest first, a page."""
    stmt = select(ShadowResult).where(ShadowResult.target == target, ShadowResult.id > after_id)
    if outcome is not None:
        stmt = stmt.where(ShadowResult.outcome == outcome)
    return (await session.scalars(stmt.order_by(ShadowResult.id).limit(limit))).all()


def last_mode_statement(target: str) -> Select[tuple[dict[str, Any] | None]]:
    """The ``detail`` of the last mode recorded for ``target`` (through
    ``ix_audit_log_target_mode``, migration 0020)."""
    return (
        select(AuditEntry.detail)
        .where(AuditEntry.entity_type == MODE_ENTITY, AuditEntry.entity_id == target)
        .order_by(AuditEntry.id.desc())
        .limit(1)
    )


async def audit_target_modes(session: AsyncSession, profiles: ProfileSet) -> list[str]:
    """Record in the audit trail each EHR target whose ``mode`` differs from the last
    one recorded (a profile change: reload, or a restart with an edited file). A target
    never recorded counts as ``live`` (the default): its first ``shadow`` is recorded.
    Flushes nothing; the caller commits.

    Returns:
        The targets whose mode was recorded.
    """
    changed = []
    for name, target in sorted(profiles.ehr.items()):
        last = (await session.scalars(last_mode_statement(name))).first()
        before = (last or {}).get("mode")
        if before == target.mode or (before is None and target.mode == "live"):
            continue  # unchanged, or never anything but live (the default)
        source = profiles.source_of(f"ehr/{name}")
        audit.record(
            session,
            action="update",
            entity_type=MODE_ENTITY,
            entity_id=name,
            detail={
                "mode": target.mode,
                "from": before,
                "profile_hash": source.content_hash if source else None,
            },
        )
        log.info("delivery.target_mode", target=name, mode=target.mode, previous=before)
        changed.append(name)
    return changed


#: Rows deleted per statement by :class:`ShadowRetention` (a short transaction each).
PURGE_BATCH = 5000


@dataclass
class ShadowRetention:
    """Deletes shadow results older than ``retention``, :data:`PURGE_BATCH` rows per step
    (a :class:`~gateway.queue.loop.PollingLoop` step of the worker, run again at once
    while it found rows), and empties the items of reconciliation reports finished
    before then (their summary stays). Both are a cutover's record: their diffs hold the
    values of the elements that differ (PHI), so they are not kept for ever.

    Attributes:
        sessions: a write-session factory (``Runtime.write_session``).
        retention: how long a result is kept (``GATEWAY_SHADOW_RETENTION``).
        now: the clock.
    """

    sessions: Any
    retention: timedelta
    now: Any

    async def step(self) -> int:
        """Delete one batch of expired results and empty the expired reports; returns how
        many rows were changed."""
        cutoff = self.now() - self.retention
        async with self.sessions() as session:
            reports = await session.execute(
                update(ReconcileJob)
                .where(ReconcileJob.finished_at < cutoff, ReconcileJob.items.is_not(None))
                .values(items=null())
                .execution_options(synchronize_session=False)
            )
            expired = (
                select(ShadowResult.id)
                .where(ShadowResult.recorded_at < cutoff)
                .order_by(ShadowResult.id)
                .limit(PURGE_BATCH)
            )
            result = await session.execute(
                delete(ShadowResult)
                .where(ShadowResult.id.in_(expired.scalar_subquery()))
                .execution_options(synchronize_session=False)
            )
            await session.commit()
        deleted = int(getattr(result, "rowcount", 0) or 0)
        emptied = int(getattr(reports, "rowcount", 0) or 0)
        if deleted or emptied:
            log.info("shadow.purged", results=deleted, reconcile_reports=emptied)
        return deleted + emptied
