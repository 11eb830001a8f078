"""Probable duplicate patients: scoring, the merge-review queue, and the merge itself.

**Scoring** (:func:`score`) compares two Patient resources element by element, each part
from 0 to 1, and weighs them (:data:`WEIGHTS`, summing to 1):

========== ====== =============================================================
element    weight how it compares
========== ====== =============================================================
name       0.35   family and given names normalized (accents, case, punctuation
                  dropped), Jaro-Winkler similarity (rapidfuzz); family and given
                  swapped count as well
birthDate  0.25   equal: 1; one digit typed wrong, or two adjacent digits or month
                  and day transposed: 0.8; otherwise 0
phone      0.15   the same digits (a leading US ``1`` ignored): 1, otherwise 0
email      0.15   the same address (case-insensitive): 1; the same domain and a
                  local part with Jaro-Winkler >= 0.9: 0.5; otherwise 0
address    0.10   postal code equal and first line's Jaro-Winkler (normalized)
========== ====== =============================================================

An element missing on either side is left out and the weights of the others are scaled
to sum to 1; without a name and a birth date on both sides there is no score at all.
A pair scoring at least :data:`LINK_THRESHOLD` is linked (merged at once, recorded in
the queue as ``linked``); between :data:`REVIEW_THRESHOLD` and it, the pair waits in the
queue (``open``) for a person to accept or reject it.

**Merging** (:func:`gateway.ingest.patient_merge.merge_patients`), https://hl7.org/fhir/R4/patient.html#links: the
surviving Patient gets ``link`` ``replaces`` the other, the other ``link`` ``replaced-by``
the survivor and ``active: false``; every key of the other (identifiers, emails,
submissions) now finds the survivor, so later messages and events for either identifier
land on it; the resources and cases the gateway holds for the other are moved to the
survivor, their ``Patient/`` references rewritten. The caller sends the changed resources
to the EHRs (an outbox row per target).

Queue rows carry ids and scores, never names or values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler
from sqlalchemy import (
    ARRAY,
    Integer,
    Select,
    String,
    any_,
    bindparam,
    case,
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.identity_models import PatientFeatures
from gateway.db.models import FhirResource, PatientConflict, PatientReview, ReviewStatus
from gateway.db.types import utcnow
from mappers.patient_match import Features as Features
from mappers.patient_match import features as features

#: Element -> weight in the score (they sum to 1).
WEIGHTS: dict[str, float] = {
    "name": 0.35,
    "birthDate": 0.25,
    "phone": 0.15,
    "email": 0.15,
    "address": 0.10,
}
#: At or above: the same person, linked (merged) without review.
LINK_THRESHOLD = 0.97
#: At or above (and below :data:`LINK_THRESHOLD`): a probable duplicate, for review.
REVIEW_THRESHOLD = 0.80


@dataclass(frozen=True)
class Score:
    """A pair's score: ``total`` (0..1) and each element's part (0..1; missing ones
    absent)."""

    total: float
    parts: dict[str, float]


def _jw(a: str, b: str) -> float:
    return float(JaroWinkler.normalized_similarity(a, b))


def name_part(a: tuple[str, str], b: tuple[str, str]) -> float:
    """Jaro-Winkler of family and of given names, averaged; family and given swapped
    count too (the better of the two readings)."""
    straight = (_jw(a[0], b[0]) + _jw(a[1], b[1])) / 2
    swapped = (_jw(a[0], b[1]) + _jw(a[1], b[0])) / 2
    return max(straight, swapped)


def birth_date_part(a: str, b: str) -> float:
    """1 when equal; 0.8 for one digit wrong, two digits transposed, or month and day
    swapped; otherwise 0.

    >>> birth_date_part("1988-04-12", "1988-12-04"), birth_date_part("1988-04-12", "1988-04-21")
    (0.8, 0.8)
    """
    if a == b:
        return 1.0
    da, db = a.replace("-", ""), b.replace("-", "")
    if len(da) == len(db) == 8:
        if da[:4] == db[:4] and da[4:6] == db[6:8] and da[6:8] == db[4:6]:
            return 0.8
        if DamerauLevenshtein.distance(da, db) == 1:
            return 0.8
    return 0.0


def birth_date_variants(value: str) -> set[str]:
    """``value`` and every calendar date :func:`birth_date_part` scores 0.8 against it:
    one digit changed, two adjacent digits transposed, month and day swapped (about 50 of
    the 80 such strings are real dates; a stored ``birthDate`` is always one, so the
    others can match nothing).

    >>> sorted(birth_date_variants("1988-04-12"))[:3]
    ['0988-04-12', '1088-04-12', '1188-04-12']
    """
    out = {value}
    digits = value.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return out

    def fmt(d: str) -> str:
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"

    typos = {fmt(digits[:4] + digits[6:8] + digits[4:6])}
    for i in range(8):
        for c in "0123456789":
            typos.add(fmt(digits[:i] + c + digits[i + 1 :]))
        if i < 7:
            typos.add(fmt(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]))
    return out | {t for t in typos if _is_date(t)}


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def score(a: dict[str, Any], b: dict[str, Any]) -> Score | None:
    """The duplicate score of Patients ``a`` and ``b`` (see the module docstring), or
    None when either lacks a name or a birth date."""
    return score_features(features(a), features(b))


def _best_possible(name: float, birth: float) -> float:
    """The highest score a pair with these name and birth-date parts can reach: full
    weight for every other element (a part at 1 only raises a weighted mean below 1)."""
    rest = 1.0 - WEIGHTS["name"] - WEIGHTS["birthDate"]
    return round(WEIGHTS["name"] * name + WEIGHTS["birthDate"] * birth + rest, 4)


def may_reach_review(a: Features, names: tuple[str, str], birth_date: str) -> bool:
    """False when a candidate with these names and birth date cannot score
    :data:`REVIEW_THRESHOLD` against ``a`` even if every other element matched: the best
    it could score is the name and birth-date parts plus full weight for all the others
    (a part at 1 only raises a weighted mean that is below 1). Exact: nothing that
    :func:`score_features` would put at or above the threshold is skipped; it saves
    comparing the phones, emails and addresses of the many candidates that differ in name.
    """
    if a.names is None or not a.birth_date:
        return False
    best = _best_possible(name_part(a.names, names), birth_date_part(a.birth_date, birth_date))
    return best >= REVIEW_THRESHOLD


def _parts(a: Features, b: Features, name: float, birth: float) -> tuple[dict[str, float], float]:
    """The parts of a pair's score (``name`` and ``birth``: its name and birth-date parts,
    computed already) and the total, unrounded."""
    parts = {"name": name, "birthDate": birth}
    if a.phone and b.phone:
        parts["phone"] = 1.0 if a.phone == b.phone else 0.0
    if a.email and b.email:
        if a.email == b.email:
            parts["email"] = 1.0
        else:
            (la, _, ha), (lb, _, hb) = a.email.partition("@"), b.email.partition("@")
            parts["email"] = 0.5 if ha == hb and _jw(la, lb) >= 0.9 else 0.0
    if a.address and b.address:
        parts["address"] = (
            _jw(a.address[0], b.address[0])
            if a.address[1] and a.address[1] == b.address[1]
            else 0.0
        )
    weight = sum(WEIGHTS[k] for k in parts)
    return parts, sum(WEIGHTS[k] * v for k, v in parts.items()) / weight


def _score(parts: dict[str, float], total: float) -> Score:
    return Score(round(total, 4), {k: round(v, 4) for k, v in parts.items()})


def score_features(a: Features, b: Features) -> Score | None:
    """:func:`score` of two patients' :class:`Features`."""
    if a.names is None or b.names is None or not a.birth_date or not b.birth_date:
        return None
    name = name_part(a.names, b.names)
    return _score(*_parts(a, b, name, birth_date_part(a.birth_date, b.birth_date)))


