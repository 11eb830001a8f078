"""Deciding the patient merge-review queue (:mod:`gateway.patients.review`): accept (merge
the pair) or reject, one service for ``/v1/patients/review`` and the console.

Errors: :class:`~gateway.errors.NotFoundError` (no such entry),
:class:`~gateway.errors.ConflictError` (not open; a survivor outside the pair; a merge
that cannot be done).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.db.models import Delivery, PatientReview, ReviewStatus
from gateway.delivery.outbox import enqueue_ehr_updates
from gateway.errors import ConflictError, NotFoundError
from gateway.ingest import patient_merge
from gateway.patients import review as reviews
from mappers.profiles.loader import ProfileSet


async def open_review_or_raise(session: AsyncSession, review_id: int) -> PatientReview:
    """The open queue entry ``review_id``.

    Raises:
        NotFoundError: no such entry.
        ConflictError: it is decided already.
    """
    row = await reviews.get_review(session, review_id)
    if row is None:
        raise NotFoundError(f"review {review_id} is not known")
    if row.status != ReviewStatus.OPEN:
        raise ConflictError(f"review {review_id} is {row.status}, not open")
    return row


@dataclass(frozen=True)
class Accepted:
    """A merged pair: who survived, who was merged, the updates queued for the EHRs."""

    survivor_id: str
    merged_id: str
    deliveries: list[Delivery]


async def accept_review(
    session: AsyncSession,
    row: PatientReview,
    *,
    profiles: ProfileSet,
    survivor_id: str | None,
    reason: str,
    by: str,
) -> Accepted:
    """Merge the pair (the older record, the candidate, survives unless ``survivor_id``
    says otherwise), record the decision, queue the changed resources for every enabled
    EHR target, and audit both patients. Flushes.

    Raises:
        ConflictError: ``survivor_id`` is not one of the pair, or the merge cannot be done.
    """
    survivor = survivor_id or row.candidate_id
    if survivor not in (row.patient_id, row.candidate_id):
        raise ConflictError("survivor_id must be one of the pair")
    merged_id = row.patient_id if survivor == row.candidate_id else row.candidate_id
    try:
        merged = await patient_merge.merge_patients(
            session, survivor_id=survivor, merged_id=merged_id
        )
    except patient_merge.MergeError as exc:
        raise ConflictError(str(exc)) from exc
    reviews.decide(row, status=ReviewStatus.ACCEPTED, reason=reason, by=by)
    deliveries = enqueue_ehr_updates(
        session, profiles.enabled_targets(), patient_id=survivor, refs=merged.changed_refs
    )
    await session.flush()
    for pid in (survivor, merged_id):
        audit.record(
            session,
            action="update",
            entity_type="Patient",
            entity_id=pid,
            patient_id=pid,
            detail={"review": row.id, "merge": "survivor" if pid == survivor else "merged"},
        )
    return Accepted(survivor, merged_id, list(deliveries))


def reject_review(session: AsyncSession, row: PatientReview, *, reason: str, by: str) -> None:
    """Record that the pair are different people (not proposed again); audited."""
    reviews.decide(row, status=ReviewStatus.REJECTED, reason=reason, by=by)
    audit.record(
        session,
        action="resolve",
        entity_type="PatientReview",
        entity_id=str(row.id),
        patient_id=row.patient_id,
    )
