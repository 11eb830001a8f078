"""Queries for the profile domain: profile mappings, Patient conflicts and element sources,
derived resources of a submission, and what a message produced."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.bulk import BulkInserts
from gateway.db.models import (
    FhirResource,
    FhirResourceVersion,
    PatientConflict,
    PatientElementSource,
    ProfileMapping,
)
from gateway.db.types import utcnow
from mappers.patient import ElementConflict


async def element_sources(session: AsyncSession, patient_id: str) -> dict[str, str]:
    """Patient element -> the source that set its current value."""
    rows = await session.scalars(
        select(PatientElementSource).where(PatientElementSource.patient_id == patient_id)
    )
    return {r.element: r.source for r in rows}


async def save_element_sources(
    session: AsyncSession,
    patient_id: str,
    sources: dict[str, str],
    *,
    message_id: str,
    new_patient: bool = False,
    bulk: BulkInserts | None = None,
) -> None:
    """Record who set each element (rows whose source changed are updated).

    Args:
        new_patient: the Patient is created in this transaction, so it has no rows yet
            (nothing is looked up).
        bulk: queue new rows here (the caller inserts them in bulk).
    """
    rows = (
        {}
        if new_patient
        else {
            r.element: r
            for r in await session.scalars(
                select(PatientElementSource).where(PatientElementSource.patient_id == patient_id)
            )
        }
    )
    now = utcnow()
    for element, source in sources.items():
        row = rows.get(element)
        if row is None:
            values = {
                "patient_id": patient_id,
                "element": element,
                "source": source,
                "inbound_message_id": message_id,
                "updated_at": now,
            }
            if bulk is not None:
                bulk.add(PatientElementSource, **values)
            else:
                session.add(PatientElementSource(**values))
        elif row.source != source:
            row.source = source
            row.inbound_message_id = message_id
            row.updated_at = now


async def add_conflicts(
    session: AsyncSession,
    patient_id: str,
    conflicts: Iterable[ElementConflict],
    *,
    message_id: str,
) -> list[PatientConflict]:
    """Keep each conflict with its losing value; flushed so the rows have ids."""
    rows = [
        PatientConflict(
            patient_id=patient_id,
            inbound_message_id=message_id,
            element=c.element,
            outcome=c.outcome,
            kept_source=c.kept_source,
            lost_source=c.lost_source,
            lost_value={"value": c.lost_value},
            created_at=utcnow(),
        )
        for c in conflicts
    ]
    session.add_all(rows)
    if rows:
        await session.flush()
    return rows


async def conflicts_for(session: AsyncSession, patient_id: str) -> list[PatientConflict]:
    """Every recorded conflict of a patient, oldest first."""
    rows = await session.scalars(
        select(PatientConflict)
        .where(PatientConflict.patient_id == patient_id)
        .order_by(PatientConflict.id)
    )
    return list(rows)


def record_mapping(
    session: AsyncSession,
    *,
    message_id: str,
    action: str,
    profile_kind: str,
    profile_id: str,
    profile_version: str,
    profile_hash: str,
    resource_versions: list[str],
    attribution: dict[str, Any] | None,
    actor: str,
) -> ProfileMapping:
    """Add the profile-mapping row of one ingest or re-map."""
    row = ProfileMapping(
        inbound_message_id=message_id,
        action=action,
        profile_kind=profile_kind,
        profile_id=profile_id,
        profile_version=profile_version,
        profile_hash=profile_hash,
        resource_versions=resource_versions,
        attribution=attribution,
        actor=actor,
        created_at=utcnow(),
    )
    session.add(row)
    return row


async def mappings_for(session: AsyncSession, message_id: str) -> list[ProfileMapping]:
    """The profile mappings of a message, oldest first."""
    rows = await session.scalars(
        select(ProfileMapping)
        .where(ProfileMapping.inbound_message_id == message_id)
        .order_by(ProfileMapping.id)
    )
    return list(rows)


async def resources_with_identifier_prefix(
    session: AsyncSession, systems: Iterable[str], prefix: str
) -> list[FhirResource]:
    """Stored resources whose business identifier is ``<system>|<prefix>...``."""
    rows = await session.scalars(
        select(FhirResource).where(
            FhirResource.identifier_system.in_(list(systems)),
            FhirResource.identifier_value.startswith(prefix, autoescape=True),
        )
    )
    return list(rows)


async def produced_by(session: AsyncSession, message_id: str) -> list[FhirResource]:
    """The current rows of every resource a message wrote a version of (Provenance last)."""
    keys = (
        await session.execute(
            select(
                FhirResourceVersion.resource_type,
                FhirResourceVersion.id,
                func.min(FhirResourceVersion.version_id),
            )
            .where(FhirResourceVersion.inbound_message_id == message_id)
            .group_by(FhirResourceVersion.resource_type, FhirResourceVersion.id)
        )
    ).all()
    rows = []
    for rtype, rid, _ in keys:
        row = await session.get(FhirResource, (rtype, rid))
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda r: (r.resource_type == "Provenance", r.created_at, r.resource_type))
    return rows
