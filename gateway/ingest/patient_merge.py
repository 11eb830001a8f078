"""Merging two stored Patients (a merge-review decision or a link on ingest,
:mod:`gateway.patients.review`), https://hl7.org/fhir/R4/patient.html#links.

Here, not in :mod:`gateway.patients`, because it writes FHIR resource versions
(:func:`gateway.fhir.repository.save_resource`), which the shared-services floor may not
import (the ``gateway`` packages must not import each other in a cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Case, FhirResource, PatientConflict, PatientKey
from gateway.fhir import repository as fhir_repo


class MergeError(ValueError):
    """A merge that cannot be done: a Patient missing or already merged."""


def _with_link(resource: dict[str, Any], other: str, kind: str) -> dict[str, Any]:
    out = dict(resource)
    links = [lk for lk in out.get("link") or [] if lk.get("other", {}).get("reference") != other]
    out["link"] = [{"other": {"reference": other}, "type": kind}, *links]  # newest first
    return out


def _rewrite(value: Any, old: str, new: str) -> Any:
    """``value`` with every ``reference`` equal to ``old`` set to ``new``."""
    if isinstance(value, dict):
        return {
            k: (new if k == "reference" and v == old else _rewrite(v, old, new))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite(v, old, new) for v in value]
    return value


@dataclass(frozen=True)
class Merged:
    """A merge's result: the references whose resources changed (to send to the EHRs),
    the survivor first."""

    survivor_id: str
    merged_id: str
    changed_refs: list[str]


async def merge_patients(session: AsyncSession, *, survivor_id: str, merged_id: str) -> Merged:
    """Merge Patient ``merged_id`` into ``survivor_id``. Flushes.

    The survivor gets ``link`` ``replaces`` the other, the other ``link`` ``replaced-by``
    the survivor and ``active: false``; every key of the other (identifiers, emails,
    submissions) now finds the survivor, so later messages and events for either
    identifier land on it; the resources, cases and element conflicts the gateway holds
    for the other move to the survivor, their ``Patient/`` references rewritten. The
    caller sends ``changed_refs`` to the EHRs (an outbox row per target).

    Raises:
        MergeError: either Patient is unknown, they are the same, or one was merged
            already.
    """
    if survivor_id == merged_id:
        raise MergeError("a patient cannot be merged into itself")
    survivor = await session.get(FhirResource, ("Patient", survivor_id))
    merged = await session.get(FhirResource, ("Patient", merged_id))
    if survivor is None or merged is None:
        raise MergeError("both patients must be stored")
    if survivor.resource.get("active") is False or merged.resource.get("active") is False:
        raise MergeError("a patient that was merged already cannot be merged again")
    old_ref, new_ref = f"Patient/{merged_id}", f"Patient/{survivor_id}"
    changed = [new_ref, old_ref]
    await fhir_repo.save_resource(
        session,
        _with_link(survivor.resource, old_ref, "replaces"),
        message_id=None,
        patient_id=survivor_id,
        current=survivor,
    )
    retired = _with_link(merged.resource, new_ref, "replaced-by")
    retired["active"] = False
    await fhir_repo.save_resource(
        session, retired, message_id=None, patient_id=merged_id, current=merged
    )
    owned = await session.scalars(
        select(FhirResource).where(
            FhirResource.patient_id == merged_id, FhirResource.resource_type != "Patient"
        )
    )
    for row in list(owned):
        rewritten = _rewrite(row.resource, old_ref, new_ref)
        _, did_change = await fhir_repo.save_resource(
            session, rewritten, message_id=None, patient_id=survivor_id, current=row
        )
        row.patient_id = survivor_id
        if did_change:
            changed.append(f"{row.resource_type}/{row.id}")
    # Every key of the merged patient now finds the survivor (later messages and events
    # for either identifier land on it).
    await session.execute(
        update(PatientKey)
        .where(PatientKey.patient_id == merged_id)
        .values(patient_id=survivor_id)
        .execution_options(synchronize_session=False)
    )
    await session.execute(
        update(Case)
        .where(Case.patient_id == merged_id)
        .values(patient_id=survivor_id)
        .execution_options(synchronize_session=False)
    )
    await session.execute(
        update(PatientConflict)
        .where(PatientConflict.patient_id == merged_id)
        .values(patient_id=survivor_id)
        .execution_options(synchronize_session=False)
    )
    await session.flush()
    return Merged(survivor_id, merged_id, changed)
