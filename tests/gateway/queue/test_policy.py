"""Retry, token backoff and probe schedules (pure functions)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from gateway.queue.policy import (
    backoff_s,
    max_token_requests,
    next_retry,
    probe_delay_s,
    rate_burst,
    token_backoff_s,
)
from mappers.profiles.ehr import CircuitBreakerPolicy, RetryPolicy, TokenRetryPolicy

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_delay_s=2, max_delay_s=300, max_attempts=12, max_age_s=72 * 3600)


@pytest.mark.parametrize(
    "attempt, ceiling", [(1, 2), (2, 4), (3, 8), (8, 256), (9, 300), (30, 300)]
)
def test_full_jitter_stays_under_the_exponential_ceiling(attempt: int, ceiling: float) -> None:
    rng = random.Random(attempt)
    delays = [backoff_s(attempt, POLICY, rng=rng) for _ in range(500)]

    assert all(0 <= d <= ceiling for d in delays)
    assert max(delays) > ceiling * 0.9  # the whole range is used: full jitter
    assert min(delays) < ceiling * 0.1


def test_retry_after_is_a_floor() -> None:
    decision = next_retry(
        attempts=1, created_at=NOW, now=NOW, policy=POLICY, retry_after_s=30, rng=random.Random(1)
    )

    assert decision.retry_at is not None
    assert decision.retry_at - NOW == timedelta(seconds=30)


def test_gives_up_after_max_attempts() -> None:
    assert next_retry(attempts=12, created_at=NOW, now=NOW, policy=POLICY).give_up == "max_attempts"
    assert next_retry(attempts=11, created_at=NOW, now=NOW, policy=POLICY).give_up is None


def test_gives_up_when_the_next_try_would_pass_max_age() -> None:
    created = NOW - timedelta(hours=72) + timedelta(seconds=1)
    decision = next_retry(attempts=3, created_at=created, now=NOW, policy=POLICY, retry_after_s=5)

    assert decision.give_up == "max_age"


@pytest.mark.parametrize("failures", [1, 2, 5, 8, 12])
def test_token_backoff_has_a_floor_of_half_the_ceiling(failures: int) -> None:
    policy = TokenRetryPolicy(base_delay_s=1, max_delay_s=120)
    ceiling = min(120, 2 ** (failures - 1))
    rng = random.Random(failures)
    delays = [token_backoff_s(failures, policy, rng=rng) for _ in range(300)]

    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert token_backoff_s(failures, policy, retry_after_s=500, rng=rng) == 500


def test_two_minute_bound_of_the_default_token_schedule() -> None:
    assert max_token_requests(120, TokenRetryPolicy()) == 8


@pytest.mark.parametrize("window_s", [0.5, 3.0, 60, 120, 600, 3600])
def test_no_random_schedule_exceeds_the_bound(window_s: float) -> None:
    policy = TokenRetryPolicy(base_delay_s=1, max_delay_s=120)
    bound = max_token_requests(window_s, policy)
    rng = random.Random(7)
    for _ in range(200):
        t, calls, failures = 0.0, 0, 0
        while t <= window_s:
            calls += 1
            failures += 1
            t += token_backoff_s(failures, policy, rng=rng)
        assert calls <= bound


def test_bound_is_scale_invariant() -> None:
    """The fault test runs the two-minute outage at 1/40 of the time scale."""
    scaled = TokenRetryPolicy(base_delay_s=1 / 40, max_delay_s=120 / 40)

    assert max_token_requests(120 / 40, scaled) == max_token_requests(120, TokenRetryPolicy())


def test_probe_delay_doubles_to_its_cap() -> None:
    policy = CircuitBreakerPolicy(open_s=10, max_open_s=60)
    rng = random.Random(3)

    assert 5 <= probe_delay_s(0, policy, rng=rng) <= 10
    assert 10 <= probe_delay_s(1, policy, rng=rng) <= 20
    assert 30 <= probe_delay_s(9, policy, rng=rng) <= 60


def test_rate_burst_defaults_to_one_second() -> None:
    assert rate_burst(2.5, None) == 3
    assert rate_burst(0.2, None) == 1
    assert rate_burst(10, 4) == 4
