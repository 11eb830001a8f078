"""The one Patient merge by ownership, and what it leaves in the database.

A message's Patient is merged into the stored one element by element
(:func:`mappers.patient.merge_patient`): the source that owns an element (the profile's
``patient.owns``) replaces its value, another source only fills what is missing, and a
disagreement is a conflict, kept in ``patient_conflicts`` with the losing value and named
(ids and codes only) in the Provenance. Who set each element is kept in
``patient_element_sources`` for the next merge.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.bulk import BulkInserts
from gateway.patients import repository as repo
from gateway.patients.matching import PatientMatch
from mappers.patient import ElementConflict, Source, element_sources, merge_patient


@dataclass(frozen=True)
class MergedPatient:
    """The Patient to store, its conflicts, and who set each element."""

    patient: dict[str, Any]
    conflicts: list[ElementConflict]
    sources: dict[str, str]


async def merge_into_match(
    session: AsyncSession,
    match: PatientMatch,
    incoming: dict[str, Any],
    *,
    source: Source,
    owns: Collection[str],
) -> MergedPatient:
    """``incoming`` merged into the matched Patient by ownership (as it is when the
    patient is new).

    Args:
        session: reads the element sources of the stored Patient.
        match: the message's patient (:func:`~gateway.patients.matching.match_or_register`).
        incoming: the Patient the message maps to (same id as the match).
        source: the message's source (``intake``, ``checkout``).
        owns: the elements that source owns.
    """
    if not match.existing or match.patient_id is None:
        return MergedPatient(incoming, [], element_sources(incoming, source))
    known = await repo.element_sources(session, match.patient_id)
    result = merge_patient(match.existing, incoming, source=source, owns=set(owns), sources=known)
    return MergedPatient(result.patient, result.conflicts, result.sources)


async def save_patient_facts(
    session: AsyncSession,
    match: PatientMatch,
    merged: MergedPatient,
    *,
    message_id: str,
    bulk: BulkInserts,
) -> None:
    """Record who set each element of the stored Patient and register its identifiers as
    keys (those it has not got yet; a key of another patient stays with it).

    Args:
        session: the caller's session.
        match: the message's patient.
        merged: the Patient as stored.
        message_id: the message that set them.
        bulk: new element-source rows are queued here.
    """
    assert match.patient_id is not None  # an intake or checkout always has its patient
    if merged.sources:
        await repo.save_element_sources(
            session,
            match.patient_id,
            merged.sources,
            message_id=message_id,
            new_patient=match.new,
            bulk=bulk,
        )
    missing = set(repo.identifier_keys(merged.patient)) - match.keys
    if missing:
        match.keys |= await repo.claim_keys(session, match.patient_id, missing)
