"""Acting on the exceptions queue: assign an owner, resolve with a reason, retry.

One service for ``/v1/ops/exceptions`` (:mod:`gateway.ops.exceptions`) and the console
(:mod:`gateway.console`): both flush through here and record the audit entry with the
acting agent (:func:`gateway.clients.actor.current_actor`).

Retry:

* an exception about a stored inbound message (event channels): the message goes back to
  the inbox, due now; every open exception of that message is marked ``retried``; the
  caller applies it right after its answer (:attr:`RetryResult.message_id`);
* an HL7 message refused with AR (kept whole): received again, as if just sent (for a
  sending facility added to the profiles since; :attr:`RetryResult.reply`);
* anything else cannot be retried here (:class:`~gateway.errors.ConflictError`): resend
  it from its source, replay the delivery, or re-query the EHR for missed events.

Errors: :class:`~gateway.errors.NotFoundError` (no such exception),
:class:`~gateway.errors.ConflictError` (not open; not retryable).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.db.models import Case, ExceptionRecord, ExceptionStatus, InboundMessage, MessageStatus
from gateway.errors import ConflictError, NotFoundError
from gateway.events.service import EVENT_CHANNELS
from gateway.hl7.service import CHANNEL as HL7_CHANNEL
from gateway.hl7.service import Hl7Reply, receive_hl7
from gateway.runtime import Runtime
from mappers.errors import Problem


async def get_exception_or_raise(session: AsyncSession, exception_id: int) -> ExceptionRecord:
    """The exception with this id.

    Raises:
        NotFoundError: no such exception.
    """
    row = await session.get(ExceptionRecord, exception_id)
    if row is None:
        raise NotFoundError("no such exception")
    return row


def retryable(row: ExceptionRecord, message_channel: str | None) -> bool:
    """True if :func:`retry_exception` can act on ``row`` (open, and something stored to
    apply again); ``message_channel``: the channel of its inbound message, if any."""
    if row.status != ExceptionStatus.OPEN:
        return False
    if row.inbound_message_id and message_channel in EVENT_CHANNELS:
        return True
    return row.inbound_message_id is None and row.channel == HL7_CHANNEL and row.payload is not None


async def message_channels(session: AsyncSession, rows: list[ExceptionRecord]) -> dict[str, str]:
    """The channel of each inbound message the exceptions ``rows`` are about
    (message id -> channel)."""
    ids = {r.inbound_message_id for r in rows if r.inbound_message_id}
    if not ids:
        return {}
    found = await session.execute(
        select(InboundMessage.id, InboundMessage.channel).where(InboundMessage.id.in_(ids))
    )
    return {i: c for i, c in found}


async def patient_of(session: AsyncSession, row: ExceptionRecord) -> str | None:
    """The Patient an exception is about, when its case is known (for the audit trail)."""
    if row.case_id is None:
        return None
    return await session.scalar(select(Case.patient_id).where(Case.id == row.case_id))


def _must_be_open(row: ExceptionRecord) -> None:
    if row.status != ExceptionStatus.OPEN:
        raise ConflictError(
            "the exception is not open", [Problem("status", "not_open", f"it is {row.status}")]
        )


async def assign_exception(
    session: AsyncSession,
    row: ExceptionRecord,
    *,
    assignee: str | None,
    now: datetime,
) -> ExceptionRecord:
    """Give an open exception an owner (a staff username or a client name), or take it
    back (``assignee=None``); audited as ``assign``.

    Raises:
        ConflictError: the exception is not open.
    """
    _must_be_open(row)
    row.assigned_to = assignee
    row.assigned_at = now if assignee else None
    audit.record(
        session,
        action="assign",
        entity_type="Exception",
        entity_id=str(row.id),
        patient_id=await patient_of(session, row),
        detail={"assigned_to": assignee},
    )
    await session.flush()
    return row


async def resolve_exception(
    session: AsyncSession,
    row: ExceptionRecord,
    *,
    by: str,
    note: str | None,
    now: datetime,
) -> ExceptionRecord:
    """Mark an open exception resolved by ``by`` with ``note`` (why; no PHI); audited as
    ``resolve``.

    Raises:
        ConflictError: the exception is not open.
    """
    _must_be_open(row)
    row.status = ExceptionStatus.RESOLVED
    row.resolved_at = now
    row.resolved_by = by
    row.note = note
    audit.record(
        session,
        action="resolve",
        entity_type="Exception",
        entity_id=str(row.id),
        patient_id=await patient_of(session, row),
    )
    await session.flush()
    return row


@dataclass(frozen=True)
class RetryResult:
    """What a retry did: the answer's body, and what the caller applies after answering
    (the stored message's id, or the HL7 reply of a message received again)."""

    body: dict[str, Any]
    message_id: str | None = None
    reply: Hl7Reply | None = None


async def retry_exception(
    session: AsyncSession,
    runtime: Runtime,
    row: ExceptionRecord,
    *,
    by: str,
    note: str | None,
    now: datetime,
) -> RetryResult:
    """Apply the input of an exception again (see the module docstring); audited as
    ``retry``.

    Raises:
        ConflictError: not open, or nothing stored to apply again.
    """
    message = (
        await session.get(InboundMessage, row.inbound_message_id)
        if row.inbound_message_id
        else None
    )
    if not retryable(row, message.channel if message else None):
        raise ConflictError(
            "this exception cannot be retried here",
            [
                Problem(
                    "kind",
                    "not_retryable",
                    "not open, or nothing stored to apply again: resend it from its source, "
                    "replay the delivery, or re-query the EHR",
                )
            ],
        )
    body: dict[str, Any] = {"exception_id": row.id, "status": ExceptionStatus.RETRIED}
    result: RetryResult
    if message is not None:
        message.status = MessageStatus.RECEIVED
        message.attempts = 0
        message.available_at = now  # due again in the inbox (applied right after)
        message.locked_until = None
        message.locked_by = None
        message.processed_at = None
        await session.execute(
            update(ExceptionRecord)
            .where(
                ExceptionRecord.inbound_message_id == message.id,
                ExceptionRecord.status == ExceptionStatus.OPEN,
            )
            .values(
                status=ExceptionStatus.RETRIED,
                resolved_at=now,
                resolved_by=by,
                retries=ExceptionRecord.retries + 1,
                note=note,
            )
            .execution_options(synchronize_session=False)
        )
        body["message_id"] = message.id
        result = RetryResult(body, message_id=message.id)
    else:
        if row.payload is None:  # retryable() checked it
            raise ConflictError("nothing stored to apply again")
        reply = await receive_hl7(session, runtime, raw=row.payload, transport="retry")
        row.status = ExceptionStatus.RETRIED
        row.resolved_at = now
        row.resolved_by = by
        row.retries += 1
        row.note = note
        body["ack_code"] = reply.code
        body["message_id"] = reply.message_id
        result = RetryResult(body, reply=reply)
    audit.record(
        session,
        action="retry",
        entity_type="Exception",
        entity_id=str(row.id),
        patient_id=await patient_of(session, row),
        detail={"message_id": body.get("message_id")},
    )
    return result
