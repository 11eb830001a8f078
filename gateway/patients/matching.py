"""The one patient match of every channel: intake, checkout, Stripe, clinical events,
partner webhooks, HL7 v2 and EHR notifications.

A message carries :class:`~mappers.events.PatientRef` s in priority order: identifiers
(``system|value``: our canonical ids, an EHR's MRN, a partner's own id, the intake app's
patient id), an intake ``submission_id`` and a normalized email (intake and checkout),
matched against ``patient_keys``; and Patient ids an EHR assigned to our patients,
matched through ``remote_ids``. The first ref that matches wins; refs that point at
another patient are the match's ``conflicts`` (for the exceptions queue,
:func:`record_conflicts`).

* :func:`find_patient` (clinical events): the patient or none; the event's other
  identifiers can be learned as keys of the patient it matched (first come, first
  served), so an MRN that arrived next to the EHR's Patient id finds the patient by
  itself next time;
* :func:`match_or_register` (intake, checkout): the patient, loaded (and on PostgreSQL
  locked, so two messages for one patient are stored one after the other); when nothing
  matches, a new patient whose keys are registered at once. Two messages for the same new
  person arriving together are settled by the unique key of ``patient_keys``: the one
  that registers a key first creates the patient, the other waits for it and joins it;
* :func:`known_patient`: a stored patient by id (re-mapping a stored message).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import FhirResource
from gateway.inbox import repository as inbox
from gateway.patients import repository as repo
from gateway.patients.repository import Key
from mappers.errors import Problem
from mappers.events import PatientRef


@dataclass
class PatientMatch:
    """The patient a message belongs to, and how it was found.

    Attributes:
        patient_id: the local Patient id; None when nothing matched (events never
            create patients).
        row: the stored Patient row, when loaded (:func:`match_or_register`,
            :func:`known_patient`); None for a new patient.
        matched_on: the ref that matched (None: new or unmatched).
        tried: what was tried, without values (for the exceptions queue).
        conflicts: refs that point at another patient than the one chosen.
        new: the patient is new: it was registered by this match.
        keys: the keys that belong to this patient now (found or registered): storing
            the Patient's keys later leaves these out.
        learned: identifier keys newly registered for a matched patient.
    """

    patient_id: str | None
    row: FhirResource | None = None
    matched_on: PatientRef | None = None
    tried: list[str] = field(default_factory=list)
    conflicts: list[PatientRef] = field(default_factory=list)
    new: bool = False
    keys: set[Key] = field(default_factory=set)
    learned: int = 0

    @property
    def existing(self) -> dict[str, Any] | None:
        """The stored Patient resource, or None."""
        return self.row.resource if self.row is not None else None

    def conflict_problem(self) -> Problem | None:
        """The exceptions-queue problem for the conflicts (names kinds and systems, never
        values), or None."""
        if not self.conflicts:
            return None
        on = self.matched_on.describe() if self.matched_on else "?"
        return Problem(
            "patient",
            "patient_match_conflict",
            f"matched on {on}; "
            + ", ".join(r.describe() for r in self.conflicts)
            + " point at another patient",
        )


def _keyed(refs: Iterable[PatientRef]) -> list[PatientRef]:
    return [r for r in refs if r.kind != "remote_id"]


async def _resolve(
    session: AsyncSession, refs: Sequence[PatientRef]
) -> tuple[dict[PatientRef, str], dict[Key, str]]:
    """Every ref that points at a patient -> that patient, and the keys found."""
    by_key = await repo.patients_for_keys(session, [r.key for r in _keyed(refs)])
    by_remote = await repo.patients_for_remote_ids(session, refs)
    resolved: dict[PatientRef, str] = {}
    for ref in refs:
        pid = by_remote.get(ref) if ref.kind == "remote_id" else by_key.get(ref.key)
        if pid is not None:
            resolved[ref] = pid
    return resolved, by_key


def _chosen(
    refs: Sequence[PatientRef], resolved: dict[PatientRef, str], *, not_: str | None = None
) -> PatientRef | None:
    return next((r for r in refs if r in resolved and resolved[r] != not_), None)


async def find_patient(
    session: AsyncSession, refs: Sequence[PatientRef], *, learn: bool = True
) -> PatientMatch:
    """Find the local patient for ``refs`` (first match in order wins).

    Args:
        session: the caller's session.
        refs: the message's patient refs, in priority order.
        learn: register the message's other identifiers as keys of the matched patient.

    Returns:
        The :class:`PatientMatch` (``patient_id`` None when nothing matched).
    """
    resolved, by_key = await _resolve(session, refs)
    tried = [r.describe() for r in refs]
    chosen = _chosen(refs, resolved)
    if chosen is None:
        return PatientMatch(None, tried=tried)
    patient_id = resolved[chosen]
    learned: set[Key] = set()
    if learn:
        new_keys = [r.key for r in refs if r.kind == "identifier" and r.key not in by_key]
        learned = await repo.claim_keys(session, patient_id, new_keys)
    return PatientMatch(
        patient_id,
        matched_on=chosen,
        tried=tried,
        conflicts=[r for r, pid in resolved.items() if pid != patient_id],
        keys={k for k, pid in by_key.items() if pid == patient_id} | learned,
        learned=len(learned),
    )


async def match_or_register(
    session: AsyncSession,
    refs: Sequence[PatientRef],
    *,
    id_system: str,
    new_id: str | None = None,
) -> PatientMatch:
    """The patient of an intake or checkout: matched and loaded, or registered as new.

    Args:
        session: the caller's session (the caller commits).
        refs: the message's patient refs, in priority order.
        id_system: the system of the gateway's own Patient ids (``<base>/patient-id``):
            a new patient is registered under ``id_system|<its id>`` too.
        new_id: the id a new patient gets (a new UUID when None).

    Returns:
        The :class:`PatientMatch`: ``row`` is the stored Patient (locked ``FOR UPDATE`` on
        PostgreSQL until the caller commits), or None and ``new`` for a new patient.
    """
    resolved, by_key = await _resolve(session, refs)
    tried = [r.describe() for r in refs]
    chosen = _chosen(refs, resolved)
    if chosen is None:
        new_id = new_id or str(uuid.uuid4())
        own_key = ("identifier", f"{id_system}|{new_id}")
        wanted = {r.key for r in _keyed(refs)} | {own_key}
        claimed = await repo.claim_keys(session, new_id, wanted)
        if claimed == wanted:
            return PatientMatch(new_id, tried=tried, new=True, keys=claimed)
        # Another message registered one of these keys first (and has committed: the
        # insert waited for it): its patient is this one's too.
        resolved, by_key = await _resolve(session, refs)
        chosen = _chosen(refs, resolved, not_=new_id)
        if chosen is None:  # only the canonical key was taken: a stale id, keep ours
            return PatientMatch(new_id, tried=tried, new=True, keys=claimed)
        await repo.move_keys(
            session, from_patient=new_id, to_patient=resolved[chosen], drop=own_key
        )
        resolved = {r: resolved[chosen] if pid == new_id else pid for r, pid in resolved.items()}
        by_key = {k: resolved[chosen] if pid == new_id else pid for k, pid in by_key.items()}
    patient_id = resolved[chosen]
    return PatientMatch(
        patient_id,
        row=await repo.get_patient_row(session, patient_id, lock=True),
        matched_on=chosen,
        tried=tried,
        conflicts=[r for r, pid in resolved.items() if pid != patient_id],
        keys={k for k, pid in by_key.items() if pid == patient_id},
    )


async def known_patient(session: AsyncSession, patient_id: str) -> PatientMatch:
    """A stored patient by id, loaded (re-mapping one of its messages)."""
    return PatientMatch(patient_id, row=await repo.get_patient_row(session, patient_id, lock=True))


def record_conflicts(
    session: AsyncSession,
    match: PatientMatch,
    *,
    channel: str,
    sender: str | None,
    message_id: str | None,
) -> None:
    """Put a ``patient_match_conflict`` in the exceptions queue when refs of the message
    point at different patients (the message was applied to the first match)."""
    problem = match.conflict_problem()
    if problem is None:
        return
    session.add(
        inbox.new_exception(
            kind="patient_match_conflict",
            channel=channel,
            sender=sender,
            message_id=message_id,
            problems=[problem],
        )
    )
