"""Clinical events: stored durably and acknowledged first, applied to cases after.

The acknowledgement waits only for the inbox row; applying happens right after the
response (in the same process) and, for anything left over (a crash, a restart), in the
worker's inbox sweep. Both use :func:`process_message`, which is idempotent.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import InboundMessage, MessageStatus
from gateway.db.types import utcnow
from gateway.errors import UnprocessableError
from gateway.fhir import repository as fhir_repo
from gateway.inbox import repository as inbox
from gateway.ingest.service import Outcome, decode_json_object
from gateway.logging import get_logger
from gateway.runtime import Runtime
from gateway.workflow.service import EventInput, apply_event
from mappers.errors import MappingErrors, Problem
from mappers.events import parse_canonical_event

log = get_logger(__name__)

EVENT_CHANNELS = ("events",)


async def receive_event(
    session: AsyncSession, runtime: Runtime, *, raw: bytes, content_type: str, actor: str
) -> Outcome:
    """Validate and store a canonical event; answer 202 before applying it.

    Raises:
        BadRequestError, UnprocessableError: every problem; nothing stored.
    """
    data = decode_json_object(raw)
    try:
        event = parse_canonical_event(data)
    except MappingErrors as exc:
        raise UnprocessableError("the event is not valid", exc.problems) from exc
    key = inbox.dedupe_key("events", event.source, event.event_id)
    existing = await inbox.get_message_by_key(session, key)
    if existing is not None:
        return Outcome(202, {**(existing.response or {}), "duplicate": True}, existing.id)
    message = inbox.new_message(
        channel="events",
        sender=event.source,
        external_id=event.event_id,
        body=raw,
        content_type=content_type,
    )
    message.response = {
        "message_id": message.id,
        "event_id": event.event_id,
        "status": "received",
        "status_url": f"{runtime.settings.public_base_url}/v1/messages/{message.id}",
    }
    session.add(message)
    await session.flush()
    log.info(
        "events.received",
        message_id=message.id,
        source=event.source,
        event_type=event.type,
        actor=actor,
    )
    return Outcome(202, message.response, message.id)


async def process_message(session: AsyncSession, runtime: Runtime, message: InboundMessage) -> None:
    """Apply one stored event message to its case (flushes; the caller commits).

    An unknown patient, or an event the workflow refuses, lands in the exceptions queue;
    the message is marked processed or failed either way, never left dangling.
    """
    if message.status != MessageStatus.RECEIVED:
        return
    data: dict[str, Any] = json.loads(message.body)
    event = parse_canonical_event(data)
    identifier = f"{event.patient.system}|{event.patient.value}"
    found = await fhir_repo.patients_for_keys(session, [("identifier", identifier)])
    patient_id = found.get(("identifier", identifier))
    message.processed_at = utcnow()
    if patient_id is None:
        session.add(
            inbox.new_exception(
                kind="unmatched_patient",
                channel=message.channel,
                sender=message.sender,
                message_id=message.id,
                problems=[
                    Problem(
                        "patient",
                        "unmatched_patient",
                        "no patient has this identifier (tried: identifier system|value)",
                    )
                ],
            )
        )
        message.status = MessageStatus.FAILED
        log.info("events.unmatched_patient", message_id=message.id)
        return
    result = await apply_event(
        session,
        runtime.profiles.current.workflow_or_raise,
        EventInput(
            source=event.source,
            event_id=event.event_id,
            type=event.type,
            detail=event.status,
            occurred_at=event.occurred_at,
            patient_id=patient_id,
            case_id=event.case_id,
            message_id=message.id,
        ),
    )
    message.status = (
        MessageStatus.FAILED
        if result.outcome in ("rejected", "no_case")
        else MessageStatus.PROCESSED
    )
    message.response = {
        **(message.response or {}),
        "status": "processed",
        "outcome": result.outcome,
        "case_id": result.case_id,
    }


async def process_message_by_id(runtime: Runtime, message_id: str) -> None:
    """Apply one message in its own transaction (after the acknowledgement)."""
    async with runtime.write_session() as session:
        stmt = select(InboundMessage).where(InboundMessage.id == message_id)
        if runtime.engine.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        message = await session.scalar(stmt)
        if message is None:
            return
        await process_message(session, runtime, message)
        await session.commit()


async def sweep_pending(runtime: Runtime, *, limit: int = 100) -> int:
    """Apply stored events that were not applied yet (oldest first).

    Returns:
        How many messages were processed.
    """
    done = 0
    async with runtime.write_session() as session:
        stmt = (
            select(InboundMessage)
            .where(
                InboundMessage.status == MessageStatus.RECEIVED,
                InboundMessage.channel.in_(EVENT_CHANNELS),
            )
            .order_by(InboundMessage.received_at)
            .limit(limit)
        )
        if runtime.engine.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        messages = (await session.scalars(stmt)).all()
        for message in messages:
            try:
                async with session.begin_nested():
                    await process_message(session, runtime, message)
            except Exception:
                log.exception("events.process_failed", message_id=message.id)
                message.status = MessageStatus.FAILED
                session.add(
                    inbox.new_exception(
                        kind="processing_error",
                        channel=message.channel,
                        sender=message.sender,
                        message_id=message.id,
                        problems=[
                            Problem(
                                "",
                                "processing_error",
                                "the event could not be applied; see the logs",
                            )
                        ],
                    )
                )
            done += 1
        await session.commit()
    return done