# --------------------------------------------------------------------------- the queue


#: At most this many stored Patients are scored against a new one: those born on the
#: same date first, then on a typo of it, the most recently updated first. Real birth
#: dates spread thin (a million patients are about 30 per date), but a placeholder date
#: an old system used (``1900-01-01``) or synthetic test data can put thousands on one
#: date; without a cap every new patient would read and score them all,
#: and ingest would slow down with the square of the patients (docs/PERFORMANCE.md,
#: "Bulk import"). A probable duplicate beyond the cap is not proposed.
MAX_CANDIDATES = 200


def candidates_statement(
    birth_date: str, dialect: str = "sqlite"
) -> Select[str, str, str, str, str | None, str | None, str | None, str | None]:
    """The stored Patients a new patient born on ``birth_date`` (``YYYY-MM-DD``) is scored
    against: their ``patient_review_features`` rows (``patient_id``, ``family``,
    ``given``, ``birth_date``, ``phone``, ``email``, ``address_line``, ``postal_code``),
    active ones born on that date or a typo of it (:func:`birth_date_variants`), that
    date first, then the most recently updated, at most :data:`MAX_CANDIDATES`.

    Blocking: only a birth date that scores (equal, or one of its typo variants) can
    reach the review threshold (without it the other parts sum to 0.75), so the database
    filters on it through ``ix_patient_review_features_birth_date`` (migration 0021).
    The rows hold what :func:`score_features` compares, already normalized
    (:mod:`mappers.patient_match`): a candidate costs a few short columns and no JSON
    (until migration 0021 each was read from ``fhir_resources`` as JSON and normalized
    again for every new patient).

    On PostgreSQL (``dialect``) the dates are one array parameter (``= ANY(%s)``), so the
    statement's text is the same every time (an ``IN`` list of 80 parameters made a new
    text per call, which psycopg parsed and prepared again).
    """
    return _candidates(dialect).params(**_candidate_params(birth_date))


