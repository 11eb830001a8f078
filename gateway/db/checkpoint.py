"""SQLite WAL checkpoints in the background, off the request path.

In WAL mode SQLite copies the log back into the database file (a checkpoint, with an
fsync) once the log passes ``wal_autocheckpoint`` pages (1000: 4 MB); that happens inside
the ``COMMIT`` of whichever transaction crossed the line, so one acknowledgement (and the
writers queued behind it) waits for it: about 14 ms on the development machine for 4 MB.
A server process instead runs a ``PASSIVE`` checkpoint every half second on a pooled
connection of its own: it does not take the write lock, writers go on meanwhile, and the
log rarely grows to the automatic threshold, which stays as the backstop (for the CLI, or
if this task stops).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.logging import get_logger

log = get_logger(__name__)

#: How often a server process checkpoints the SQLite WAL.
CHECKPOINT_INTERVAL = timedelta(milliseconds=500)


async def checkpoint_once(engine: AsyncEngine) -> tuple[int, int, int]:
    """One ``PRAGMA wal_checkpoint(PASSIVE)``.

    Returns:
        SQLite's answer: ``(busy, log pages, pages checkpointed)``.
    """
    async with engine.connect() as conn:
        result = await conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        busy, pages, done = (int(v) for v in result.one())
    return busy, pages, done


async def run_checkpoints(
    engine: AsyncEngine, stop: asyncio.Event, *, interval: timedelta = CHECKPOINT_INTERVAL
) -> None:
    """Checkpoint the WAL every ``interval`` until ``stop`` is set (SQLite only; returns
    at once for another database). A failed checkpoint is logged (its type only) and
    tried again at the next interval."""
    if engine.dialect.name != "sqlite":
        return
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval.total_seconds())
            return
        try:
            await checkpoint_once(engine)
        except Exception as exc:  # keep checkpointing; the automatic one is the backstop
            log.warning("db.checkpoint_failed", error_type=type(exc).__name__)
