"""Writing outbox rows, in the same transaction as the resources they deliver."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Delivery
from gateway.db.types import utcnow
from mappers.profiles import EhrTargetProfile


def enqueue_ehr_deliveries(
    session: AsyncSession,
    targets: list[EhrTargetProfile],
    *,
    message_id: str,
    patient_id: str,
    resource_refs: list[str],
    received_at: datetime,
) -> list[Delivery]:
    """Add one delivery per enabled target that takes any of ``resource_refs``.

    Args:
        targets: the enabled EHR targets.
        message_id: the inbound message the resources came from.
        patient_id: ordering key: one patient's deliveries to one target go in order.
        resource_refs: ``Type/id`` in dependency order (Patient first, Provenance last).
        received_at: when the message arrived (for the intake-to-EHR latency metric).

    Returns:
        The new rows (flushed by the caller's commit; ids assigned on flush).
    """
    rows = []
    now = utcnow()
    for target in targets:
        refs = [r for r in resource_refs if r.split("/", 1)[0] in target.send]
        if not refs:
            continue
        row = Delivery(
            kind="ehr",
            target=target.name,
            ordering_key=patient_id,
            inbound_message_id=message_id,
            resource_refs=refs,
            available_at=now,
            created_at=now,
            source_received_at=received_at,
        )
        session.add(row)
        rows.append(row)
    return rows
