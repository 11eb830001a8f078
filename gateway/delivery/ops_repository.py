"""Outbox queries for people: listing and counting deliveries, one delivery and its
attempts, replay, and queue depth per target (the ops API, the CLI, ``/metrics``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Delivery, DeliveryAttempt, DeliveryStatus
from gateway.delivery.repository import ACTIVE, REPLAYABLE


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries an ops listing or bulk replay selects (all given fields must
    match)."""

    statuses: tuple[str, ...] = (DeliveryStatus.DEAD,)
    kind: str | None = None
    target: str | None = None
    reason: str | None = None
    created_before: datetime | None = None
    created_after: datetime | None = None
    message_id: str | None = None

    def where(self) -> list[Any]:
        """SQL conditions."""
        d = Delivery
        conditions: list[Any] = [d.status.in_(list(self.statuses))]
        if self.kind:
            conditions.append(d.kind == self.kind)
        if self.target:
            conditions.append(d.target == self.target)
        if self.reason:
            conditions.append(d.dead_reason == self.reason)
        if self.created_before:
            conditions.append(d.created_at < self.created_before)
        if self.created_after:
            conditions.append(d.created_at >= self.created_after)
        if self.message_id:
            conditions.append(d.inbound_message_id == self.message_id)
        return conditions


async def list_deliveries(
    session: AsyncSession, *, where: DeliveryFilter, limit: int, after_id: int | None = None
) -> list[Delivery]:
    """Deliveries matching ``where``, oldest first, ``limit`` at most, ids above
    ``after_id`` (keyset pagination)."""
    stmt = select(Delivery).where(*where.where())
    if after_id is not None:
        stmt = stmt.where(Delivery.id > after_id)
    return list(await session.scalars(stmt.order_by(Delivery.id).limit(limit)))


async def count_deliveries(session: AsyncSession, *, where: DeliveryFilter) -> int:
    """How many deliveries match ``where``."""
    return int(
        await session.scalar(select(func.count()).select_from(Delivery).where(*where.where())) or 0
    )


async def get_delivery(session: AsyncSession, delivery_id: int) -> Delivery | None:
    """One delivery, or None."""
    return await session.get(Delivery, delivery_id)


async def attempts_of(session: AsyncSession, delivery_id: int) -> list[DeliveryAttempt]:
    """The attempts of a delivery, in order."""
    return list(
        await session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id == delivery_id)
            .order_by(DeliveryAttempt.id)
        )
    )


async def replay(session: AsyncSession, *, ids: Sequence[int], now: datetime) -> list[int]:
    """Put dead or review deliveries back in the queue, due now, with a fresh set of
    attempts (``max_age`` counts from now). Others among ``ids`` are left alone.

    Returns:
        The ids that were replayed.
    """
    if not ids:
        return []
    rows = await session.execute(
        update(Delivery)
        .where(Delivery.id.in_(list(ids)), Delivery.status.in_(list(REPLAYABLE)))
        .values(
            status=DeliveryStatus.PENDING,
            available_at=now,
            attempts=0,
            replay_count=Delivery.replay_count + 1,
            replayed_at=now,
            dead_reason=None,
            review=None,
            locked_by=None,
            locked_until=None,
        )
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(r[0] for r in rows)


@dataclass(frozen=True)
class QueueStats:
    """Counts of one target's deliveries by state."""

    kind: str
    target: str
    pending: int = 0
    in_flight: int = 0
    dead: int = 0
    review: int = 0
    oldest_pending_created_at: datetime | None = None

    @property
    def depth(self) -> int:
        """Pending plus in flight."""
        return self.pending + self.in_flight


async def queue_stats(session: AsyncSession) -> dict[tuple[str, str], QueueStats]:
    """Per ``(kind, target)``: pending, in flight, dead, review, oldest pending.

    Delivered rows are not scanned (the status index leaves them out).
    """
    d = Delivery
    rows = await session.execute(
        select(
            d.kind,
            d.target,
            func.sum(case((d.status == DeliveryStatus.PENDING, 1), else_=0)),
            func.sum(case((d.status == DeliveryStatus.IN_FLIGHT, 1), else_=0)),
            func.sum(case((d.status == DeliveryStatus.DEAD, 1), else_=0)),
            func.sum(case((d.status == DeliveryStatus.REVIEW, 1), else_=0)),
            func.min(case((d.status.in_(ACTIVE), d.created_at), else_=None)),
        )
        .where(
            d.status.in_(
                [
                    DeliveryStatus.PENDING,
                    DeliveryStatus.IN_FLIGHT,
                    DeliveryStatus.DEAD,
                    DeliveryStatus.REVIEW,
                ]
            )
        )
        .group_by(d.kind, d.target)
    )
    out = {}
    for kind, target, pending, in_flight, dead, review, oldest in rows:
        if isinstance(oldest, str):  # SQLite returns MIN() of a CASE as text
            oldest = datetime.fromisoformat(oldest)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        out[(kind, target)] = QueueStats(
            kind,
            target,
            int(pending or 0),
            int(in_flight or 0),
            int(dead or 0),
            int(review or 0),
            oldest,
        )
    return out


async def patients_of(session: AsyncSession, *, ids: Sequence[int]) -> dict[int, str]:
    """The patient id of each EHR delivery among ``ids`` (its ordering key; webhooks are
    ordered by case and have none here), for the audit trail."""
    if not ids:
        return {}
    rows = await session.execute(
        select(Delivery.id, Delivery.ordering_key).where(
            Delivery.id.in_(list(ids)), Delivery.kind == "ehr"
        )
    )
    return {delivery_id: key for delivery_id, key in rows}
