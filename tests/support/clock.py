"""A runtime on a clock tests can skip ahead (retries, throttles, leases, SLA timers)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from gateway.clock import FastForwardClock
from gateway.runtime import Runtime
from gateway.settings import Settings


@contextlib.asynccontextmanager
async def fast_forward_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """The wired runtime on ``settings``' database, on a :class:`FastForwardClock`: every
    worker and lease built from it skips ahead instead of waiting."""
    runtime = Runtime.create(settings)
    runtime.clock = FastForwardClock()
    try:
        yield runtime
    finally:
        await runtime.close()