def _candidate_params(birth_date: str) -> dict[str, Any]:
    return {
        "birth_date": birth_date,
        "birth_dates": sorted(birth_date_variants(birth_date)),
        "max_candidates": MAX_CANDIDATES,
    }


_CANDIDATES: dict[str, Any] = {}


def _candidates(
    dialect: str,
) -> Select[str, str, str, str, str | None, str | None, str | None, str | None]:
    """The statement of :func:`candidates_statement` with its parameters unbound
    (``birth_date``, ``birth_dates``, ``max_candidates``), built once per dialect."""
    found = _CANDIDATES.get(dialect)
    if found is not None:
        return found  # type: ignore[no-any-return]
    f = PatientFeatures
    if dialect == "postgresql":
        one_of = f.birth_date == any_(bindparam("birth_dates", type_=ARRAY(String())))
    else:
        one_of = f.birth_date.in_(bindparam("birth_dates", expanding=True))
    statement = (
        select(
            f.patient_id,
            f.family,
            f.given,
            f.birth_date,
            f.phone,
            f.email,
            f.address_line,
            f.postal_code,
        )
        .where(one_of, f.active)
        .order_by(case((f.birth_date == bindparam("birth_date", type_=String()), 0), else_=1))
        .order_by(f.updated_at.desc())
        .limit(bindparam("max_candidates", type_=Integer()))
    )
    _CANDIDATES[dialect] = statement
    return statement


async def detect_duplicates(session: AsyncSession, patient: dict[str, Any]) -> list[PatientReview]:
    """Score a newly registered ``patient`` against every active stored Patient and add a
    queue row for each pair at or above :data:`REVIEW_THRESHOLD` (``linked`` at or above
    :data:`LINK_THRESHOLD`: the caller merges it), best first. Flushes.

    The candidates are read by birth date (:func:`candidates_statement`); it runs once per
    new patient with a name and a birth date, not per message.
    """
    mine = features(patient)
    if mine.names is None or not mine.birth_date:
        return []  # nothing to score on (a checkout's patient has no birth date)
    dialect = session.get_bind().dialect.name
    rows = await session.execute(_candidates(dialect), _candidate_params(mine.birth_date))
    found: list[tuple[Score, str]] = []
    for row_id, family, given, born, phone, email, line, postal in rows:
        name = name_part(mine.names, (family, given))
        birth = birth_date_part(mine.birth_date, born)
        if row_id == patient["id"] or _best_possible(name, birth) < REVIEW_THRESHOLD:
            continue  # may_reach_review
        theirs = Features(
            names=(family, given),
            birth_date=born,
            phone=phone,
            email=email,
            address=(line or "", postal or "") if line is not None or postal is not None else None,
        )
        parts, total = _parts(mine, theirs, name, birth)
        if round(total, 4) >= REVIEW_THRESHOLD:
            found.append((_score(parts, total), row_id))
    found.sort(key=lambda item: -item[0].total)
    reviews = []
    for s, candidate in found:
        status = ReviewStatus.LINKED if s.total >= LINK_THRESHOLD else ReviewStatus.OPEN
        review = PatientReview(
            patient_id=patient["id"],
            candidate_id=candidate,
            score=s.total,
            parts=s.parts,
            status=status,
            created_at=utcnow(),
        )
        session.add(review)
        reviews.append(review)
    await session.flush()
    return reviews


