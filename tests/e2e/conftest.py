"""End-to-end fixtures: the runtime on a clock the tests can skip ahead (retries)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.runtime import Runtime
from gateway.settings import Settings
from tests.support.clock import fast_forward_runtime


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """The wired runtime on the test database, on a :class:`FastForwardClock`: a test
    skips ahead to a retry, a throttle's end or a lease's expiry instead of waiting."""
    async with fast_forward_runtime(settings) as rt:
        yield rt
