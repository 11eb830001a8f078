"""Fault tests (issue 4), on PostgreSQL, against a local EHR whose faults the tests control.

Several workers run in this process, each with its own HTTP clients and token manager:
like separate worker processes they share only the database. (The SIGKILL test, in
``test_sigkill.py``, runs real worker processes.)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli import app as cli_app
from gateway.clock import FastForwardClock
from gateway.queue.policy import max_token_requests
from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from mappers.profiles import load_profiles
from mappers.profiles.ehr import TokenRetryPolicy
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests.gateway.delivery.conftest import TargetFactory
from tests.support.delivery import (
    all_delivered,
    attempts,
    deliveries,
    running_workers,
    skip_to_next_due,
    status_counts,
    submit_intakes,
    wait_until,
)
from tests.support.ehr import EhrFactory
from tests.support.gateway_env import SECRET_ENV

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EHR = tuple[LocalEhr, RunningEhr]


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """PostgreSQL only."""
    return postgres_url


def auth_block(running: RunningEhr, **extra: Any) -> dict[str, Any]:
    return {
        "method": "client_secret_basic",
        "token_url": running.token_url,
        "client_id": "gateway",
        "client_secret_env": SECRET_ENV,
        "scopes": ["system/*.cruds"],
        **extra,
    }


async def test_token_endpoint_outage_calls_it_within_the_backoff_bound_and_loses_nothing(
    runtime: Runtime,
    clock: FastForwardClock,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    ehr: EHR,
    use_target: TargetFactory,
) -> None:
    """The token endpoint answers 504 for two minutes while 50 deliveries wait with 4
    workers (the default token retry policy; the clock skips ahead to whatever is due
    next, round after round of the four workers): at most ``max_token_requests`` = 8
    calls, across all workers (one schedule per target, in the database)."""
    fake, running = ehr
    use_target(running)
    await submit_intakes(client, admin_headers, 50)
    outage = timedelta(minutes=2)
    bound = max_token_requests(outage.total_seconds(), TokenRetryPolicy())
    assert bound == 8

    fake.token_outage(3600, status=504)  # ended by the test when its clock passes 2 minutes
    outage_ends = clock.now() + outage
    recovered_at: float | None = None
    workers = [delivery_worker(runtime, concurrency=4) for _ in range(4)]
    try:
        for _ in range(200):
            for worker in workers:
                await worker.run_once()
            if await all_delivered(runtime, 50):
                break
            await skip_to_next_due(runtime, clock)
            if recovered_at is None and clock.now() >= outage_ends:
                fake.clear_faults()
                recovered_at = time.monotonic()
    finally:
        for worker in workers:
            await worker.aclose()

    failed = [r for r in fake.token_requests if r.status != 200]
    succeeded = [r for r in fake.token_requests if r.status == 200]
    assert 1 <= len(failed) <= bound
    assert {r.status for r in failed} == {504}
    assert len(succeeded) == 1  # one token after recovery, shared by the 4 workers
    assert await status_counts(runtime) == {"delivered": 50}  # nothing dead-lettered
    # nothing was sent to the FHIR server without a token, and no attempt was spent
    assert recovered_at is not None and min(fake.request_times) >= recovered_at
    assert all(r.status == 200 for r in fake.requests)
    assert {d.attempts for d in await deliveries(runtime)} == {1}
    assert fake.count("Patient") == 50


async def test_503_with_retry_after_and_timeouts_in_bursts_deliver_exactly_once(
    runtime: Runtime,
    clock: FastForwardClock,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    use_target: TargetFactory,
    monkeypatch: pytest.MonkeyPatch,
    make_ehr: EhrFactory,
) -> None:
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    fake = make_ehr(response_delay_s=0.1)
    async with run_ehr_async(fake) as running:
        use_target(
            running,
            timeout_s=0.5,
            max_concurrent_requests=8,
            retry={"base_delay_s": 0.05, "max_delay_s": 0.3, "max_attempts": 30},
            circuit_breaker={"failure_threshold": 6, "open_s": 0.3, "max_open_s": 0.6},
        )
        sent = await submit_intakes(client, admin_headers, 40)
        # Bursts, in the order requests reach the EHR: 503s with Retry-After, requests the
        # EHR stores after the gateway timed out, again.
        fake.fail_fhir(5, 503, retry_after=1)
        fake.hang_fhir(5, seconds=1.0)
        fake.fail_fhir(4, 503, retry_after=1)
        fake.hang_fhir(4, seconds=1.0)
        workers = [delivery_worker(runtime, concurrency=4) for _ in range(4)]
        try:
            for _ in range(200):  # rounds of the four workers at once, time skipped ahead
                await asyncio.gather(*(w.run_once() for w in workers))
                if await all_delivered(runtime, 40):
                    break
                await skip_to_next_due(runtime, clock)
        finally:
            for worker in workers:
                await worker.aclose()

    log = await attempts(runtime)
    by_delivery: dict[int, list[Any]] = {}
    for a in log:
        by_delivery.setdefault(a.delivery_id, []).append(a)
    throttled = [a for a in log if a.status_code == 503]
    timeouts = [a for a in log if a.error and a.error.startswith("timeout")]
    assert len(throttled) == 9
    assert len(timeouts) >= 5
    for tries in by_delivery.values():  # Retry-After: 1 s honoured by every retry
        for before, after in itertools.pairwise(tries):
            if before.status_code == 503:
                waited = (after.started_at - before.started_at).total_seconds()
                assert waited >= 1.0 - 0.02, (before.delivery_id, waited)
    assert await status_counts(runtime) == {"delivered": 40}
    for resource_type in ("Patient", "QuestionnaireResponse", "Provenance"):
        assert fake.count(resource_type) == 40, resource_type  # exactly once each
    for intake in sent:
        found = fake.find(
            "QuestionnaireResponse",
            "https://fhir-gateway.example.org/sid/intake-submission",
            intake["submission_id"],
        )
        assert len(found) == 1


async def _fix_target(runtime: Runtime, **changes: Any) -> None:
    """Edit the running target's profile file and reload, as an engineer would."""
    root: Path = runtime.profiles.current.root
    path = root / "ehr" / "test-ehr.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    runtime.profiles.reload()
    assert load_profiles(root).ehr["test-ehr"].model_dump(include=set(changes)) == changes


