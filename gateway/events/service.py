"""Clinical events: stored durably and acknowledged first, applied to cases after.

Every inbound channel (canonical ``POST /v1/events``, partner webhooks, HL7 v2, FHIR
Subscription notifications) stores the raw message in ``inbound_messages`` and answers;
the acknowledgement waits for nothing else. Applying happens right after the response (in
the same process) and, for anything left over (a crash, a restart, an id-only
notification whose resource must be fetched from the EHR), in the worker's inbox sweep.
Both use :func:`process_message_by_id`:

1. claim the message with a lease (``locked_until``; one conditional ``UPDATE``, so two
   processes never apply the same message at once, on SQLite and PostgreSQL alike);
2. re-read the raw message into clinical events with the current profiles (pure
   mappers), fetching id-only focus resources from the EHR, holding no database
   connection while it waits;
3. match each event's patient and apply it to its case, in one transaction.

A message that fails to parse or apply is marked ``failed`` and lands in the exceptions
queue with the reason; a transient failure (EHR unreachable) is retried with backoff and
becomes an exception when it keeps failing.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from gateway.db.models import InboundMessage, MessageStatus
from gateway.db.types import utcnow
from gateway.ehr.errors import EhrConfigError, EhrRejectedError, EhrUnavailableError
from gateway.errors import ForbiddenError, UnprocessableError
from gateway.http import Outcome, decode_json_object, store_if_new
from gateway.inbox import repository as inbox
from gateway.logging import get_logger
from gateway.patients.matching import find_patient, record_conflicts
from gateway.runtime import Runtime
from gateway.workflow.service import EventInput, apply_event
from mappers.errors import MappingError, MappingErrors, Problem
from mappers.events import ClinicalEvent, canonical_to_clinical_event, parse_canonical_event
from mappers.hl7v2 import decode_er7, hl7v2_to_clinical_event, parse_er7
from mappers.notifications import focus_to_clinical_event, parse_notification, reference_key
from mappers.partners import partner_to_clinical_event

log = get_logger(__name__)

#: Inbox channels whose messages become clinical events.
EVENT_CHANNELS = ("events", "partner", "hl7v2", "fhir-notification")
#: How long a claimed message is ours before another process may take it over.
LEASE = timedelta(seconds=60)
#: Attempts before a message that keeps failing transiently goes to the exceptions queue.
MAX_ATTEMPTS = 8

#: Reads a FHIR resource from an EHR target: ``await read(target, type, id)``.
ResourceReader = Callable[[str, str, str], Awaitable[dict[str, Any]]]


class FetchDeferredError(Exception):
    """An id-only notification needs an EHR read and no reader is available here."""


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
        BadRequestError, UnprocessableError: every problem; nothing stored.
        ForbiddenError: the client may not send as the event's ``source``.
    """
    data = decode_json_object(raw)
    try:
        event = parse_canonical_event(data)
    except MappingErrors as exc:
        raise UnprocessableError("the event is not valid", exc.problems) from exc
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
    )
    message.response = {
        "message_id": message.id,
        "event_id": event.event_id,
        "status": "received",
        "status_url": f"{runtime.settings.public_base_url}/v1/messages/{message.id}",
    }
    leased = lease_for_this_process(runtime, message)
    existing = await store_if_new(session, message)
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


# --------------------------------------------------------------------------- preparing


@dataclass
class Prepared:
    """A stored message read back into clinical events (no database work yet).

    ``problems``: why (part of) it cannot be applied (for the exceptions queue);
    ``ignored``: how many parts the sender's profile says to ignore.
    """

    events: list[ClinicalEvent] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: int = 0


