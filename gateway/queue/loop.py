"""Worker loops over the one queue, and the worker process that runs them.

A worker process (``fhir-gateway worker``, or the embedded worker of ``serve``) is a
:class:`Worker` running registered :class:`Loop`\\ s side by side, each with its own
concurrency: deliveries (:class:`gateway.delivery.worker.DeliveryWorker`), inbox apply
(the clinical events waiting to be applied) and workflow timers. Each loop owns its
transactions (:func:`gateway.db.uow.unit_of_work`); the services it calls flush at most.

:class:`PollingLoop` is the plain kind: it calls a ``step`` that does one batch of work
and says how much it did; it calls it again at once while there was work, and otherwise
waits ``poll`` (or until woken: :meth:`Worker.wake`). :class:`Heartbeat` keeps the leases
of the rows a loop is working on alive.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

from gateway.clock import Clock
from gateway.db.uow import SessionFactory, unit_of_work
from gateway.logging import get_logger, log_failure
from gateway.queue import repository as queue
from gateway.queue.repository import QueueTable

log = get_logger(__name__)

#: One batch of a loop's work; returns how much it did (0: nothing was due).
Step = Callable[[], Awaitable[int]]


class Loop(Protocol):
    """One kind of work in a worker process."""

    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then finish what is in hand."""
        ...

    def wake(self) -> None:
        """Look for work now instead of at the next poll."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


async def wait_any(stop: asyncio.Event, *events: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``stop`` or one of ``events`` is set, or ``timeout_s`` passes."""
    waiters = [asyncio.ensure_future(e.wait()) for e in (stop, *events)]
    try:
        await asyncio.wait(
            waiters, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in waiters:
            waiter.cancel()


class PollingLoop:
    """Runs ``step`` until stopped: again at once while it did work, else after ``poll``
    or a :meth:`wake`. An exception in a step is logged (type and frames only: its
    message may hold PHI) and the loop goes on after the poll interval.

    Args:
        name: the loop's name in logs.
        step: one batch of work.
        poll: the wait when a step found nothing to do.
        close: releases the loop's resources (:meth:`aclose`).
    """

    def __init__(
        self,
        name: str,
        step: Step,
        *,
        poll: timedelta,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self._step = step
        self._poll_s = poll.total_seconds()
        self._close = close
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Run the next step now."""
        self._wakeup.set()

    async def run_once(self) -> int:
        """One step (tests); its errors propagate."""
        return await self._step()

    async def run(self, stop: asyncio.Event) -> None:
        """Step until ``stop`` is set."""
        while not stop.is_set():
            self._wakeup.clear()
            done = 0
            try:
                done = await self._step()
            except Exception as exc:
                log_failure(log, "worker.loop_failed", exc, loop=self.name)
            if not done:
                await wait_any(stop, self._wakeup, timeout_s=self._poll_s)

    async def aclose(self) -> None:
        """Release the loop's resources."""
        if self._close is not None:
            await self._close()


class Heartbeat:
    """Keeps a worker's leases on a queue alive: every third of the lease, the rows it
    holds (:meth:`hold`) get ``locked_until = now + lease``. A worker that dies stops
    beating, and its rows are claimed again when their lease runs out.

    Args:
        queue_table: the queue.
        sessions: write sessions (one short transaction per beat).
        worker: the lease owner.
        lease: the lease length.
        clock: the worker's clock.
    """

    def __init__(
        self,
        queue_table: QueueTable,
        *,
        sessions: SessionFactory,
        worker: str,
        lease: timedelta,
        clock: Clock,
    ) -> None:
        self._queue = queue_table
        self._sessions = sessions
        self._worker = worker
        self._lease = lease
        self._clock = clock
        self._held: dict[Any, int] = {}

    def hold(self, row_id: Any) -> None:
        """Beat for ``row_id`` until :meth:`drop`."""
        self._held[row_id] = self._held.get(row_id, 0) + 1

    def drop(self, row_id: Any) -> None:
        """Stop beating for ``row_id``."""
        count = self._held.pop(row_id, 0) - 1
        if count > 0:
            self._held[row_id] = count

    async def beat(self) -> int:
        """Extend the leases now; returns how many rows were still this worker's."""
        ids = list(self._held)
        if not ids:
            return 0
        async with unit_of_work(self._sessions) as session:
            return await queue.extend_leases(
                session,
                self._queue,
                ids=ids,
                worker=self._worker,
                locked_until=self._clock.now() + self._lease,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every third of the lease until ``stop`` is set."""
        interval = max(0.05, self._lease.total_seconds() / 3)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            try:
                await self.beat()
            except Exception as exc:
                log_failure(log, "worker.heartbeat_failed", exc, worker=self._worker)


class Worker:
    """A worker process: its loops, run together until stopped.

    Args:
        loops: the registered loops (each runs its own concurrency).
        name: the worker's name (lease owner prefix) for logs.
    """

    def __init__(self, loops: Sequence[Loop], *, name: str) -> None:
        self.loops = list(loops)
        self.name = name

    def loop(self, name: str) -> Loop:
        """The registered loop called ``name``.

        Raises:
            KeyError: no such loop.
        """
        for loop in self.loops:
            if loop.name == name:
                return loop
        raise KeyError(name)

    def wake(self) -> None:
        """Every loop looks for work now."""
        for loop in self.loops:
            loop.wake()

    async def run(self, stop: asyncio.Event) -> None:
        """Run every loop until ``stop`` is set; each finishes what it has in hand."""
        log.info("worker.started", worker=self.name, loops=[loop.name for loop in self.loops])
        try:
            await asyncio.gather(*(loop.run(stop) for loop in self.loops))
        finally:
            log.info("worker.stopped", worker=self.name)

    async def aclose(self) -> None:
        """Close every loop's connections."""
        for loop in self.loops:
            await loop.aclose()
