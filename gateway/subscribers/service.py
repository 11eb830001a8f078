"""Ops subscribers and the case webhooks they receive.

A subscriber (CRM, portal, ops queue) has a URL, a Standard Webhooks secret
(``whsec_`` + base64 of 32 random bytes, generated when not given) and the webhook types it
wants. Every case change it wants becomes one outbox row (``deliveries.kind = "webhook"``,
``target`` = the subscriber's name, ``ordering_key`` = the case id), written in the same
transaction as the change, so it is sent exactly when the change is committed, with the
outbox's retries, backoff and dead letters, in order per case and subscriber.

Webhook types:

* ``case.opened``: a case was opened (``from_state`` is null);
* ``case.state_changed``: a case moved to another state;
* ``case.overdue``: a case stayed in a state longer than its SLA timer;
* ``exception.overdue``: an exception stayed open longer than its kind's SLA
  (``exception_sla`` in ``profiles/workflow.yaml``): an escalation for the ops team.

* ``target.guard_breached`` / ``target.guard_cleared``: a cutover guard of an EHR target
  went over its threshold, or back (issue 16; ids, names and numbers only).

A subscription to ``*`` gets every type, ``case.*``, ``exception.*`` or ``target.*`` every
type of one kind.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.db.models import Case, Delivery, DeliveryStatus, ExceptionRecord, Subscriber
from gateway.db.types import utcnow
from gateway.logging import get_logger
from mappers.normalize import to_fhir_instant

log = get_logger(__name__)

WEBHOOK_TYPES = (
    "case.opened",
    "case.state_changed",
    "case.overdue",
    "exception.overdue",
    "target.guard_breached",
    "target.guard_cleared",
)
#: What a subscriber may ask for: a type, a family (``case.*``...) or everything (``*``).
SUBSCRIBABLE_TYPES = (*WEBHOOK_TYPES, "case.*", "exception.*", "target.*", "*")
#: The ``kind`` of webhook rows in ``deliveries``.
WEBHOOK_KIND = "webhook"


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class ActiveSubscriber:
    """What the outbox needs of a subscriber that receives webhooks: its name (the
    rows' ``target``) and the webhook types it asked for."""

    name: str
    event_types: frozenset[str]


def wants(subscriber: ActiveSubscriber, webhook_type: str) -> bool:
    """True if ``subscriber`` asked for ``webhook_type`` (exactly, ``case.*`` or ``*``)."""
    return bool({webhook_type, "*", webhook_type.split(".", 1)[0] + ".*"} & subscriber.event_types)


#: ``Session.info`` key of the active subscribers read in the session's transaction.
_ACTIVE_KEY = "gateway.subscribers.active"


async def active_subscribers(session: AsyncSession) -> list[ActiveSubscriber]:
    """Subscribers that receive webhooks, read once per transaction: a transaction that
    changes many cases (a bulk import's batch, a worker's batch of events) reads them
    once, not once per change. Their names and types only (not the signing secret, which
    would be decrypted for nothing)."""
    transaction = session.sync_session.get_transaction()
    cached = session.info.get(_ACTIVE_KEY)
    if cached is not None and transaction is not None and cached[0] is transaction:
        return list(cached[1])
    rows = await session.execute(
        select(Subscriber.name, Subscriber.event_types)
        .where(Subscriber.active)
        .order_by(Subscriber.name)
    )
    found = [ActiveSubscriber(name, frozenset(types or ())) for name, types in rows]
    # the transaction the read began, if none was open (autobegin)
    session.info[_ACTIVE_KEY] = (session.sync_session.get_transaction(), tuple(found))
    return found


def _instant(value: datetime | None) -> str | None:
    return to_fhir_instant(value) if value is not None else None


def case_payload(
    case: Case,
    webhook_type: str,
    *,
    from_state: str | None,
    event: dict[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """The webhook body for a change of ``case`` (ids and states only, no PHI).

    Shape::

        {"id": "msg_<32 hex>", "type": "case.state_changed", "timestamp": "<ISO 8601>",
         "data": {"case_id", "patient_id", "program", "from_state", "to_state",
                  "state_entered_at", "sequence", "overdue": {"timer", "due_at"} | null,
                  "event": {"type", "detail", "source", "sender", "event_id",
                            "occurred_at", "received_at", "reference"} | null}}

    ``id`` is the Standard Webhooks ``webhook-id`` (the same on every retry) and
    ``sequence`` increases with every change of the case.
    """
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": webhook_type,
        "timestamp": to_fhir_instant(now),
        "data": {
            "case_id": case.id,
            "patient_id": case.patient_id,
            "program": case.program,
            "from_state": from_state,
            "to_state": case.state,
            "state_entered_at": _instant(case.state_entered_at),
            "sequence": case.version,
            "overdue": {"timer": case.sla_timer, "due_at": _instant(case.sla_due_at)}
            if webhook_type == "case.overdue"
            else None,
            "event": event,
        },
    }


def _add_rows(
    session: AsyncSession,
    subscribers: list[ActiveSubscriber],
    payload: dict[str, Any],
    *,
    ordering_key: str,
    now: datetime,
    status: DeliveryStatus = DeliveryStatus.PENDING,
) -> None:
    """One webhook outbox row per subscriber, all with the same ``payload`` (so the same
    webhook id), delivered in order per ``ordering_key``."""
    for subscriber in subscribers:
        session.add(
            Delivery(
                kind=WEBHOOK_KIND,
                target=subscriber.name,
                ordering_key=ordering_key,
                inbound_message_id=None,
                resource_refs=[],
                payload=payload,
                status=status,
                available_at=now,
                created_at=now,
                source_received_at=now,
            )
        )


async def enqueue_case_webhook(
    session: AsyncSession,
    case: Case,
    webhook_type: str,
    *,
    from_state: str | None,
    event: dict[str, Any] | None,
    status: DeliveryStatus = DeliveryStatus.PENDING,
) -> int:
    """Add one webhook outbox row per active subscriber that wants ``webhook_type``.

    Call it in the transaction that changes the case (after a flush, so ``case.version``
    is the new one). Returns how many rows were added. With ``status`` ``suppressed``
    the rows are a record of what would have been sent (a historical change from a bulk
    import): never claimed, never sent.
    """
    now = utcnow()
    subscribers = [s for s in await active_subscribers(session) if wants(s, webhook_type)]
    if not subscribers:
        return 0
    payload = case_payload(case, webhook_type, from_state=from_state, event=event, now=now)
    _add_rows(session, subscribers, payload, ordering_key=case.id, now=now, status=status)
    log.info(
        "subscribers.enqueued" if status == DeliveryStatus.PENDING else "subscribers.suppressed",
        case_id=case.id,
        webhook_type=webhook_type,
        webhook_id=payload["id"],
        subscribers=len(subscribers),
    )
    return len(subscribers)


async def record_case_webhook_suppressed(
    session: AsyncSession,
    case: Case,
    webhook_type: str,
    *,
    from_state: str | None,
    event: dict[str, Any] | None,
) -> int:
    """A :class:`~gateway.workflow.service.ChangeSink` that records the webhooks of a
    case change as ``suppressed`` outbox rows instead of sending them: the change of a
    historical event brought in by a bulk import (issue 16) without ``--notify``."""
    return await enqueue_case_webhook(
        session,
        case,
        webhook_type,
        from_state=from_state,
        event=event,
        status=DeliveryStatus.SUPPRESSED,
    )


async def enqueue_target_webhook(
    session: AsyncSession, webhook_type: str, *, target: str, data: dict[str, Any]
) -> int:
    """Add one webhook outbox row per active subscriber that wants ``webhook_type``
    (``target.guard_breached``, ``target.guard_cleared``), in order per target.

    Shape::

        {"id": "msg_<32 hex>", "type": "target.guard_breached", "timestamp": "<ISO 8601>",
         "data": {"target", "guard", "value", "threshold", "paused", ...}}

    Returns:
        How many rows were added.
    """
    now = utcnow()
    subscribers = [s for s in await active_subscribers(session) if wants(s, webhook_type)]
    payload = {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": webhook_type,
        "timestamp": to_fhir_instant(now),
        "data": {"target": target, **data},
    }
    _add_rows(session, subscribers, payload, ordering_key=f"target:{target}", now=now)
    log.info(
        "subscribers.enqueued",
        target=target,
        webhook_type=webhook_type,
        subscribers=len(subscribers),
    )
    return len(subscribers)


async def rotate_secret(session: AsyncSession, *, subscriber: Subscriber) -> str:
    """Give ``subscriber`` a new Standard Webhooks secret (returned, to be shown once):
    webhooks sent from now on are signed with it. Audited as ``rotate``; flushes."""
    secret = new_secret()
    subscriber.secret = secret
    audit.record(session, action="rotate", entity_type="Subscriber", entity_id=str(subscriber.id))
    await session.flush()
    return secret


async def set_subscriber_active(
    session: AsyncSession, *, subscriber: Subscriber, active: bool
) -> None:
    """Activate or deactivate a subscriber (audited as ``update`` / ``deactivate``)."""
    subscriber.active = active
    audit.record(
        session,
        action="update" if active else "deactivate",
        entity_type="Subscriber",
        entity_id=str(subscriber.id),
    )
    await session.flush()


def exception_payload(
    row: ExceptionRecord, webhook_type: str, *, due_at: datetime, now: datetime
) -> dict[str, Any]:
    """The webhook body for an exception past its SLA (ids, kinds and times, no PHI).

    Shape::

        {"id": "msg_<32 hex>", "type": "exception.overdue", "timestamp": "<ISO 8601>",
         "data": {"exception_id", "kind", "channel", "sender", "case_id", "message_id",
                  "created_at", "due_at", "assigned_to"}}
    """
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": webhook_type,
        "timestamp": to_fhir_instant(now),
        "data": {
            "exception_id": row.id,
            "kind": row.kind,
            "channel": row.channel,
            "sender": row.sender,
            "case_id": row.case_id,
            "message_id": row.inbound_message_id,
            "created_at": _instant(row.created_at),
            "due_at": to_fhir_instant(due_at),
            "assigned_to": row.assigned_to,
        },
    }


async def enqueue_exception_webhook(
    session: AsyncSession, row: ExceptionRecord, *, due_at: datetime
) -> int:
    """Add one ``exception.overdue`` outbox row per active subscriber that wants it
    (ordered per exception). Returns how many rows were added."""
    now = utcnow()
    subscribers = [s for s in await active_subscribers(session) if wants(s, "exception.overdue")]
    if not subscribers:
        return 0
    payload = exception_payload(row, "exception.overdue", due_at=due_at, now=now)
    _add_rows(session, subscribers, payload, ordering_key=f"exception:{row.id}", now=now)
    log.info(
        "subscribers.enqueued",
        exception_id=row.id,
        webhook_type="exception.overdue",
        webhook_id=payload["id"],
        subscribers=len(subscribers),
    )
    return len(subscribers)