async def test_422_dead_letters_at_once_and_the_replay_after_the_profile_fix_delivers(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    ehr: EHR,
    use_target: TargetFactory,
) -> None:
    """An EHR that takes no Provenance answers 422 with an OperationOutcome."""
    fake, running = ehr
    use_target(running)
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "Provenance: no"}],
    }
    fake.reject_when(lambda r: r["resourceType"] == "Provenance", 422, outcome)
    await submit_intakes(client, admin_headers, 3)
    async with running_workers(runtime, 2):
        assert await wait_until(lambda: _counts_are(runtime, {"dead": 3}), timeout_s=10)
        listed = await client.get(
            "/v1/ops/deliveries",
            params={"status": "dead", "target": "test-ehr"},
            headers=admin_headers,
        )
        await _fix_target(runtime, send=["Patient", "QuestionnaireResponse"])
        replay = await client.post(
            "/v1/ops/deliveries/replay",
            json={"filter": {"status": ["dead"], "target": "test-ehr"}},
            headers=admin_headers,
        )
        assert await wait_until(lambda: all_delivered(runtime, 3), timeout_s=10)

    body = listed.json()
    assert body["total"] == 3
    assert {(d["attempts"], d["reason"], d["last_status_code"]) for d in body["deliveries"]} == {
        (1, "rejected", 422)
    }
    stored = body["deliveries"][0]["operation_outcome"]  # the EHR's own, as it sent it
    assert stored["resourceType"] == "OperationOutcome"
    assert stored["issue"][0]["code"] == "not-supported"
    assert stored["issue"][0]["diagnostics"].endswith("Provenance: no")
    assert replay.status_code == 200 and replay.json()["replayed"] == 3
    assert fake.count("Patient") == 3
    assert fake.count("QuestionnaireResponse") == 3
    assert fake.count("Provenance") == 0
    assert {(d.replay_count, d.attempts) for d in await deliveries(runtime)} == {(1, 1)}


