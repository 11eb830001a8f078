"""End-to-end fixtures: the runtime on a clock the tests can skip ahead (retries)."""

from __future__ import annotations

import pytest

from gateway.clock import FastForwardClock
from gateway.runtime import Runtime


@pytest.fixture
def runtime(runtime: Runtime) -> Runtime:
    """The wired runtime of the test (tests/conftest.py), on a :class:`FastForwardClock`: a
    test skips ahead to a retry, a throttle's end or a lease's expiry instead of waiting."""
    runtime.clock = FastForwardClock()
    return runtime
