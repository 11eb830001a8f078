"""Queries on ``inbound_messages`` and ``exceptions``."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import ExceptionRecord, InboundMessage, MessageStatus
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
