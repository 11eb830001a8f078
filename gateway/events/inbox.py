"""Storing an inbound message in one statement: ``INSERT ... ON CONFLICT (dedupe_key) DO
NOTHING`` (SQLite 3.24+ and PostgreSQL), so the acknowledgement path does not first
look the key up, and two copies of one message arriving at once cannot both be stored."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import InboundMessage
from gateway.db.types import utcnow
from gateway.inbox import repository as inbox


async def store_if_new(session: AsyncSession, message: InboundMessage) -> InboundMessage | None:
    """Insert ``message`` (fully built: status, response...) unless a message with its
    dedupe key exists.

    The row is written with a Core insert: ``message`` itself stays outside the session
    and is not updated by later flushes.

    Returns:
        None when stored; the existing message when the key was taken (a retransmission).
    """
    table = InboundMessage.__table__
    message.received_at = message.received_at or utcnow()
    # None values are left out so the columns' defaults apply (status, revision...)
    values: dict[str, Any] = {
        c.key: getattr(message, c.key) for c in table.columns if getattr(message, c.key) is not None
    }
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = (
        insert(InboundMessage)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(InboundMessage.id)
    )
    # RETURNING tells whether the row was written (rowcount is not reliable here).
    if (await session.execute(stmt)).scalar_one_or_none() is not None:
        return None
    return await inbox.get_message_by_key(session, message.dedupe_key)
