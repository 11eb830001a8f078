"""Queries on ``inbound_messages`` and ``exceptions``."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import (
    ExceptionPayload,
    ExceptionRecord,
    ExceptionStatus,
    InboundMessage,
    MessageStatus,
)
from gateway.db.types import utcnow
from mappers.errors import Problem


def content_hash(body: bytes) -> str:
    """Hex SHA-256 of a raw body."""
    return hashlib.sha256(body).hexdigest()


def dedupe_key(channel: str, sender: str, external_id: str) -> str:
    """The unique key of a message: the sender's own id, scoped by channel and sender."""
    return f"{channel}:{sender}:{external_id}"


async def get_message(session: AsyncSession, message_id: str) -> InboundMessage | None:
    """The message with this id, or None."""
    return await session.get(InboundMessage, message_id)


async def get_message_by_key(session: AsyncSession, key: str) -> InboundMessage | None:
    """The message with this dedupe key, or None."""
    return await session.scalar(select(InboundMessage).where(InboundMessage.dedupe_key == key))


def new_message(
    *,
    channel: str,
    sender: str,
    external_id: str,
    body: bytes,
    content_type: str,
    status: MessageStatus = MessageStatus.RECEIVED,
    principal: str | None = None,
) -> InboundMessage:
    """A new inbox row (not yet added to a session), received now: ``received_at`` is set
    here, not at flush, because the outbox rows written with it copy it.

    ``principal`` is who authenticated the message (``client:<name>``,
    ``cert:<CN>:sha256:<hex>``, ``signature:<partner>``...); each event of the message
    carries it into the case history."""
    return InboundMessage(
        id=str(uuid.uuid4()),
        channel=channel,
        sender=sender[:128] if sender else sender,
        external_id=external_id,
        dedupe_key=dedupe_key(channel, sender, external_id),
        content_hash=content_hash(body),
        # the sender's declared type, kept for review: cut to the column (128)
        content_type=content_type[:128] if content_type else content_type,
        body=body,
        status=status,
        received_at=utcnow(),
        principal=principal,
    )


def new_exception(
    *,
    kind: str,
    channel: str,
    problems: list[Problem],
    sender: str | None = None,
    message_id: str | None = None,
    case_id: str | None = None,
    payload: bytes | None = None,
    content_type: str | None = None,
    principal: str | None = None,
) -> ExceptionRecord:
    """A new exceptions-queue entry. ``payload`` keeps the raw input for review;
    ``principal`` is who sent it, when it was authenticated."""
    return ExceptionRecord(
        kind=kind,
        channel=channel,
        sender=sender[:128] if sender else sender,
        inbound_message_id=message_id,
        case_id=case_id,
        payload=payload,
        # the sender's declared type, kept for review: cut to the column (128)
        content_type=content_type[:128] if content_type else content_type,
        problems=[p.as_dict() for p in problems],
        principal=principal,
    )


def problems_from(records: list[dict[str, Any]]) -> list[Problem]:
    """Problems back from their stored dicts."""
    return [
        Problem(r.get("location", ""), r.get("code", ""), r.get("message", "")) for r in records
    ]


#: The exceptions-queue kind of a refused payload (400, 409, 415, 422).
REJECTED_INPUT = "rejected_input"


def refusal_group_key(
    *, channel: str, sender: str | None, status: int, problems: list[Problem]
) -> str:
    """What makes two refusals "the same": the channel, the sender (the API client, the
    partner, the EHR target), the HTTP status and the problem codes (not their locations
    or messages, which vary with the payload), as a SHA-256 hex digest."""
    reason = [channel, sender or "", status, sorted({p.code for p in problems})]
    return hashlib.sha256(json.dumps(reason).encode()).hexdigest()


async def record_grouped_refusal(
    session: AsyncSession,
    *,
    channel: str,
    sender: str | None,
    status: int,
    problems: list[Problem],
    payload: bytes,
    content_type: str | None,
) -> tuple[ExceptionRecord, int]:
    """Keep a refused payload: a new ``rejected_input`` exception, or one more occurrence
    of the open one with the same :func:`refusal_group_key` (a client that sends the same
    bad request again and again is one line in the queue, with its count).

    Every payload is kept whole: the group's first on the exception (``payload``), each
    later one in ``exception_payloads`` with its ``seq`` (2, 3...). On PostgreSQL the open
    group's row is locked, so concurrent refusals count one after the other; two first
    refusals at the same moment may still open two groups. Flushes; the caller commits.

    Returns:
        The exception and the payload's ``seq`` in it (1 for a new group).
    """
    key = refusal_group_key(channel=channel, sender=sender, status=status, problems=problems)
    now = utcnow()
    stmt = (
        select(ExceptionRecord)
        .where(
            ExceptionRecord.group_key == key,
            ExceptionRecord.status == ExceptionStatus.OPEN,
            ExceptionRecord.kind == REJECTED_INPUT,
        )
        .order_by(ExceptionRecord.id)
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    record = await session.scalar(stmt)
    if record is None:
        record = new_exception(
            kind=REJECTED_INPUT,
            channel=channel,
            sender=sender,
            problems=problems,
            payload=payload,
            content_type=content_type,
        )
        record.group_key = key
        record.occurrences = 1
        record.last_seen_at = now
        session.add(record)
        await session.flush()
        return record, 1
    seq = await session.scalar(
        update(ExceptionRecord)
        .where(ExceptionRecord.id == record.id)
        .values(occurrences=ExceptionRecord.occurrences + 1, last_seen_at=now)
        .returning(ExceptionRecord.occurrences)
        .execution_options(synchronize_session=False)
    )
    assert seq is not None
    session.add(
        ExceptionPayload(
            exception_id=record.id,
            seq=seq,
            payload=payload,
            content_type=content_type[:128] if content_type else content_type,
            received_at=now,
        )
    )
    await session.flush()
    return record, seq


async def refused_payload(
    session: AsyncSession, record: ExceptionRecord, seq: int
) -> tuple[bytes, str | None] | None:
    """Payload ``seq`` of a grouped exception (1: the exception's own) and its declared
    content type, or None."""
    if seq == 1:
        return (record.payload, record.content_type) if record.payload is not None else None
    row = await session.scalar(
        select(ExceptionPayload).where(
            ExceptionPayload.exception_id == record.id, ExceptionPayload.seq == seq
        )
    )
    return (row.payload, row.content_type) if row is not None else None
