"""End-to-end fixtures: the runtime on a clock the tests can skip ahead (retries)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.clock import FastForwardClock
from gateway.runtime import Runtime
from gateway.settings import Settings


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """The wired runtime on the test database, on a :class:`FastForwardClock`."""
    rt = Runtime.create(settings)
    rt.clock = FastForwardClock()
    try:
        yield rt
    finally:
        await rt.close()
