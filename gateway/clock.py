"""The injectable clock: what every worker loop, retry, lease, circuit breaker and token
manager asks for the time, and how they wait.

Production code takes a :class:`Clock` (default :data:`SYSTEM_CLOCK`) instead of calling
``datetime.now()``, ``time.monotonic()`` or ``asyncio.sleep()`` itself, so a test can
hand it a :class:`ManualClock` (frozen: moves only when told) or a
:class:`FastForwardClock` (the real time plus what the test skipped) and move time
forward instead of sleeping::

    clock = FastForwardClock()
    worker = delivery_worker(runtime, clock=clock)
    await worker.run_once()            # the EHR answers 503: retried later
    clock.advance(timedelta(minutes=5))
    await worker.run_once()            # due again: delivered

Timestamps are timezone-aware UTC (:func:`gateway.db.types.utcnow`); ``monotonic()`` is
seconds for measuring intervals.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

from gateway.db.types import utcnow


class Clock(Protocol):
    """Tells the time and waits."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals and TTLs)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock: :func:`utcnow`, :func:`time.monotonic`, :func:`asyncio.sleep`."""

    def now(self) -> datetime:
        """The current time (UTC)."""
        return utcnow()

    def monotonic(self) -> float:
        """:func:`time.monotonic`."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """:func:`asyncio.sleep`."""
        await asyncio.sleep(max(0.0, seconds))


#: The clock of every process (one instance: it holds no state).
SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that moves only when told (tests, simulations).

    :meth:`sleep` moves the clock forward by the time asked for and yields to the event
    loop once, so code that waits finishes at once, having seen the time pass.

    Args:
        start: the initial time (default: the real time now, so rows written with it
            sort with rows written by other processes).
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or utcnow()
        if self._now.tzinfo is None:
            self._now = self._now.replace(tzinfo=UTC)
        self._monotonic = 1000.0

    def now(self) -> datetime:
        """The clock's time."""
        return self._now

    def monotonic(self) -> float:
        """Seconds since an arbitrary start, moved with :meth:`advance`."""
        return self._monotonic

    def advance(self, delta: timedelta | float) -> None:
        """Move the clock forward by ``delta`` (a timedelta, or seconds)."""
        seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += timedelta(seconds=seconds)
        self._monotonic += seconds

    async def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` and let other tasks run once."""
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


class FastForwardClock:
    """The real clock, plus however far a test skipped ahead (never behind real time, so
    rows other code stamps with the real time stay in its past).

    :meth:`sleep` and :meth:`advance` skip ahead at once instead of waiting.
    """

    def __init__(self) -> None:
        self._offset_s = 0.0

    def now(self) -> datetime:
        """The real time plus the skipped time."""
        return utcnow() + timedelta(seconds=self._offset_s)

    def monotonic(self) -> float:
        """:func:`time.monotonic` plus the skipped time."""
        return time.monotonic() + self._offset_s

    def advance(self, delta: timedelta | float) -> None:
        """Skip ``delta`` (a timedelta, or seconds) ahead."""
        seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._offset_s += seconds

    async def sleep(self, seconds: float) -> None:
        """Skip ``seconds`` ahead and let other tasks run once."""
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