async def prepare(
    runtime: Runtime, message: InboundMessage, *, reader: ResourceReader | None
) -> Prepared:
    """Map a stored message to clinical events with the current profiles.

    Raises:
        FetchDeferredError: an id-only resource must be read and ``reader`` is None.
        EhrUnavailableError: the EHR could not be reached (retry later).
    """
    profiles = runtime.profiles.current
    base = runtime.systems.base
    out = Prepared()
    try:
        if message.channel == "events":
            out.events.append(
                canonical_to_clinical_event(parse_canonical_event(json.loads(message.body)))
            )
        elif message.channel == "partner":
            partner = profiles.partners.get(message.sender)
            if partner is None or partner.webhook is None:
                raise MappingError("unknown_partner", "the partner profile is gone", "partner")
            event = partner_to_clinical_event(
                json.loads(message.body), partner, identifier_base=base
            )
            _add(out, event)
        elif message.channel == "hl7v2":
            parsed = parse_er7(decode_er7(message.body))
            partner = profiles.hl7_sender(parsed.sending_facility)
            if partner is None:
                raise MappingError(
                    "unknown_sender", "no partner profile has this facility", "MSH-4"
                )
            _add(out, hl7v2_to_clinical_event(parsed, partner, identifier_base=base))
        elif message.channel == "fhir-notification":
            await _prepare_notification(runtime, message, out, reader)
        else:
            raise MappingError("unknown_channel", "not an event channel", "channel")
    except MappingErrors as exc:
        out.problems += exc.problems
    except MappingError as exc:
        out.problems.append(exc.problem)
    return out


def _add(out: Prepared, event: ClinicalEvent | None) -> None:
    if event is None:
        out.ignored += 1
    else:
        out.events.append(event)


async def _prepare_notification(
    runtime: Runtime, message: InboundMessage, out: Prepared, reader: ResourceReader | None
) -> None:
    target = runtime.profiles.current.ehr.get(message.sender)
    if target is None or target.events is None:
        raise MappingError("unknown_target", "the EHR target or its events block is gone", "target")
    notification = parse_notification(json.loads(message.body))
    for i, event in enumerate(notification.events):
        where = f"notification-event[{i}]"
        key = reference_key(event.focus or "")
        if key is None:
            out.problems.append(
                Problem(
                    where,
                    "missing_focus",
                    "the event has no focus reference (payload 'empty'?): the gateway cannot "
                    "tell what changed; set the Subscription's payload content to id-only or "
                    "full-resource",
                )
            )
            continue
        resource = notification.resources.get(key)
        if resource is None:
            if reader is None:
                raise FetchDeferredError(key)
            rtype, rid = key.split("/", 1)
            try:
                resource = await reader(target.name, rtype, rid)
            except EhrRejectedError as exc:
                out.problems.append(
                    Problem(
                        where,
                        "focus_unreadable",
                        f"the EHR refused to return {rtype} ({exc.status_code})",
                    )
                )
                continue
            if resource.get("resourceType") != rtype:
                out.problems.append(
                    Problem(where, "focus_mismatch", f"the EHR did not return a {rtype}")
                )
                continue
        try:
            _add(
                out,
                focus_to_clinical_event(
                    resource,
                    target.events,
                    target=target.name,
                    subscription=notification.subscription,
                    event=event,
                    received_at=message.received_at,
                ),
            )
        except MappingError as exc:
            out.problems.append(Problem(f"{where}.{exc.location}", exc.code, str(exc)))


# --------------------------------------------------------------------------- applying


class _AlreadyApplied(Exception):
    """Another process applied the message meanwhile (its lease had expired)."""


