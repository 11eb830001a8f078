"""Outbox queries: claiming due deliveries and recording their outcome.

Claiming is one ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``
on PostgreSQL, so several workers never take the same row; on SQLite (one worker) the
same statement runs without the lock clause. A claim is a lease: ``locked_until``; a
crashed worker's rows become claimable again when it passes. A row is only claimable when
no older row of the same (target, ordering key) is still pending or in flight: one
patient's deliveries go in order, and a failing one holds back only that patient.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from gateway.db.models import Delivery, DeliveryAttempt, DeliveryStatus, FhirResource, RemoteId

ACTIVE = (DeliveryStatus.PENDING, DeliveryStatus.IN_FLIGHT)


async def claim(
    session: AsyncSession,
    *,
    targets: Sequence[str],
    limit: int,
    worker: str,
    lease: timedelta,
    now: datetime,
    kind: str = "ehr",
) -> list[Delivery]:
    """Claim up to ``limit`` due deliveries for ``targets``; counts the attempt.

    Returns:
        The claimed rows (``status = in_flight``, ``locked_by = worker``).
    """
    if not targets:
        return []
    d = Delivery
    older = aliased(Delivery)
    blocked = exists().where(
        older.target == d.target,
        older.ordering_key == d.ordering_key,
        older.id < d.id,
        older.status.in_(ACTIVE),
    )
    due = or_(
        and_(d.status == DeliveryStatus.PENDING, d.available_at <= now),
        and_(d.status == DeliveryStatus.IN_FLIGHT, d.locked_until < now),
    )
    candidates = (
        select(d.id)
        .where(d.kind == kind, d.target.in_(list(targets)), due, ~blocked)
        .order_by(d.available_at, d.id)
        .limit(limit)
    )
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    stmt = (
        update(d)
        .where(d.id.in_(candidates.scalar_subquery()))
        .values(
            status=DeliveryStatus.IN_FLIGHT,
            locked_until=now + lease,
            locked_by=worker,
            attempts=d.attempts + 1,
            last_attempt_at=now,
        )
        .returning(d)
        .execution_options(synchronize_session=False)
    )
    rows = (await session.scalars(stmt)).all()
    for row in rows:
        if row.first_attempt_at is None:
            row.first_attempt_at = now
    return list(rows)


def _owned(delivery_id: int, worker: str) -> Any:
    return and_(
        Delivery.id == delivery_id,
        Delivery.locked_by == worker,
        Delivery.status == DeliveryStatus.IN_FLIGHT,
    )


async def finish(
    session: AsyncSession, *, delivery_id: int, worker: str, values: dict[str, Any]
) -> bool:
    """Update a claimed row if this worker still holds it; False when the lease was lost
    (another worker took it over: its outcome wins, and idempotent writes make the
    double send harmless)."""
    result = await session.execute(
        update(Delivery)
        .where(_owned(delivery_id, worker))
        .values(locked_by=None, locked_until=None, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def add_attempt(
    session: AsyncSession,
    *,
    delivery: Delivery,
    worker: str,
    started_at: datetime,
    duration_ms: int,
    outcome: str,
    status_code: int | None,
    error: str | None,
) -> None:
    """Record one attempt (no bodies: status, outcome, a short error)."""
    session.add(
        DeliveryAttempt(
            delivery_id=delivery.id,
            attempt=delivery.attempts,
            worker=worker,
            started_at=started_at,
            duration_ms=duration_ms,
            status_code=status_code,
            outcome=outcome,
            error=error,
        )
    )


async def remote_ids_for(
    session: AsyncSession, *, target: str, refs: Sequence[str]
) -> dict[str, str]:
    """``"Type/<local id>" -> remote id`` for the refs this target already has."""
    if not refs:
        return {}
    keys = [tuple(r.split("/", 1)) for r in refs]
    rows = await session.scalars(
        select(RemoteId).where(
            RemoteId.target == target,
            or_(*[and_(RemoteId.resource_type == t, RemoteId.local_id == i) for t, i in keys]),
        )
    )
    return {f"{r.resource_type}/{r.local_id}": r.remote_id for r in rows}


async def identifiers_for(session: AsyncSession, refs: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``"Type/<local id>" -> (system, value)`` business identifiers of stored resources."""
    if not refs:
        return {}
    keys = [tuple(r.split("/", 1)) for r in refs]
    rows = await session.execute(
        select(
            FhirResource.resource_type,
            FhirResource.id,
            FhirResource.identifier_system,
            FhirResource.identifier_value,
        ).where(
            or_(*[and_(FhirResource.resource_type == t, FhirResource.id == i) for t, i in keys])
        )
    )
    return {f"{t}/{i}": (s, v) for t, i, s, v in rows if s and v}


async def save_remote_id(
    session: AsyncSession,
    *,
    target: str,
    resource_type: str,
    local_id: str,
    remote_id: str,
    remote_version: str | None,
    delivered_version: int | None,
    now: datetime,
) -> None:
    """Insert or update the EHR's id for one of our resources."""
    row = await session.get(RemoteId, (target, resource_type, local_id))
    if row is None:
        session.add(
            RemoteId(
                target=target,
                resource_type=resource_type,
                local_id=local_id,
                remote_id=remote_id,
                remote_version=remote_version,
                delivered_version=delivered_version,
                updated_at=now,
            )
        )
    else:
        row.remote_id = remote_id
        row.remote_version = remote_version
        row.delivered_version = delivered_version
        row.updated_at = now
