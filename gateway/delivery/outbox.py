"""Writing EHR outbox rows, in the same transaction as the resources they deliver.

What each target gets is decided here, once, when the rows are written: the resources of
the message that changed, of the types the target receives (``send`` minus
``overrides.skip``), with the patient and the Provenance when it receives them. The
sender sends the row's ``resource_refs`` as they are. A replay decides again
(:func:`narrow_to_profiles`): a type removed from ``send`` (the "dead letters are piling
up" runbook) is not sent again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Delivery
from gateway.db.types import utcnow
from mappers.ehr_overrides import received_types
from mappers.profiles import EhrTargetProfile, ProfileSet


def deliverable_refs(target: EhrTargetProfile, refs: Sequence[str]) -> list[str]:
    """Of ``refs`` (``Type/id``), those ``target`` receives, in order."""
    receives = received_types(target)
    return [r for r in refs if r.split("/", 1)[0] in receives]


def enqueue_ehr_deliveries(
    session: AsyncSession,
    targets: Sequence[EhrTargetProfile],
    *,
    message_id: str,
    patient_id: str,
    changed_refs: Sequence[str],
    provenance_ref: str,
    received_at: datetime,
) -> list[Delivery]:
    """Add one delivery per enabled target that receives any of ``changed_refs``.

    Args:
        targets: the enabled EHR targets.
        message_id: the inbound message the resources came from.
        patient_id: the ordering key (one patient's deliveries to one target go in order);
            the Patient travels with its resources, so their references resolve.
        changed_refs: ``Type/id`` of the resources the message created or changed.
        provenance_ref: ``Provenance/id`` of the message's Provenance (sent last).
        received_at: when the message arrived (for the intake-to-EHR latency metric).

    Returns:
        The new rows (ids assigned on flush).
    """
    rows = []
    now = utcnow()
    patient_ref = f"Patient/{patient_id}"
    for target in targets:
        relevant = deliverable_refs(target, changed_refs)
        if not relevant:
            continue  # nothing this target receives changed
        refs = deliverable_refs(
            target,
            [patient_ref, *(r for r in relevant if not r.startswith("Patient/")), provenance_ref],
        )
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


def enqueue_ehr_updates(
    session: AsyncSession,
    targets: Sequence[EhrTargetProfile],
    *,
    patient_id: str,
    refs: Sequence[str],
) -> list[Delivery]:
    """Add one delivery per enabled target of ``refs`` (``Type/id``) it receives: resources
    the gateway changed without an inbound message (a patient merge). Ordered with the
    patient's other deliveries (``ordering_key``), so an earlier create is sent first."""
    rows = []
    now = utcnow()
    for target in targets:
        relevant = deliverable_refs(target, refs)
        if not relevant:
            continue
        row = Delivery(
            kind="ehr",
            target=target.name,
            ordering_key=patient_id,
            inbound_message_id=None,
            resource_refs=relevant,
            available_at=now,
            created_at=now,
        )
        session.add(row)
        rows.append(row)
    return rows


async def narrow_to_profiles(
    session: AsyncSession, *, ids: Sequence[int], profiles: ProfileSet
) -> int:
    """Decide again what replayed EHR deliveries send: their ``resource_refs`` of the
    types their target receives now (a target no longer configured keeps its rows as
    they are; its deliveries wait). Flushes; returns how many rows changed."""
    if not ids:
        return 0
    rows = await session.scalars(
        select(Delivery).where(Delivery.id.in_(list(ids)), Delivery.kind == "ehr")
    )
    changed = 0
    for row in rows:
        target = profiles.ehr.get(row.target)
        if target is None:
            continue
        refs = deliverable_refs(target, row.resource_refs)
        if refs != list(row.resource_refs):
            row.resource_refs = refs
            changed += 1
    await session.flush()
    return changed