async def apply_prepared(
    session: AsyncSession, runtime: Runtime, message: InboundMessage, prepared: Prepared
) -> str:
    """Match and apply the events of one message; record problems as exceptions; mark
    the message applied (only if it is still waiting: else :class:`_AlreadyApplied`).

    ``message`` only needs its id, channel, sender and response (it may be detached).
    Flushes; the caller commits.

    Returns:
        The message's new status (``processed``, ``failed`` or ``ignored``).
    """
    workflow = runtime.profiles.current.workflow_or_raise
    outcomes: list[dict[str, Any]] = []
    failed = False
    for event in prepared.events:
        match = await find_patient(session, event.patient)
        if match.patient_id is None:
            failed = True
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
                            "no patient matches; tried: " + "; ".join(match.tried),
                        )
                    ],
                )
            )
            outcomes.append({"event_id": event.event_id, "outcome": "unmatched_patient"})
            log.info("events.unmatched_patient", message_id=message.id, tried=len(match.tried))
            continue
        record_conflicts(
            session, match, channel=message.channel, sender=message.sender, message_id=message.id
        )
        result = await apply_event(
            session,
            workflow,
            EventInput(
                source=event.source,
                sender=event.sender,
                event_id=event.event_id,
                type=event.type,
                detail=event.detail,
                occurred_at=event.occurred_at,
                patient_id=match.patient_id,
                program=event.program,
                case_id=event.case_id,
                message_id=message.id,
                channel=message.channel,
                reference=event.reference,
            ),
        )
        failed = failed or result.outcome in ("rejected", "no_case")
        outcomes.append(
            {"event_id": event.event_id, "outcome": result.outcome, "case_id": result.case_id}
        )
    if prepared.problems:
        failed = True
        session.add(
            inbox.new_exception(
                kind="unmappable_input",
                channel=message.channel,
                sender=message.sender,
                message_id=message.id,
                problems=prepared.problems,
            )
        )
    status = (
        MessageStatus.FAILED
        if failed
        else (MessageStatus.PROCESSED if prepared.events else MessageStatus.IGNORED)
    )
    summary: dict[str, Any] = {
        "events": outcomes,
        "ignored": prepared.ignored,
        "problems": len(prepared.problems),
    }
    single = outcomes[0] if len(outcomes) == 1 else {}
    marked = await session.execute(
        update(InboundMessage)
        .where(InboundMessage.id == message.id, InboundMessage.status == MessageStatus.RECEIVED)
        .values(
            status=status,
            processed_at=utcnow(),
            locked_until=None,
            response={
                **(message.response or {}),
                "status": str(status),
                "outcome": single.get("outcome"),
                "case_id": single.get("case_id"),
                "applied": summary,
            },
        )
        .execution_options(synchronize_session=False)
    )
    if not marked.rowcount:  # type: ignore[attr-defined]
        raise _AlreadyApplied(message.id)
    await session.flush()
    return str(status)


