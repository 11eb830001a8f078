"""Helpers for delivery tests: queue messages, run several workers, wait for outcomes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import func, select

from gateway.clock import Clock, FastForwardClock
from gateway.db.models import Delivery, DeliveryAttempt, OAuthToken, TargetState
from gateway.delivery.worker import DeliveryWorker
from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from tests import samples


async def submit_intakes(
    client: httpx.AsyncClient, headers: dict[str, str], n: int
) -> list[dict[str, Any]]:
    """Post ``n`` fresh intake submissions; returns the submissions."""
    sent = []
    for _ in range(n):
        intake = samples.intake()
        response = await client.post("/v1/intake-submissions", json=intake, headers=headers)
        assert response.status_code == 202, response.text
        sent.append(intake)
    return sent


async def status_counts(runtime: Runtime) -> dict[str, int]:
    """Deliveries by status."""
    async with runtime.sessionmaker() as session:
        rows = await session.execute(
            select(Delivery.status, func.count()).group_by(Delivery.status)
        )
        return {status: count for status, count in rows}


async def deliveries(runtime: Runtime) -> list[Delivery]:
    """Every delivery row, by id."""
    async with runtime.sessionmaker() as session:
        return list(await session.scalars(select(Delivery).order_by(Delivery.id)))


async def attempts(runtime: Runtime) -> list[DeliveryAttempt]:
    """Every attempt row, by delivery and id."""
    async with runtime.sessionmaker() as session:
        return list(
            await session.scalars(
                select(DeliveryAttempt).order_by(DeliveryAttempt.delivery_id, DeliveryAttempt.id)
            )
        )


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float, interval_s: float = 0.05
) -> bool:
    """Poll ``check`` until it is true or ``timeout_s`` passes; returns the last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)


async def all_delivered(runtime: Runtime, n: int) -> bool:
    """True when ``n`` deliveries exist and all are delivered."""
    counts = await status_counts(runtime)
    return counts.get("delivered", 0) == n and sum(counts.values()) == n


@contextlib.asynccontextmanager
async def running_workers(
    runtime: Runtime,
    n: int,
    *,
    concurrency: int = 4,
    token_transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[list[DeliveryWorker]]:
    """``n`` independent workers (own HTTP clients and token managers: they share only the
    database, as separate processes do) running until the block ends."""
    workers = [
        delivery_worker(
            runtime, concurrency=concurrency, token_transport=token_transport, clock=clock
        )
        for _ in range(n)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        yield workers
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in workers:
            await w.aclose()


async def drain(runtime: Runtime, worker: DeliveryWorker, *, rounds: int = 200) -> None:
    """Run ``worker`` round by round until no delivery is pending or in flight, skipping
    its clock (a :class:`FastForwardClock`) ahead to the next due time (a retry, a
    throttle, a probe) instead of waiting for it."""
    clock = worker.clock
    assert isinstance(clock, FastForwardClock), "drain needs a worker on a FastForwardClock"
    for _ in range(rounds):
        await worker.run_once()
        counts = await status_counts(runtime)
        if not counts.get("pending") and not counts.get("in_flight"):
            return
        await skip_to_next_due(runtime, clock)
    raise AssertionError(f"deliveries still queued after {rounds} rounds")


async def skip_to_next_due(runtime: Runtime, clock: FastForwardClock) -> None:
    """Skip ``clock`` ahead to the next time something changes: a delivery is due, a
    lease, a throttle or a token backoff ends, a probe is due."""
    async with runtime.sessionmaker() as session:
        due = [
            await session.scalar(
                select(func.min(Delivery.available_at)).where(Delivery.status == "pending")
            ),
            await session.scalar(
                select(func.min(Delivery.locked_until)).where(Delivery.status == "in_flight")
            ),
            await session.scalar(select(func.max(TargetState.throttled_until))),
            await session.scalar(select(func.min(TargetState.next_probe_at))),
            await session.scalar(select(func.max(OAuthToken.next_attempt_at))),
        ]
    now = clock.now()
    later = [d for d in due if d is not None and d > now]
    if later:
        clock.advance(min(later) - now + timedelta(milliseconds=1))
