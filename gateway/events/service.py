"""Clinical events: stored durably and acknowledged first, applied to cases after.

Every inbound channel (canonical ``POST /v1/events``, partner webhooks, HL7 v2, FHIR
Subscription notifications) stores the raw message in ``inbound_messages`` and answers;
the acknowledgement waits for nothing else. The stored messages are the inbox, a queue of
the one queue (:data:`INBOX`); applying them is :mod:`gateway.events.apply`: right after
the response in the process that stored the message (leased to it in the same insert:
:func:`lease_for_this_process`), and for anything left over (a crash, a restart, an
id-only notification whose resource must be read from the EHR, a retry) in the worker's
inbox loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import InboundMessage, MessageStatus
from gateway.db.types import utcnow
from gateway.errors import ForbiddenError, UnprocessableError
from gateway.http import Outcome, decode_json_object, store_if_new
from gateway.inbox import repository as inbox
from gateway.logging import get_logger
from gateway.queue.repository import QueueTable
from gateway.runtime import Runtime
from mappers.errors import MappingErrors, Problem
from mappers.events import (
    DEFAULT_MAX_FUTURE,
    ClinicalEvent,
    canonical_to_clinical_event,
    future_time_problem,
    parse_canonical_event,
)

log = get_logger(__name__)

#: Inbox channels whose messages become clinical events.
EVENT_CHANNELS = ("events", "partner", "hl7v2", "fhir-notification")
#: How long a claimed message is ours before another process may take it over.
LEASE = timedelta(seconds=60)

#: The inbox as a queue: messages of the event channels still ``received``. A message
#: being applied keeps that status (the API shows it so); its lease marks it.
INBOX = QueueTable(
    model=InboundMessage,
    waiting=MessageStatus.RECEIVED,
    leased=MessageStatus.RECEIVED,
    order=("available_at", "received_at"),
    scope=InboundMessage.channel.in_(EVENT_CHANNELS),
)


@dataclass
class Received(Outcome):
    """An ingest answer, plus the stored message and its mapped events to apply right
    after the response (``message`` None: nothing to apply)."""

    message: InboundMessage | None = None
    prepared: Prepared | None = None


async def receive_event(
    session: AsyncSession,
    runtime: Runtime,
    *,
    raw: bytes,
    content_type: str,
    actor: str,
    allowed_sources: frozenset[str] | None = None,
) -> Received:
    """Validate and store a canonical event; answer 202 before applying it.

    Args:
        allowed_sources: the senders the caller's API client may send as (None: any);
            the ownership matrix then decides what each sender may say.

    Raises:
        BadRequestError, UnprocessableError: every problem; nothing stored (an
            ``occurred_at`` more than 5 minutes after now is ``future_timestamp``).
        ForbiddenError: the client may not send as the event's ``source``.
    """
    data = decode_json_object(raw)
    try:
        event = parse_canonical_event(data)
    except MappingErrors as exc:
        raise UnprocessableError("the event is not valid", exc.problems) from exc
    ahead = future_time_problem(
        event.occurred_at, received_at=utcnow(), max_future=DEFAULT_MAX_FUTURE
    )
    if ahead is not None:  # applied, it would make the case's correct later events late
        raise UnprocessableError("the event's time is in the future", [ahead])
    if allowed_sources is not None and event.source not in allowed_sources:
        raise ForbiddenError(
            "this API client may not send events as this source",
            [
                Problem(
                    "source",
                    "source_not_allowed",
                    f"allowed: {', '.join(sorted(allowed_sources)) or 'none'}",
                )
            ],
        )
    message = inbox.new_message(
        channel="events",
        sender=event.source,
        external_id=event.event_id,
        body=raw,
        content_type=content_type,
        principal=f"client:{actor}",
    )
    message.response = {
        "message_id": message.id,
        "event_id": event.event_id,
        "status": "received",
        "status_url": f"{runtime.settings.public_base_url}/v1/messages/{message.id}",
    }
    leased = lease_for_this_process(runtime, message)
    existing = await store_if_new(session, message, alone=True)
    if existing is not None:
        return Received(202, {**(existing.response or {}), "duplicate": True}, existing.id)
    log.info(
        "events.received",
        message_id=message.id,
        source=event.source,
        event_type=event.type,
        actor=actor,
    )
    if not leased:
        return Received(202, message.response, message.id)
    prepared = Prepared(events=[canonical_to_clinical_event(event)])
    return Received(202, message.response, message.id, message=message, prepared=prepared)


@dataclass
class Prepared:
    """A stored message read back into clinical events (no database work yet).

    ``problems``: why (part of) it cannot be applied (for the exceptions queue);
    ``ignored``: how many parts the sender's profile says to ignore.
    """

    events: list[ClinicalEvent] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: int = 0


def lease_for_this_process(runtime: Runtime, message: InboundMessage) -> bool:
    """Lease a message being stored to the process that stores it (``locked_by`` its
    :attr:`~gateway.runtime.Runtime.instance_id`), when that process applies it right
    after the acknowledgement (``GATEWAY_APPLY_EVENTS_AFTER_ACK``): the claim is part of
    the insert. The worker's inbox loop takes it over only if that does not happen within
    :data:`LEASE`. Returns whether it was leased (False: the worker applies it)."""
    now = runtime.clock.now()
    message.available_at = now
    if not runtime.settings.apply_events_after_ack:
        return False
    message.locked_until = now + LEASE
    message.locked_by = runtime.instance_id
    message.attempts = 1
    return True
