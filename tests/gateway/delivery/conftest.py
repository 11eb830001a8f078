"""Delivery test fixtures: fast-polling settings, a local EHR, target profiles."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import FastForwardClock
from gateway.runtime import Runtime
from gateway.settings import Settings
from mappers.profiles import load_profiles
from mappers.profiles.ehr import EhrTargetProfile
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV, profiles_with_target


@pytest.fixture
def settings(database_url: str, profiles_dir: Path) -> Settings:
    """Test settings with a fast poll and a short lease."""
    return Settings(
        database_url=database_url,
        profiles_dir=profiles_dir,
        run_worker=False,
        stripe_webhook_secret="whsec_test_secret_for_tests_only",  # type: ignore[arg-type]
        worker_poll_interval=timedelta(milliseconds=20),
        worker_lease=timedelta(seconds=5),
        log_json=True,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
def local_ehr(make_ehr: EhrFactory) -> LocalEhr:
    """The EHR's state (a test may replace it before ``ehr`` starts it)."""
    return make_ehr(client_id="gateway", client_secret="s3cret")


@pytest.fixture
async def ehr(
    local_ehr: LocalEhr, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[LocalEhr, RunningEhr]]:
    """The local EHR served on a local port; the target's secret in the environment."""
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    async with run_ehr_async(local_ehr) as running:
        yield local_ehr, running


TargetFactory = Callable[..., EhrTargetProfile]


@pytest.fixture
def use_target(runtime: Runtime, tmp_path: Path) -> TargetFactory:
    """``use_target(running, **profile_fields)``: make the runtime deliver to ``running``
    with a ``test-ehr`` target of those fields (profiles written and loaded again)."""

    def make(running: RunningEhr, **extra: Any) -> EhrTargetProfile:
        folder = tmp_path / f"profiles-{uuid.uuid4().hex[:6]}"
        profiles_with_target(folder, running, extra=extra)
        runtime.profiles.current = load_profiles(folder)
        return runtime.profiles.current.ehr["test-ehr"]

    return make


@pytest.fixture
def runtime(runtime: Runtime) -> Runtime:
    """The wired runtime of the test (tests/conftest.py), on a :class:`FastForwardClock`: a
    test skips ahead to a retry, a throttle's end or a lease's expiry instead of waiting."""
    runtime.clock = FastForwardClock()
    return runtime


@pytest.fixture
def clock(runtime: Runtime) -> FastForwardClock:
    """The runtime's clock (every worker built from the runtime uses it)."""
    assert isinstance(runtime.clock, FastForwardClock)
    return runtime.clock