async def fill_review_features(
    session: AsyncSession, *, page: int = 1000, rebuild: bool = False
) -> int:
    """Write the ``patient_review_features`` rows of stored Patients: those that have
    none (registered by a process of a release before migration 0021 during a rolling
    deploy), or with ``rebuild`` every Patient's (recomputed from its current version:
    after such a process also updated Patients). A row is written only over an older one
    (a live write meanwhile wins). Commits every ``page`` Patients.

    Returns:
        How many Patients' rows were computed (each written unless the stored row was
        from a newer version).
    """
    upsert = PatientFeatures.upsert(session.get_bind().dialect.name, newer_only=True)
    last, written = "", 0
    while True:
        query = (
            select(FhirResource.id, FhirResource.resource, FhirResource.updated_at)
            .where(FhirResource.resource_type == "Patient", FhirResource.id > last)
            .order_by(FhirResource.id)
            .limit(page)
        )
        if not rebuild:
            query = query.outerjoin(
                PatientFeatures, PatientFeatures.patient_id == FhirResource.id
            ).where(PatientFeatures.patient_id.is_(None))
        rows = (await session.execute(query)).all()
        if not rows:
            return written
        last = rows[-1][0]
        values = [
            v for v in (PatientFeatures.row_of(r, now=at) for _, r, at in rows) if v is not None
        ]
        if values:
            await session.execute(upsert, values)
        await session.commit()
        written += len(values)


async def list_reviews(
    session: AsyncSession, *, status: str | None, limit: int, after_id: int | None = None
) -> list[PatientReview]:
    """Queue rows, oldest first, of ``status`` (None: any), after ``after_id``."""
    stmt = select(PatientReview).order_by(PatientReview.id).limit(limit)
    if status is not None:
        stmt = stmt.where(PatientReview.status == status)
    if after_id is not None:
        stmt = stmt.where(PatientReview.id > after_id)
    return list(await session.scalars(stmt))


async def get_review(session: AsyncSession, review_id: int) -> PatientReview | None:
    """One queue row, or None."""
    return await session.get(PatientReview, review_id)


async def conflicts_of(
    session: AsyncSession, patient_ids: Sequence[str]
) -> dict[str, list[PatientConflict]]:
    """The recorded element conflicts of ``patient_ids`` (ownership merge), by patient."""
    out: dict[str, list[PatientConflict]] = {p: [] for p in patient_ids}
    if not patient_ids:
        return out
    rows = await session.scalars(
        select(PatientConflict)
        .where(PatientConflict.patient_id.in_(list(patient_ids)))
        .order_by(PatientConflict.id)
    )
    for row in rows:
        out[row.patient_id].append(row)
    return out


async def conflicted_patients(session: AsyncSession, *, limit: int) -> list[str]:
    """Patients with recorded element conflicts, the most recent conflict first."""
    latest = func.max(PatientConflict.id)
    rows = await session.execute(
        select(PatientConflict.patient_id, latest)
        .group_by(PatientConflict.patient_id)
        .order_by(latest.desc())
        .limit(limit)
    )
    return [pid for pid, _ in rows]


def decide(review: PatientReview, *, status: ReviewStatus, reason: str, by: str) -> None:
    """Record a person's decision on a queue row."""
    review.status = status
    review.reason = reason
    review.decided_by = by[:128]
    review.decided_at = utcnow()
