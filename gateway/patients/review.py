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

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler
from sqlalchemy import ARRAY, Select, String, any_, bindparam, case, func, literal_column, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import FhirResource, PatientConflict, PatientReview, ReviewStatus
from gateway.db.types import json_text, utcnow

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


def _norm(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    letters = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return re.sub(r"[^a-z0-9 ]+", "", letters).strip()


def _names(patient: dict[str, Any]) -> tuple[str, str] | None:
    for name in patient.get("name") or []:
        family = _norm(name.get("family") or "")
        given = _norm(" ".join(name.get("given") or []))
        if family or given:
            return family, given
    return None


#: An email the review can compare: something@domain.tld.
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def _telecom(patient: dict[str, Any], system: str) -> str | None:
    """The first usable phone or email of ``patient``. A placeholder an old system kept
    and a bulk import carried over as exported (``n/a``, ``000-000-0000``: shared by
    many patients) is skipped: it would score unrelated patients as duplicates."""
    for cp in patient.get("telecom") or []:
        if cp.get("system") == system and cp.get("value"):
            value = str(cp["value"])
            if system == "phone":
                digits = _digits(value)
                if len(digits) < 10 or len(set(digits[-7:])) == 1:
                    continue
            elif system == "email" and not _EMAIL.fullmatch(value.strip()):
                continue
            return value
    return None


def _digits(phone: str) -> str:
    digits = re.sub(r"\D", "", phone)
    return digits[1:] if len(digits) == 11 and digits.startswith("1") else digits


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
    """``value`` and every birth date :func:`birth_date_part` scores 0.8 against it: one
    digit changed, two adjacent digits transposed, month and day swapped (about 80).

    >>> sorted(birth_date_variants("1988-04-12"))[:3]
    ['0988-04-12', '1088-04-12', '1188-04-12']
    """
    out = {value}
    digits = value.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return out

    def fmt(d: str) -> str:
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"

    out.add(fmt(digits[:4] + digits[6:8] + digits[4:6]))
    for i in range(8):
        for c in "0123456789":
            out.add(fmt(digits[:i] + c + digits[i + 1 :]))
        if i < 7:
            out.add(fmt(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]))
    return out


def _address(patient: dict[str, Any]) -> tuple[str, str] | None:
    for address in patient.get("address") or []:
        line = _norm(" ".join(address.get("line") or []))
        postal = (address.get("postalCode") or "")[:5]
        if line or postal:
            return line, postal
    return None


@dataclass(frozen=True)
class Features:
    """What :func:`score` compares of one Patient, read from its resource once
    (:func:`features`): a new patient is scored against up to :data:`MAX_CANDIDATES`
    stored ones, so its own elements are not read again for each."""

    names: tuple[str, str] | None
    birth_date: str | None
    phone: str | None  # digits (a leading US 1 dropped)
    email: str | None  # case-folded
    address: tuple[str, str] | None


def features(patient: dict[str, Any], *, names: tuple[str, str] | None = None) -> Features:
    """The :class:`Features` of a Patient resource (JSON); ``names``: its
    :func:`_names` when the caller has them already."""
    phone, email = _telecom(patient, "phone"), _telecom(patient, "email")
    born = patient.get("birthDate")
    return Features(
        names=names if names is not None else _names(patient),
        birth_date=str(born) if born else None,
        phone=_digits(phone) if phone else None,
        email=email.casefold() if email else None,
        address=_address(patient),
    )


def score(a: dict[str, Any], b: dict[str, Any]) -> Score | None:
    """The duplicate score of Patients ``a`` and ``b`` (see the module docstring), or
    None when either lacks a name or a birth date."""
    return score_features(features(a), features(b))


def may_reach_review(a: Features, names: tuple[str, str], birth_date: str) -> bool:
    """False when a candidate with these names and birth date cannot score
    :data:`REVIEW_THRESHOLD` against ``a`` even if every other element matched: the best
    it could score is the name and birth-date parts plus full weight for all the others
    (a part at 1 only raises a weighted mean that is below 1). Exact: nothing that
    :func:`score_features` would put at or above the threshold is skipped; it saves
    reading the phones, emails and addresses of the many candidates that differ in name.
    """
    if a.names is None or not a.birth_date:
        return False
    rest = 1.0 - WEIGHTS["name"] - WEIGHTS["birthDate"]
    best = (
        WEIGHTS["name"] * name_part(a.names, names)
        + WEIGHTS["birthDate"] * birth_date_part(a.birth_date, birth_date)
        + rest
    )
    return round(best, 4) >= REVIEW_THRESHOLD


