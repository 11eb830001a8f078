"""Queries of the import jobs: a job, its files, its counts, its refused records."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import (
    Delivery,
    DeliveryStatus,
    ImportFile,
    ImportJob,
    ImportRefusal,
    InboundMessage,
)
from gateway.errors import NotFoundError


async def get_job(session: AsyncSession, job_id: str) -> ImportJob | None:
    """The job, or None."""
    return await session.get(ImportJob, job_id, populate_existing=True)


async def get_job_or_raise(session: AsyncSession, job_id: str) -> ImportJob:
    """The job.

    Raises:
        NotFoundError: no such job.
    """
    job = await get_job(session, job_id)
    if job is None:
        raise NotFoundError("no such import job")
    return job


async def job_files(session: AsyncSession, job_id: str) -> Sequence[ImportFile]:
    """The job's files in the order they were given."""
    return (
        await session.scalars(
            select(ImportFile).where(ImportFile.job_id == job_id).order_by(ImportFile.id)
        )
    ).all()


async def delivered_count(session: AsyncSession, job_id: str) -> dict[str, int]:
    """EHR deliveries of the job's records by status (``delivered``, ``shadowed``,
    ``pending``, ``dead``...)."""
    rows = await session.execute(
        select(Delivery.status, func.count())
        .join(InboundMessage, InboundMessage.id == Delivery.inbound_message_id)
        .where(InboundMessage.principal == f"import:{job_id}", Delivery.kind == "ehr")
        .group_by(Delivery.status)
    )
    return {str(status): int(count) for status, count in rows.all()}


async def job_counts(
    session: AsyncSession, job_id: str, *, with_delivered: bool = True
) -> dict[str, int]:
    """``read``, ``mapped``, ``refused``, ``duplicate``, ``suppressed_webhooks`` and (with
    ``with_delivered``) ``delivered`` and ``shadowed``: EHR deliveries of its records."""
    job = await get_job_or_raise(session, job_id)
    counts = {
        "read": job.read,
        "mapped": job.mapped,
        "refused": job.refused,
        "duplicate": job.duplicate,
        "suppressed_webhooks": job.suppressed_webhooks,
    }
    if with_delivered:
        by_status = await delivered_count(session, job_id)
        counts["delivered"] = by_status.get(DeliveryStatus.DELIVERED, 0)
        counts["shadowed"] = by_status.get(DeliveryStatus.SHADOWED, 0)
        counts["deliveries_pending"] = by_status.get(DeliveryStatus.PENDING, 0) + by_status.get(
            DeliveryStatus.IN_FLIGHT, 0
        )
    return counts


async def refusals(
    session: AsyncSession, job_id: str, *, after_id: int = 0, limit: int = 1000
) -> Sequence[ImportRefusal]:
    """The job's refused records, in file order, a page at a time."""
    return (
        await session.scalars(
            select(ImportRefusal)
            .where(ImportRefusal.job_id == job_id, ImportRefusal.id > after_id)
            .order_by(ImportRefusal.id)
            .limit(limit)
        )
    ).all()