async def _claim(runtime: Runtime, message_id: str, now: datetime) -> InboundMessage | None:
    """Take the lease on a received message; None when it is not ours to process."""
    m = InboundMessage
    async with runtime.write_session() as session:
        result = await session.execute(
            update(m)
            .where(
                m.id == message_id,
                m.status == MessageStatus.RECEIVED,
                or_(m.locked_until.is_(None), m.locked_until < now),
                or_(m.available_at.is_(None), m.available_at <= now),
            )
            .values(locked_until=now + LEASE, attempts=m.attempts + 1)
            .execution_options(synchronize_session=False)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            await session.rollback()
            return None
        message = await session.get(InboundMessage, message_id)
        await session.commit()
        return message


def lease_for_this_process(runtime: Runtime, message: InboundMessage) -> bool:
    """Lease a message being stored to the process that stores it, when that process
    applies it right after the acknowledgement (``GATEWAY_APPLY_EVENTS_AFTER_ACK``, no
    separate claim then); the sweep takes it over only if that does not happen within
    :data:`LEASE`. Returns whether it was leased (False: the worker applies it)."""
    if not runtime.settings.apply_events_after_ack:
        return False
    message.locked_until = utcnow() + LEASE
    message.attempts = 1
    return True


async def _release(
    runtime: Runtime, message: InboundMessage, *, wait: timedelta | None, error: str
) -> None:
    """Give the lease back: for another process (``wait`` None, the attempt not counted)
    or for a retry after ``wait`` (failed for good after :data:`MAX_ATTEMPTS`)."""
    async with runtime.write_session() as session:
        row = await session.get(InboundMessage, message.id)
        if row is None or row.status != MessageStatus.RECEIVED:
            return
        row.locked_until = None
        if wait is None:
            row.attempts = max(0, row.attempts - 1)
        elif row.attempts >= MAX_ATTEMPTS:
            row.status = MessageStatus.FAILED
            row.processed_at = utcnow()
            session.add(
                inbox.new_exception(
                    kind="processing_error",
                    channel=row.channel,
                    sender=row.sender,
                    message_id=row.id,
                    problems=[
                        Problem(
                            "",
                            "retries_exhausted",
                            f"gave up after {row.attempts} attempts: {error}",
                        )
                    ],
                )
            )
        else:
            row.available_at = utcnow() + wait
        await session.commit()


async def _process(
    runtime: Runtime,
    message: InboundMessage,
    *,
    prepared: Prepared | None,
    reader: ResourceReader | None,
) -> str:
    """Prepare (unless given) and apply a message this process holds the lease of."""
    if prepared is None:
        prepared = await _prepare_or_release(runtime, message, reader)
        if prepared is None:
            return "deferred"
    for attempt in (1, 2, 3):
        try:
            async with runtime.write_session() as session:
                status = await apply_prepared(session, runtime, message, prepared)
                await session.commit()
                return status
        except _AlreadyApplied:
            return "skipped"
        except (StaleDataError, IntegrityError):
            # A concurrent change of the same case (SQLite) or a duplicate event row:
            # apply again on fresh state; duplicates are no-ops.
            log.info("events.apply_conflict", message_id=message.id, attempt=attempt)
    await _fail(runtime, message.id, "the case kept changing while the event was applied")
    return "failed"


async def process_message_by_id(
    runtime: Runtime, message_id: str, *, reader: ResourceReader | None = None
) -> str:
    """Claim and apply one stored message (the worker's sweep, a retry).

    Args:
        runtime: the wired runtime.
        message_id: the inbox id.
        reader: reads focus resources of id-only notifications from the EHR; without it
            such a message is left for the worker.

    Returns:
        ``processed | failed | ignored`` (the new status), ``deferred`` (left for a
        process that can read from the EHR, or retried later), or ``skipped`` (not
        received, or another process holds it).
    """
    message = await _claim(runtime, message_id, utcnow())
    if message is None:
        return "skipped"
    return await _process(runtime, message, prepared=None, reader=reader)


async def _fail(runtime: Runtime, message_id: str, reason: str) -> None:
    async with runtime.write_session() as session:
        row = await session.get(InboundMessage, message_id)
        if row is None or row.status != MessageStatus.RECEIVED:
            return
        row.status = MessageStatus.FAILED
        row.processed_at = utcnow()
        row.locked_until = None
        session.add(
            inbox.new_exception(
                kind="processing_error",
                channel=row.channel,
                sender=row.sender,
                message_id=row.id,
                problems=[Problem("", "processing_error", reason)],
            )
        )
        await session.commit()


async def process_safely(
    runtime: Runtime, message_id: str, *, reader: ResourceReader | None = None
) -> str:
    """:func:`process_message_by_id` for background tasks: an unexpected error marks the
    message failed (with an exception entry) instead of vanishing in a task."""
    try:
        return await process_message_by_id(runtime, message_id, reader=reader)
    except Exception as exc:
        log.error("events.process_failed", message_id=message_id, error_type=type(exc).__name__)
        await _fail(runtime, message_id, "the event could not be applied; see the logs")
        return "failed"


async def apply_received(
    runtime: Runtime, message: InboundMessage, *, prepared: Prepared | None = None
) -> str:
    """Apply a message this process just stored and leased (:func:`lease_for_this_process`),
    with the events mapped when it was received (``prepared``; mapped now when None).

    Never raises: an unexpected error marks the message failed with an exception entry.
    """
    try:
        return await _process(runtime, message, prepared=prepared, reader=None)
    except Exception as exc:
        log.error("events.process_failed", message_id=message.id, error_type=type(exc).__name__)
        await _fail(runtime, message.id, "the event could not be applied; see the logs")
        return "failed"


async def _claim_batch(runtime: Runtime, *, limit: int, now: datetime) -> list[InboundMessage]:
    """Lease up to ``limit`` due messages in one statement (``UPDATE ... WHERE id IN
    (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`` on PostgreSQL; without the lock clause
    on SQLite, whose single writer serializes the claim), oldest first."""
    m = InboundMessage
    due = (
        select(m.id)
        .where(
            m.status == MessageStatus.RECEIVED,
            m.channel.in_(EVENT_CHANNELS),
            or_(m.available_at.is_(None), m.available_at <= now),
            or_(m.locked_until.is_(None), m.locked_until < now),
        )
        .order_by(m.received_at)
        .limit(limit)
    )
    if runtime.engine.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    async with runtime.write_session() as session:
        rows = (
            await session.scalars(
                update(m)
                .where(m.id.in_(due.scalar_subquery()))
                .values(locked_until=now + LEASE, attempts=m.attempts + 1)
                .returning(m)
                .execution_options(synchronize_session=False)
            )
        ).all()
        await session.commit()
    return sorted(rows, key=lambda r: r.received_at)


async def _prepare_or_release(
    runtime: Runtime, message: InboundMessage, reader: ResourceReader | None
) -> Prepared | None:
    """:func:`prepare`, releasing the lease when the message must wait (EHR read)."""
    try:
        return await prepare(runtime, message, reader=reader)
    except FetchDeferredError:
        await _release(runtime, message, wait=None, error="needs an EHR read")
    except (EhrUnavailableError, EhrConfigError) as exc:
        wait = timedelta(seconds=min(300.0, 2.0**message.attempts))
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after:
            wait = max(wait, timedelta(seconds=retry_after))
        await _release(runtime, message, wait=wait, error=str(exc)[:200])
        log.info("events.fetch_failed", message_id=message.id, status_code=exc.status_code)
    return None


async def _apply_batch(
    runtime: Runtime, batch: list[tuple[InboundMessage, Prepared]]
) -> tuple[int, list[tuple[InboundMessage, Prepared]]]:
    """Apply a batch in one transaction, each message in a savepoint (PostgreSQL: one
    commit for the batch). Returns how many were applied and those to apply again alone."""
    done = 0
    again: list[tuple[InboundMessage, Prepared]] = []
    failed: list[str] = []
    async with runtime.write_session() as session:
        for message, prepared in batch:
            try:
                async with session.begin_nested():
                    await apply_prepared(session, runtime, message, prepared)
                done += 1
            except _AlreadyApplied:
                continue
            except (StaleDataError, IntegrityError):
                again.append((message, prepared))
            except Exception as exc:
                log.error(
                    "events.process_failed", message_id=message.id, error_type=type(exc).__name__
                )
                failed.append(message.id)
        await session.commit()
    for message_id in failed:
        await _fail(runtime, message_id, "the event could not be applied; see the logs")
    return done + len(failed), again


async def sweep_pending(
    runtime: Runtime, *, limit: int = 100, reader: ResourceReader | None = None
) -> int:
    """Apply stored events that were not applied yet (oldest first): stored by a process
    that does not apply them, left over after a crash, deferred for an EHR read, or due
    for a retry.

    One statement leases the batch. On PostgreSQL the batch is applied in one
    transaction with a savepoint per message (a failure affects only that message, and
    there is one commit for the batch); on SQLite each message has its own transaction.

    Returns:
        How many messages were processed (deferred and skipped ones not counted).
    """
    claimed = await _claim_batch(runtime, limit=limit, now=utcnow())
    if not claimed:
        return 0
    ready: list[tuple[InboundMessage, Prepared]] = []
    for message in claimed:
        prepared = await _prepare_or_release(runtime, message, reader)
        if prepared is not None:
            ready.append((message, prepared))
    done = 0
    if runtime.engine.dialect.name == "postgresql" and len(ready) > 1:
        done, ready = await _apply_batch(runtime, ready)
    for message, prepared in ready:
        try:
            outcome = await _process(runtime, message, prepared=prepared, reader=reader)
        except Exception as exc:
            log.error("events.process_failed", message_id=message.id, error_type=type(exc).__name__)
            await _fail(runtime, message.id, "the event could not be applied; see the logs")
            outcome = "failed"
        if outcome not in ("skipped", "deferred"):
            done += 1
    return done
