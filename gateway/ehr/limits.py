"""A request rate limit per target, shared by every process: a token bucket stored in the
target's ``target_states`` row (``rate_tokens``, ``rate_updated_s``).

Taking a token is one atomic ``UPDATE ... WHERE <refilled tokens> >= 1``: the bucket is
refilled by ``rate * elapsed`` (capped at ``burst``) and one token taken, or nothing
changes and the caller sleeps until a token will be there. Elapsed time comes from each
process's wall clock; a host whose clock is behind only makes the limit stricter.

Taking a token is its own unit of work, committed at once whatever the caller is doing:
the bucket is shared by every process, and holding its row until the caller's
transaction ends would serialize all requests to the target. The caller (the EHR client,
before each request) holds no transaction of its own meanwhile.
"""

from __future__ import annotations

import random

from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.db.bulk import insert_ignore
from gateway.db.models import TargetState
from gateway.db.uow import unit_of_work


class RateLimiter:
    """Waits until a target's shared request rate allows one more request.

    Args:
        sessionmaker: sessions on the gateway database.
        kind: the delivery kind whose target rows hold the buckets.
        clock: the clock (its wall time in epoch seconds fills the bucket; it waits).
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        kind: str = "ehr",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._kind = kind
        self._clock = clock

    async def acquire(self, target: str, *, rate_per_s: float, burst: float) -> None:
        """Take one request token for ``target``, sleeping while the bucket is empty.

        Args:
            target: the target name.
            rate_per_s: refill rate, requests per second.
            burst: bucket size (requests allowed at once after a quiet period).
        """
        while True:
            now = self._clock.now().timestamp()
            tokens = (
                func.coalesce(TargetState.rate_tokens, burst)
                + (now - func.coalesce(TargetState.rate_updated_s, now)) * rate_per_s
            )
            refilled = case((tokens > burst, burst), else_=tokens)
            where = (TargetState.kind == self._kind, TargetState.target == target)
            async with unit_of_work(self._sessionmaker) as session:
                taken = await session.scalar(
                    update(TargetState)
                    .where(*where, refilled >= 1)
                    .values(rate_tokens=refilled - 1, rate_updated_s=now)
                    .returning(TargetState.target)
                    .execution_options(synchronize_session=False)
                )
                if taken is None:
                    row = (
                        await session.execute(
                            select(TargetState.rate_tokens, TargetState.rate_updated_s).where(
                                *where
                            )
                        )
                    ).first()
                    if row is None:
                        await session.execute(
                            insert_ignore(session, TargetState)
                            .values(
                                kind=self._kind,
                                target=target,
                                circuit="closed",
                                consecutive_failures=0,
                                probe_failures=0,
                            )
                            .on_conflict_do_nothing()
                        )
            if taken is not None:
                return
            if row is None:
                continue
            have = min(burst, (row[0] or 0.0) + (now - (row[1] or now)) * rate_per_s)
            wait_s = max(0.001, (1.0 - have) / rate_per_s)
            await self._clock.sleep(wait_s * random.uniform(1.0, 1.2))  # noqa: S311 - jitter