def score_features(a: Features, b: Features) -> Score | None:
    """:func:`score` of two patients' :class:`Features`."""
    if a.names is None or b.names is None or not a.birth_date or not b.birth_date:
        return None
    parts = {
        "name": name_part(a.names, b.names),
        "birthDate": birth_date_part(a.birth_date, b.birth_date),
    }
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
    total = sum(WEIGHTS[k] * v for k, v in parts.items()) / weight
    return Score(round(total, 4), {k: round(v, 4) for k, v in parts.items()})


# --------------------------------------------------------------------------- the queue


#: At most this many stored Patients are scored against a new one: those born on the
#: same date first, then on a typo of it, the most recently updated first. Real birth
#: dates spread thin (a million patients are about 30 per date), but a placeholder date
#: an old system used (``1900-01-01``) or synthetic test data can put thousands on one
#: date; without a cap every new patient would read and score them all,
#: and ingest would slow down with the square of the patients (docs/PERFORMANCE.md,
#: "Bulk import"). A probable duplicate beyond the cap is not proposed.
MAX_CANDIDATES = 200


#: On PostgreSQL a candidate is read as the elements :func:`features` compares (and
#: ``active``), not the whole resource: up to :data:`MAX_CANDIDATES` Patients per new
#: patient, whose identifiers, extensions and metadata the driver would decode for nothing.
_COMPARED_ELEMENTS = literal_column(
    "jsonb_build_object("
    + ", ".join(
        f"'{e}', fhir_resources.resource -> '{e}'"
        for e in ("name", "birthDate", "telecom", "address", "active")
    )
    + ")",
    type_=JSONB,
).label("resource")


def candidates_statement(
    birth_date: str, dialect: str = "sqlite"
) -> Select[tuple[str, dict[str, Any]]]:
    """The stored Patients a new patient born on ``birth_date`` (``YYYY-MM-DD``) is scored
    against: ``(id, resource)`` rows (on PostgreSQL the resource holds only the elements
    :func:`features` reads, and ``active``) born on that date or a typo of it
    (:func:`birth_date_variants`), that date first, then the most recently updated, at
    most :data:`MAX_CANDIDATES`.

    On PostgreSQL (``dialect``) the 80 or so dates are one array parameter
    (``= ANY(%s)``), so the statement's text is the same every time: an ``IN`` list of 80
    parameters made a new, long text per call, which psycopg parsed and prepared again
    each time (about 2.5 ms of CPU per new patient).

    Blocking: only a birth date that scores (equal, or one of its typo variants) can
    reach the review threshold (without it the other parts sum to 0.75), so the database
    filters on it through ``ix_fhir_resources_birth_date`` (migration 0017), before any
    JSON is decoded. Plain rows, not ORM objects: the candidates are only read, and
    keeping them in the session's identity map made each later flush of a long unit of
    work (a bulk import's batch) slower.
    """
    born = json_text(FhirResource.resource, "birthDate")  # the index's expression
    dates = sorted(birth_date_variants(birth_date))
    compared: Any = FhirResource.resource
    if dialect == "postgresql":
        one_of = born == any_(bindparam("birth_dates", dates, type_=ARRAY(String())))
        compared = _COMPARED_ELEMENTS
    else:
        one_of = born.in_(dates)
    return (
        select(FhirResource.id, compared)
        .where(FhirResource.resource_type == "Patient", one_of)
        .order_by(case((born == birth_date, 0), else_=1))
        .order_by(FhirResource.updated_at.desc())
        .limit(MAX_CANDIDATES)
    )


async def detect_duplicates(session: AsyncSession, patient: dict[str, Any]) -> list[PatientReview]:
    """Score a newly registered ``patient`` against every active stored Patient and add a
    queue row for each pair at or above :data:`REVIEW_THRESHOLD` (``linked`` at or above
    :data:`LINK_THRESHOLD`: the caller merges it), best first. Flushes.

    The candidates are read by birth date (:func:`candidates_statement`); it runs once per
    new patient with a name and a birth date, not per message.
    """
    if _names(patient) is None or not patient.get("birthDate"):
        return []  # nothing to score on (a checkout's patient has no birth date)
    dialect = session.get_bind().dialect.name
    rows = await session.execute(candidates_statement(str(patient["birthDate"]), dialect))
    found: list[tuple[Score, str]] = []
    mine = features(patient)
    for row_id, resource in rows:
        if row_id == patient["id"] or resource.get("active") is False:
            continue
        names, born = _names(resource), resource.get("birthDate")
        if names is None or not born or not may_reach_review(mine, names, str(born)):
            continue
        s = score_features(mine, features(resource, names=names))
        if s is not None and s.total >= REVIEW_THRESHOLD:
            found.append((s, row_id))
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
