"""The unit of work: one transaction, committed by whoever owns it.

Only the entry points own a transaction: the request dependency
(:func:`gateway.deps.get_session`), each worker loop, the MLLP listener per message, a CLI
command, and the few components that must commit on their own schedule whatever their
caller does (the token manager's single-flight refresh, the shared rate limit); each says
so where it opens one. Services take a session, ``flush()`` at most, and never commit.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from sqlalchemy.ext.asyncio import AsyncSession

#: Opens a session: ``runtime.write_session``, ``runtime.sessionmaker`` or an
#: ``async_sessionmaker``.
SessionFactory = Callable[[], AbstractAsyncContextManager[AsyncSession]]


@contextlib.asynccontextmanager
async def unit_of_work(sessions: SessionFactory) -> AsyncIterator[AsyncSession]:
    """A session whose transaction commits when the block ends normally and rolls back
    when it raises (the exception propagates).

    Args:
        sessions: where the session comes from (on SQLite pass ``runtime.write_session``
            for writes: writers of one process take turns).
    """
    async with sessions() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()
