"""Queries on what the gateway knows of its patients: the matching keys
(``patient_keys``), the EHRs' ids for them (``remote_ids``), who set each Patient element
(``patient_element_sources``) and the conflicts of the ownership merge
(``patient_conflicts``).

Keys are ``(key_type, key_value)`` pairs: ``("identifier", "system|value")``,
``("submission", id)`` or ``("email", address)`` (:attr:`mappers.events.PatientRef.key`).
A key belongs to the first patient that registers it: every insert is ``INSERT ... ON
CONFLICT DO NOTHING``, so two messages registering one key at once are settled by the
database's unique key, never by a look-up before the insert.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sqlalchemy import Select, and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.bulk import BulkInserts, insert_ignore
from gateway.db.models import (
    FhirResource,
    PatientConflict,
    PatientElementSource,
    PatientKey,
    RemoteId,
)
from gateway.db.types import utcnow
from mappers.events import PatientRef
from mappers.patient import ElementConflict

Key = tuple[str, str]


# --------------------------------------------------------------------------- keys


async def patients_for_keys(session: AsyncSession, keys: Iterable[Key]) -> dict[Key, str]:
    """``key -> patient_id`` for the keys that are known."""
    wanted = list(keys)
    if not wanted:
        return {}
    rows = await session.scalars(patient_key_lookup(wanted))
    return {(r.key_type, r.key_value): r.patient_id for r in rows}


def patient_key_lookup(keys: Sequence[Key]) -> Select[PatientKey]:
    """The query for the ``patient_keys`` rows of ``keys`` (at least one): an OR of
    unique-key lookups, not a row-value IN, because SQLite scans the whole table for
    ``(a, b) IN (VALUES ...)`` but searches the primary key for each OR term."""
    return select(PatientKey).where(
        or_(
            *(
                and_(PatientKey.key_type == kind, PatientKey.key_value == value)
                for kind, value in keys
            )
        )
    )


async def claim_keys(session: AsyncSession, patient_id: str, keys: Iterable[Key]) -> set[Key]:
    """Register ``keys`` for ``patient_id`` where no patient has them yet.

    One ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, keys in sorted order (two
    transactions claiming overlapping keys lock them in the same order, so they cannot
    deadlock). On PostgreSQL a key another transaction is inserting makes this one wait
    for that transaction: then the key is theirs.

    Returns:
        The keys registered now (the others belong to a patient already).
    """
    wanted = sorted(set(keys))
    if not wanted:
        return set()
    now = utcnow()
    stmt = (
        insert_ignore(session, PatientKey)
        .values(
            [
                {"key_type": t, "key_value": v, "patient_id": patient_id, "created_at": now}
                for t, v in wanted
            ]
        )
        .on_conflict_do_nothing(index_elements=["key_type", "key_value"])
        .returning(PatientKey.key_type, PatientKey.key_value)
    )
    return {(t, v) for t, v in (await session.execute(stmt)).all()}


async def move_keys(
    session: AsyncSession, *, from_patient: str, to_patient: str, drop: Key
) -> None:
    """Give the keys of ``from_patient`` (a tentative new patient that turned out to be an
    existing one) to ``to_patient``, except ``drop`` (its own id), which is deleted."""
    await session.execute(
        delete(PatientKey).where(
            PatientKey.key_type == drop[0],
            PatientKey.key_value == drop[1],
            PatientKey.patient_id == from_patient,
        )
    )
    await session.execute(
        update(PatientKey)
        .where(PatientKey.patient_id == from_patient)
        .values(patient_id=to_patient)
        .execution_options(synchronize_session=False)
    )


def identifier_keys(resource: dict[str, Any]) -> list[Key]:
    """``("identifier", "system|value")`` for each identifier of a Patient."""
    return [
        ("identifier", f"{i['system']}|{i['value']}")
        for i in resource.get("identifier", [])
        if i.get("system") and i.get("value")
    ]


async def patients_for_remote_ids(
    session: AsyncSession, refs: Sequence[PatientRef]
) -> dict[PatientRef, str]:
    """``ref -> patient_id`` for the ``remote_id`` refs an EHR assigned to our patients;
    for a merged Patient, its survivor."""
    wanted = [r for r in refs if r.kind == "remote_id" and r.target]
    if not wanted:
        return {}
    # A merged Patient's newest link (link[0], ``replaced-by``) names its survivor: the
    # EHR's id of the merged record finds the survivor, in the same statement.
    link_type = FhirResource.resource[("link", 0, "type")].as_string()
    link_to = FhirResource.resource[("link", 0, "other", "reference")].as_string()
    rows = await session.execute(
        select(RemoteId.target, RemoteId.remote_id, RemoteId.local_id, link_type, link_to)
        .outerjoin(
            FhirResource,
            and_(FhirResource.resource_type == "Patient", FhirResource.id == RemoteId.local_id),
        )
        .where(
            RemoteId.resource_type == "Patient",
            or_(
                *[and_(RemoteId.target == r.target, RemoteId.remote_id == r.value) for r in wanted]
            ),
        )
    )
    found: dict[tuple[str, str], str] = {}
    for t, rid, lid, kind, to in rows:
        survivor = to.removeprefix("Patient/") if kind == "replaced-by" and to else None
        found[(t, rid)] = survivor or lid
    return {
        r: found[(r.target or "", r.value)] for r in wanted if (r.target or "", r.value) in found
    }


async def get_patient_row(
    session: AsyncSession, patient_id: str, *, lock: bool = False
) -> FhirResource | None:
    """The stored Patient, or None.

    Args:
        lock: on PostgreSQL, ``SELECT ... FOR UPDATE``: two messages for one patient are
            stored one after the other (the second reads what the first wrote), instead
            of both writing the same next version.
    """
    if not lock or session.bind is None or session.bind.dialect.name != "postgresql":
        return await session.get(FhirResource, ("Patient", patient_id))
    return await session.scalar(
        select(FhirResource)
        .where(FhirResource.resource_type == "Patient", FhirResource.id == patient_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


# --------------------------------------------------------------------------- element sources


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


# --------------------------------------------------------------------------- conflicts


async def add_conflicts(
    session: AsyncSession,
    patient_id: str,
    conflicts: Collection[ElementConflict],
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
