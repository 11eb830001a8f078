"""``/v1/patients/review``: the merge-review queue of probable duplicate patients
(:mod:`gateway.patients.review`), with the element conflicts recorded for each patient.

* ``GET /v1/patients/review`` (``ops:read``): queue entries, oldest first (``status``
  ``open`` by default), each pair with its score and per-element parts, and the element
  conflicts of each patient (element, outcome, sources: never values);
* ``POST /v1/patients/review/{id}/accept`` (``ops:admin``, a reason): merge the pair
  (the older record survives unless ``survivor_id`` says otherwise), and send the
  changed resources to every EHR target through the outbox;
* ``POST /v1/patients/review/{id}/reject`` (``ops:admin``, a reason): not the same
  person; the pair is not proposed again.

Errors are RFC 9457 problems: 404 unknown entry, 409 an entry already decided or a merge
that cannot be done.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.db.models import PatientConflict, PatientReview
from gateway.deps import NO_NUL, RowIdPath, RowIdQuery, RuntimeDep, SessionDep, require_scope
from gateway.patients import review as reviews
from gateway.triage import reviews as decisions

router = APIRouter(prefix="/v1/patients", tags=["patients"])


class ConflictOut(BaseModel):
    """An element conflict recorded when two sources disagreed on a Patient element."""

    id: int
    element: str
    outcome: str
    kept_source: str
    lost_source: str
    created_at: datetime


class PatientSide(BaseModel):
    """One patient of a pair: its id, reference and recorded conflicts."""

    id: str
    reference: str
    conflicts: list[ConflictOut]


class ReviewOut(BaseModel):
    """A queue entry: the pair, the score and its parts, and the decision."""

    id: int
    status: str
    score: float
    parts: dict[str, float]
    patient: PatientSide
    candidate: PatientSide
    reason: str | None
    decided_by: str | None
    created_at: datetime
    decided_at: datetime | None
    deliveries: list[dict[str, Any]] = Field(default_factory=list)


class ReviewPage(BaseModel):
    """A page of the queue (``next_after_id`` continues it), and the patients with
    recorded element conflicts (most recent first, at most ``limit``)."""

    items: list[ReviewOut]
    next_after_id: int | None
    conflicts: list[PatientSide] = Field(default_factory=list)


class DecisionIn(BaseModel):
    """Why the pair is (not) the same person."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=1000, pattern=NO_NUL)


class AcceptIn(DecisionIn):
    """Accepting a pair: the reason, and which Patient survives (default: the older
    record, the candidate)."""

    survivor_id: str | None = Field(default=None, max_length=64, pattern=NO_NUL)


def _conflict(row: PatientConflict) -> ConflictOut:
    return ConflictOut(
        id=row.id,
        element=row.element,
        outcome=row.outcome,
        kept_source=row.kept_source,
        lost_source=row.lost_source,
        created_at=row.created_at,
    )


def _out(
    row: PatientReview,
    conflicts: dict[str, list[PatientConflict]],
    deliveries: list[dict[str, Any]] | None = None,
) -> ReviewOut:
    def side(pid: str) -> PatientSide:
        return PatientSide(
            id=pid,
            reference=f"Patient/{pid}",
            conflicts=[_conflict(c) for c in conflicts.get(pid, [])],
        )

    return ReviewOut(
        id=row.id,
        status=row.status,
        score=row.score,
        parts=row.parts,
        patient=side(row.patient_id),
        candidate=side(row.candidate_id),
        reason=row.reason,
        decided_by=row.decided_by,
        created_at=row.created_at,
        decided_at=row.decided_at,
        deliveries=deliveries or [],
    )


@router.get("/review", response_model=ReviewPage, summary="The patient merge-review queue")
async def list_reviews(
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
    status: Annotated[
        Literal["open", "accepted", "rejected", "linked", "any"],
        Query(description="open (default), accepted, rejected, linked or any"),
    ] = "open",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after_id: RowIdQuery = None,
) -> ReviewPage:
    """Probable duplicates with their scores and each patient's recorded element
    conflicts, oldest first; and the patients with recorded element conflicts (an
    intake and an EHR disagreeing on a birth date...), most recent first. Audited (a read
    of each patient listed)."""
    rows = await reviews.list_reviews(
        session, status=None if status == "any" else status, limit=limit, after_id=after_id
    )
    conflicted = await reviews.conflicted_patients(session, limit=limit)
    ids = sorted({p for r in rows for p in (r.patient_id, r.candidate_id)} | set(conflicted))
    conflicts = await reviews.conflicts_of(session, ids)
    hits: list[tuple[str, str | None]] = [
        (str(r.id), p) for r in rows for p in (r.patient_id, r.candidate_id)
    ]
    hits += [("conflicts", p) for p in conflicted]
    audit.record_patients(session, action="read", entity_type="PatientReview", hits=hits)
    return ReviewPage(
        items=[_out(r, conflicts) for r in rows],
        next_after_id=rows[-1].id if len(rows) == limit else None,
        conflicts=[
            PatientSide(
                id=pid,
                reference=f"Patient/{pid}",
                conflicts=[_conflict(c) for c in conflicts[pid]],
            )
            for pid in conflicted
        ],
    )


@router.post(
    "/review/{review_id}/accept",
    response_model=ReviewOut,
    summary="Accept a probable duplicate: merge the two patients",
    responses={404: {}, 409: {}},
)
async def accept_review(
    review_id: RowIdPath,
    body: AcceptIn,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> ReviewOut:
    """Merge the pair: the survivor gets ``link`` ``replaces``, the other ``replaced-by``
    and ``active: false``; keys, resources, cases and conflicts move to the survivor; the
    changed resources go to each EHR target (outbox). 409 when the entry is not open or
    ``survivor_id`` is not one of the pair."""
    row = await decisions.open_review_or_raise(session, review_id)
    accepted = await decisions.accept_review(
        session,
        row,
        profiles=runtime.profiles.current,
        survivor_id=body.survivor_id,
        reason=body.reason,
        by=principal.label,
    )
    conflicts = await reviews.conflicts_of(session, [row.patient_id, row.candidate_id])
    return _out(row, conflicts, [{"id": d.id, "target": d.target} for d in accepted.deliveries])


@router.post(
    "/review/{review_id}/reject",
    response_model=ReviewOut,
    summary="Reject a probable duplicate: not the same person",
    responses={404: {}, 409: {}},
)
async def reject_review(
    review_id: RowIdPath,
    body: DecisionIn,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> ReviewOut:
    """Record that the pair are different people (409 when the entry is not open)."""
    row = await decisions.open_review_or_raise(session, review_id)
    decisions.reject_review(session, row, reason=body.reason, by=principal.label)
    conflicts = await reviews.conflicts_of(session, [row.patient_id, row.candidate_id])
    return _out(row, conflicts)
