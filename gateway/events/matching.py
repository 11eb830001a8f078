"""Finding the patient of a clinical event.

An event carries :class:`~mappers.events.PatientRef` s in priority order: identifiers
(``system|value``: our canonical ids, an EHR's MRN, a partner's own id) matched against
``patient_keys``, and Patient ids an EHR assigned to our patients, matched through
``remote_ids``. The first ref that matches wins. The other identifiers of the event are
then learned as keys of that patient (first come, first served), so an MRN that arrived
next to the EHR's Patient id, or a pharmacy's own id next to the MRN, finds the patient
by itself next time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import RemoteId
from gateway.fhir import repository as fhir_repo
from mappers.events import PatientRef


@dataclass(frozen=True)
class PatientMatch:
    """The result of :func:`match_patient`.

    Attributes:
        patient_id: the local Patient id, or None when nothing matched.
        matched_on: the ref that matched.
        tried: what was tried, without values (for the exceptions queue).
        conflicts: refs that point at another patient than the one chosen.
        learned: identifier keys newly registered for the patient.
    """

    patient_id: str | None
    matched_on: PatientRef | None
    tried: list[str]
    conflicts: list[PatientRef] = field(default_factory=list)
    learned: int = 0


async def _remote(session: AsyncSession, refs: Sequence[PatientRef]) -> dict[PatientRef, str]:
    wanted = [r for r in refs if r.kind == "remote_id" and r.target]
    if not wanted:
        return {}
    rows = await session.execute(
        select(RemoteId.target, RemoteId.remote_id, RemoteId.local_id).where(
            RemoteId.resource_type == "Patient",
            or_(
                *[and_(RemoteId.target == r.target, RemoteId.remote_id == r.value) for r in wanted]
            ),
        )
    )
    found: dict[tuple[str, str], str] = {(t, rid): lid for t, rid, lid in rows}
    return {
        r: found[(r.target or "", r.value)] for r in wanted if (r.target or "", r.value) in found
    }


async def match_patient(
    session: AsyncSession, refs: Sequence[PatientRef], *, learn: bool = True
) -> PatientMatch:
    """Find the local patient for ``refs`` (first match in order wins).

    Args:
        session: the caller's session (flushes when it learns keys).
        refs: the event's patient refs, in priority order.
        learn: register the event's other identifiers as keys of the matched patient.

    Returns:
        The :class:`PatientMatch` (``patient_id`` None when nothing matched).
    """
    keys = [r.key for r in refs if r.kind == "identifier"]
    by_key = await fhir_repo.patients_for_keys(session, keys)
    by_remote = await _remote(session, refs)
    resolved: dict[PatientRef, str] = {}
    for ref in refs:
        pid = by_key.get(ref.key) if ref.kind == "identifier" else by_remote.get(ref)
        if pid is not None:
            resolved[ref] = pid
    tried = [r.describe() for r in refs]
    chosen = next((r for r in refs if r in resolved), None)
    if chosen is None:
        return PatientMatch(None, None, tried)
    patient_id = resolved[chosen]
    conflicts = [r for r, pid in resolved.items() if pid != patient_id]
    learned = 0
    if learn:
        new_keys = [r.key for r in refs if r.kind == "identifier" and r.key not in by_key]
        if new_keys:
            await fhir_repo.add_patient_keys(session, patient_id, new_keys)
            learned = len(new_keys)
    return PatientMatch(patient_id, chosen, tried, conflicts, learned)