async def test_400_too_costly_dead_letters_and_the_cli_replay_after_the_fix_delivers(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    use_target: TargetFactory,
    monkeypatch: pytest.MonkeyPatch,
    make_ehr: EhrFactory,
) -> None:
    """An EHR that takes at most 2 entries per transaction answers 400 (too-costly)."""
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    fake = make_ehr(max_bundle_entries=2)
    async with run_ehr_async(fake) as running:
        use_target(running)
        await submit_intakes(client, admin_headers, 2)
        async with running_workers(runtime, 1):
            assert await wait_until(lambda: _counts_are(runtime, {"dead": 2}), timeout_s=10)
            dead = await deliveries(runtime)
            await _fix_target(runtime, max_bundle_entries=2)
            monkeypatch.setenv("GATEWAY_DATABASE_URL", runtime.settings.database_url)
            result = await asyncio.to_thread(
                CliRunner().invoke, cli_app, ["deliveries", "replay", "--target", "test-ehr", "-y"]
            )
            assert result.exit_code == 0, result.output
            assert await wait_until(lambda: all_delivered(runtime, 2), timeout_s=10)

    assert {(d.status, d.last_status_code, d.attempts) for d in dead} == {("dead", 400, 1)}
    assert all(
        d.operation_outcome and d.operation_outcome["issue"][0]["code"] == "too-costly"
        for d in dead
    )
    assert "replayed 2 of 2 deliveries" in result.output
    assert fake.count("Patient") == 2 and fake.count("Provenance") == 2
    oversized = [r for r in fake.requests if r.status == 400]
    assert len(oversized) == 2  # one per delivery: dead at once, never retried


async def _counts_are(runtime: Runtime, expected: dict[str, int]) -> bool:
    return await status_counts(runtime) == expected


async def test_a_revoked_token_is_replaced_once_not_in_a_loop(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    use_target: TargetFactory,
    monkeypatch: pytest.MonkeyPatch,
    make_ehr: EhrFactory,
) -> None:
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    fake = make_ehr(response_delay_s=0.05)
    async with run_ehr_async(fake) as running:
        use_target(running)
        await submit_intakes(client, admin_headers, 40)
        async with running_workers(runtime, 4, concurrency=4):
            assert await wait_until(
                lambda: _delivered_at_least(runtime, 10), timeout_s=10, interval_s=0.01
            )
            fake.revoke_all_tokens()  # mid-run
            assert await wait_until(lambda: all_delivered(runtime, 40), timeout_s=20)

    unauthorized = [r for r in fake.requests if r.status == 401]
    assert [r.status for r in fake.token_requests] == [200, 200]  # initial + one replacement
    assert 1 <= len(unauthorized) <= 16  # at most the requests in flight when it was revoked
    assert await status_counts(runtime) == {"delivered": 40}
    assert {d.attempts for d in await deliveries(runtime)} == {1}  # 401 retried in-attempt
    assert fake.count("Patient") == 40


async def _delivered_at_least(runtime: Runtime, n: int) -> bool:
    return (await status_counts(runtime)).get("delivered", 0) >= n


async def test_an_ehr_refusing_every_fresh_token_does_not_loop(
    runtime: Runtime,
    clock: FastForwardClock,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    ehr: EHR,
    use_target: TargetFactory,
) -> None:
    """The client is not authorised in the EHR: every token gets 401. One replacement,
    then the target's auth backs off (configuration error) and deliveries wait.

    With four workers sending at once, a worker that read the replacement before its
    fetcher recorded the refusal takes its 401 for a stale token and fetches one more
    (each worker knows only its own fetches are fresh): at most a few token requests,
    all in the first round; none after, which is what not looping means."""
    fake, running = ehr
    use_target(running)
    fake.fail_fhir(10_000, 401)
    await submit_intakes(client, admin_headers, 10)
    workers = [delivery_worker(runtime, concurrency=4) for _ in range(4)]
    first_round = 0
    try:
        for round_no in range(5):  # rounds of the four workers, two seconds apart (skipped)
            await asyncio.gather(*(w.run_once() for w in workers))
            if round_no == 0:
                first_round = len(fake.token_requests)
            clock.advance(2)
        targets = (await client.get("/v1/ops/targets", headers=admin_headers)).json()
        [target] = [t for t in targets if t["name"] == "test-ehr"]
    finally:
        for worker in workers:
            await worker.aclose()

    assert 2 <= len(fake.token_requests) <= 4  # 2 unless the race above
    assert len(fake.token_requests) == first_round  # backing off: none after round 1
    assert len(fake.requests) <= 2 * 16  # at most the first wave and its one retry
    rows = await deliveries(runtime)
    assert {d.status for d in rows} == {"pending"}
    assert max(d.attempts for d in rows) == 0
    assert target["token"]["state"] == "config_error"
    assert "refused a freshly fetched token" in target["token"]["last_error"]
