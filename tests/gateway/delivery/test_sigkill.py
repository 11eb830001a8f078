"""Fault test: a real ``fhir-gateway worker`` process is killed with SIGKILL in the middle
of a batch; a second worker process takes over when the leases expire. Every delivery ends
delivered exactly once: no lost delivery, no duplicate resource in the EHR."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from gateway.runtime import Runtime
from testkit.ehr import run_ehr_async
from tests.gateway.delivery.conftest import TargetFactory
from tests.support.delivery import (
    all_delivered,
    attempts,
    deliveries,
    status_counts,
    submit_intakes,
    wait_until,
)
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LEASE_S = 2
N = 40


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """PostgreSQL only."""
    return postgres_url


async def start_worker(runtime: Runtime, cwd: Path, name: str) -> asyncio.subprocess.Process:
    """``python -m gateway.cli worker`` on the test database; output in ``<name>.log``."""
    env = {
        **os.environ,
        "GATEWAY_DATABASE_URL": runtime.settings.database_url,
        "GATEWAY_PROFILES_DIR": str(runtime.profiles.current.root),
        "GATEWAY_WORKER_LEASE": f"PT{LEASE_S}S",
        "GATEWAY_WORKER_POLL_INTERVAL": "PT0.05S",
        "GATEWAY_LOG_LEVEL": "warning",
        SECRET_ENV: "s3cret",
    }
    with (cwd / f"{name}.log").open("wb") as log:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "worker",
            "--concurrency",
            "8",
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )


async def test_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    use_target: TargetFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    make_ehr: EhrFactory,
) -> None:
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    fake = make_ehr(response_delay_s=0.3)  # ~8 requests in flight at any time
    async with run_ehr_async(fake) as running:
        use_target(running, max_concurrent_requests=16)
        sent = await submit_intakes(client, admin_headers, N)

        first = await start_worker(runtime, tmp_path, "first")
        ehr_in_flight = 0  # sent by the worker when it is killed; the EHR still commits them
        try:

            async def mid_batch() -> bool:
                nonlocal ehr_in_flight
                done = (await status_counts(runtime)).get("delivered", 0)
                ehr_in_flight = fake.in_flight
                return done >= 8 and ehr_in_flight >= 4

            assert await wait_until(mid_batch, timeout_s=120, interval_s=0.01)
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        assert first.returncode == -signal.SIGKILL
        at_kill = {d.id: d for d in await deliveries(runtime)}
        in_flight = {i for i, d in at_kill.items() if d.status == "in_flight"}
        assert in_flight and ehr_in_flight > 0

        second = await start_worker(runtime, tmp_path, "second")
        try:
            assert await wait_until(lambda: all_delivered(runtime, N), timeout_s=120)
        finally:
            second.send_signal(signal.SIGTERM)
            await second.wait()
        assert second.returncode == 0  # a graceful stop

    rows = {d.id: d for d in await deliveries(runtime)}
    assert {d.status for d in rows.values()} == {"delivered"}  # none lost
    for resource_type in ("Patient", "QuestionnaireResponse", "Provenance"):
        assert fake.count(resource_type) == N, resource_type  # none duplicated
    for intake in sent:
        matches = fake.find(
            "QuestionnaireResponse",
            "https://fhir-gateway.example.org/sid/intake-submission",
            intake["submission_id"],
        )
        assert len(matches) == 1
    log = await attempts(runtime)
    for delivery_id in in_flight:  # taken over after the lease, sent again, matched
        assert rows[delivery_id].attempts == 2
        second_try = [a for a in log if a.delivery_id == delivery_id]
        assert len(second_try) == 1  # the killed worker never recorded its attempt
        locked_until = at_kill[delivery_id].locked_until
        assert locked_until is not None and second_try[0].started_at >= locked_until
    for delivery_id in set(rows) - in_flight:  # never sent unrecorded
        tries = sorted((a for a in log if a.delivery_id == delivery_id), key=lambda a: a.attempt)
        assert rows[delivery_id].attempts == len(tries), delivery_id
        # one delivered attempt, after transient failures only (a timeout on a loaded
        # machine is retried like any other; it is not a second send of a delivered row)
        assert [a.outcome for a in tries] == ["transient"] * (len(tries) - 1) + ["delivered"]
