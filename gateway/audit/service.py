"""Recording audit entries: one row per audited action, added to the caller's session.

An entry is written in the same transaction as what it audits (the request's, the
worker loop's, the CLI command's), inserted when it commits: a write and its audit entry commit together or not at
all, and a read is recorded before its response is sent (:func:`gateway.deps.get_session`
commits before the response). The cost is one row in a transaction that is committed
anyway: no extra round trip, no extra transaction, except for a GET on SQLite, which
commits its audit rows taking the process's write lock.

What each entry holds follows the IHE Basic Audit Log Patterns
(https://profiles.ihe.net/ITI/BALP/): the agent (:func:`gateway.clients.actor.current_actor`:
API client, staff user or system, with the network address), the entity (the resource
and the Patient it belongs to), the action and its AuditEvent.action code, the outcome and
the time. The query of a search is kept (BALP ``entity[query]``): it may name a patient,
which is why reading the audit trail needs its own scope (``audit:read``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import event, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from gateway.clients.actor import Actor, current_actor
from gateway.db.audit_models import AUDIT_PENDING
from gateway.db.bulk import BulkInserts
from gateway.db.models import AuditEntry
from gateway.db.types import utcnow

#: AuditEvent.outcome (http://hl7.org/fhir/R4/valueset-audit-event-outcome.html):
#: 0 success, 4 minor failure, 8 serious failure, 12 major failure.
AuditOutcome = Literal["0", "4", "8", "12"]

#: The gateway's audited actions and their AuditEvent.action code
#: (http://hl7.org/fhir/R4/valueset-audit-event-action.html: C create, R read/view/print,
#: U update, D delete, E execute: a query or an operation).
ACTION_CODES: dict[str, str] = {
    "read": "R",
    "search": "E",
    "create": "C",
    "update": "U",
    "delete": "D",
    "ingest": "C",  # an inbound message stored (intake, checkout, event, HL7 v2)
    "event": "U",  # a clinical event applied to (or recorded in) a case
    "preview": "E",  # a profile preview: PHI in, FHIR out, nothing stored
    "deliver": "R",  # resources disclosed to an EHR
    "replay": "E",
    "resolve": "U",
    "retry": "E",
    "override": "U",
    "remap": "U",
    "export": "R",
    "revoke": "U",
    "deactivate": "U",
    "refuse": "E",  # a known client refused by a route (gateway.audit.refusals)
    # the ops console (issue 12)
    "assign": "U",
    "pause": "U",
    "resume": "U",
    "rotate": "U",
    "view": "R",  # a console page (BALP: read/view/print)
    "login": "E",
    "logout": "E",
    "login-failed": "E",
}

#: Actions of BALP's RESTful profiles, by FHIR restful-interaction code; others are
#: the gateway's own (``<identifier base>/audit-action``).
RESTFUL = {"read", "search", "create", "update", "delete"}


def entry_values(
    *,
    action: str,
    entity_type: str,
    entity_id: str,
    patient_id: str | None = None,
    outcome: AuditOutcome = "0",
    detail: dict[str, Any] | None = None,
    query: str | None = None,
    actor: Actor | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """The column values of one audit entry (for :func:`record`, or a bulk insert).

    Args:
        action: a key of :data:`ACTION_CODES`.
        entity_type: the resource type (``Patient``, ``Case``, ``InboundMessage``...).
        entity_id: its id.
        patient_id: the Patient the entity belongs to (BALP ``entity[patient]``), if any.
        outcome: AuditEvent.outcome.
        detail: ids that help the auditor (message id, target, count); never content.
        query: a search's query string (BALP ``entity[query]``).
        actor: the agent; default :func:`current_actor`.
        at: when (default now, UTC).

    Raises:
        KeyError: ``action`` is not a known action.
    """
    who = actor or current_actor()
    return {
        "at": at or utcnow(),
        "actor": who.name[:128],
        "agent_kind": who.kind,
        "client_id": who.client_id,
        "source_address": who.address[:64] if who.address else None,
        "action": action,
        "code": ACTION_CODES[action],
        "outcome": outcome,
        "entity_type": entity_type[:64],
        "entity_id": entity_id[:128],
        "patient_id": patient_id,
        "detail": detail,
        "query": query,
    }


def record(
    session: AsyncSession,
    *,
    action: str,
    entity_type: str,
    entity_id: str,
    patient_id: str | None = None,
    outcome: AuditOutcome = "0",
    detail: dict[str, Any] | None = None,
    query: str | None = None,
    actor: Actor | None = None,
    at: datetime | None = None,
    bulk: BulkInserts | None = None,
) -> None:
    """Add one audit entry to ``session``'s unit of work: kept in ``session.info`` and
    inserted, with the others of the transaction, in one statement when the session
    commits (:func:`_insert_pending`; a rollback drops them); with ``bulk``, queued
    there instead, for the caller's next :meth:`BulkInserts.flush`. Arguments as
    :func:`entry_values`."""
    pending: list[dict[str, Any]] = (
        session.info.setdefault(AUDIT_PENDING, []) if bulk is None else bulk.rows(AuditEntry)
    )
    pending.append(
        entry_values(
            action=action,
            entity_type=entity_type,
            entity_id=entity_id,
            patient_id=patient_id,
            outcome=outcome,
            detail=detail,
            query=query,
            actor=actor,
            at=at,
        )
    )


def _insert_pending(session: Session, *_args: Any) -> None:
    """Insert the entries :func:`record` kept, in one statement (an ORM bulk insert: a
    fraction of an ORM flush's cost per row), at the session's next flush (so inside the
    savepoint they were recorded in) or else its commit; for an ``AsyncSession`` this runs
    in its greenlet."""
    pending = session.info.pop(AUDIT_PENDING, None)
    if pending:
        session.execute(insert(AuditEntry), pending)


def _drop_pending(session: Session) -> None:
    """Entries recorded since the last flush belong to what was rolled back (the
    transaction, or a savepoint): they are not written."""
    session.info.pop(AUDIT_PENDING, None)


event.listen(Session, "before_flush", _insert_pending)
event.listen(Session, "before_commit", _insert_pending)
event.listen(Session, "after_rollback", _drop_pending)


def record_patients(
    session: AsyncSession,
    *,
    action: str,
    entity_type: str,
    hits: list[tuple[str, str | None]],
    query: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Audit a search or list: one entry per Patient whose data it returned (so
    ``GET /fhir/AuditEvent?patient=`` finds every disclosure), plus one entry without a
    patient when some results belong to none or nothing was found.

    Args:
        hits: ``(entity id, patient id or None)`` of each result returned.
    """
    by_patient: dict[str, str] = {}
    no_patient: list[str] = []
    for entity_id, patient_id in hits:
        if patient_id is None:
            no_patient.append(entity_id)
        else:
            by_patient.setdefault(patient_id, entity_id)
    at = utcnow()
    for patient_id, entity_id in by_patient.items():
        record(
            session,
            action=action,
            entity_type=entity_type,
            entity_id=entity_id,
            patient_id=patient_id,
            query=query,
            detail=detail,
            at=at,
        )
    if no_patient or not by_patient:
        record(
            session,
            action=action,
            entity_type=entity_type,
            entity_id=no_patient[0] if no_patient else "*",
            query=query,
            detail={**(detail or {}), "results": len(hits)},
            at=at,
        )
