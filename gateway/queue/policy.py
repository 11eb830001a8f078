"""Retry, token-backoff and circuit-breaker schedules as pure functions.

Deliveries: exponential backoff with full jitter
(https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/): after the
n-th failed attempt the delivery waits a uniformly random time in
``[0, min(cap, base * 2**(n-1))]``, at least the ``Retry-After`` the server asked for
(RFC 9110 section 10.2.3). Many deliveries retry at once after an outage; full jitter
spreads them out.

Worked example, base 2 s, cap 300 s: after attempt 1 wait up to 2 s, after attempt 2 up to
4 s, 3 -> 8 s, ..., 8 -> 256 s, 9 and later -> 300 s. A 429 with ``Retry-After: 30`` after
attempt 1 waits 30 s. With the default 12 attempts a delivery gives up after about 25
minutes of failures on average, or when the next try would fall after ``max_age``
(72 h), counted from its creation or its last replay.

Token endpoint and circuit probes: "equal jitter", a random time in ``[c/2, c]`` with
``c = min(cap, base * 2**(n-1))``. There is one schedule per target (not one per
delivery), so there is no herd to spread; the floor ``c/2`` gives a hard bound on how
often a failing endpoint is called (:func:`max_token_requests`).

Worked example, token base 1 s, cap 120 s: failures 1..8 wait at least 0.5, 1, 2, 4, 8,
16, 32, 60 s, then at least 60 s each. Over a two-minute outage that is at most 8 calls
(:func:`max_token_requests`), whatever the number of workers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from mappers.profiles.ehr import CircuitBreakerPolicy, RetryPolicy, TokenRetryPolicy

#: Statuses besides 5xx that say "try again later" (RFC 9110 section 15: 408 Request
#: Timeout, 425 Too Early, 429 Too Many Requests): the one table of every peer the gateway
#: calls (EHRs, token endpoints, ops subscribers).
TRANSIENT_STATUS = frozenset({408, 425, 429})


def transient_status(status: int) -> bool:
    """True for an HTTP status worth retrying: 408, 425, 429 or any 5xx.

    >>> [s for s in (200, 400, 404, 408, 409, 429, 500, 503) if transient_status(s)]
    [408, 429, 500, 503]
    """
    return status in TRANSIENT_STATUS or status >= 500


@dataclass(frozen=True)
class RetryDecision:
    """Retry at ``retry_at``, or give up (``give_up`` names why)."""

    retry_at: datetime | None
    give_up: str | None = None


def backoff_s(attempt: int, policy: RetryPolicy, *, rng: random.Random | None = None) -> float:
    """Full-jitter delay (seconds) after the ``attempt``-th failed attempt (1-based)."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0, ceiling)


def next_retry(
    *,
    attempts: int,
    created_at: datetime,
    now: datetime,
    policy: RetryPolicy,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> RetryDecision:
    """When to try again after ``attempts`` failed attempts, or why to stop.

    Args:
        attempts: failed attempts so far, this one included (1-based).
        created_at: when the delivery was created or last replayed (``max_age`` start).
        now: the current time.
        policy: the target's retry policy.
        retry_after_s: the server's ``Retry-After`` in seconds, if it sent one.
        rng: random source (tests).

    Returns:
        ``give_up="max_attempts"`` when ``attempts >= policy.max_attempts``;
        ``give_up="max_age"`` when the next try would fall after
        ``created_at + policy.max_age_s``; otherwise the time of the next try.
    """
    if attempts >= policy.max_attempts:
        return RetryDecision(None, "max_attempts")
    delay = backoff_s(attempts, policy, rng=rng)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    retry_at = now + timedelta(seconds=delay)
    if retry_at > created_at + timedelta(seconds=policy.max_age_s):
        return RetryDecision(None, "max_age")
    return RetryDecision(retry_at)


def _equal_jitter_ceiling_s(failures: int, base_s: float, cap_s: float) -> float:
    return float(min(cap_s, base_s * (2.0 ** max(0, failures - 1))))


def token_backoff_s(
    failures: int,
    policy: TokenRetryPolicy,
    *,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after the ``failures``-th consecutive token endpoint failure.

    A random time in ``[c/2, c]``, ``c = min(max_delay_s, base_delay_s * 2**(failures-1))``,
    and at least ``retry_after_s``.
    """
    ceiling = _equal_jitter_ceiling_s(failures, policy.base_delay_s, policy.max_delay_s)
    delay = (rng or random).uniform(ceiling / 2, ceiling)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


def config_error_backoff_s(
    failures: int, policy: TokenRetryPolicy, *, rng: random.Random | None = None
) -> float:
    """Seconds to wait after the ``failures``-th consecutive configuration error (the token
    endpoint refused our credentials, or the EHR refused a fresh token): the same equal
    jitter, from ``config_error_delay_s`` up to ``max(max_delay_s, config_error_delay_s)``."""
    cap = max(policy.max_delay_s, policy.config_error_delay_s)
    ceiling = _equal_jitter_ceiling_s(failures, policy.config_error_delay_s, cap)
    return (rng or random).uniform(ceiling / 2, ceiling)


def max_token_requests(window_s: float, policy: TokenRetryPolicy) -> int:
    """Upper bound of token requests to an endpoint that fails for ``window_s`` seconds.

    The first request fails at time 0; each later one comes at least ``c/2`` after the
    previous (:func:`token_backoff_s`), so the bound counts how many minimal waits fit in
    the window, plus the one request that may come right at its end. It holds across all
    workers because the schedule is stored per target in the database.

    >>> max_token_requests(120, TokenRetryPolicy(base_delay_s=1, max_delay_s=120))
    8
    """
    count, elapsed, failures = 1, 0.0, 1
    while True:
        elapsed += _equal_jitter_ceiling_s(failures, policy.base_delay_s, policy.max_delay_s) / 2
        if elapsed > window_s:
            return count
        count += 1
        failures += 1


def probe_delay_s(
    probe_failures: int, policy: CircuitBreakerPolicy, *, rng: random.Random | None = None
) -> float:
    """Seconds an open circuit waits before the next probe (equal jitter).

    ``probe_failures`` is 0 right after the circuit opened, then counts failed probes and
    failed half-open trials: ``c = min(max_open_s, open_s * 2**probe_failures)``.
    """
    ceiling = min(policy.max_open_s, policy.open_s * (2**probe_failures))
    return (rng or random).uniform(ceiling / 2, ceiling)


def rate_burst(rate_per_s: float, burst: int | None) -> float:
    """The token-bucket size of a request rate limit: ``burst`` or one second's worth."""
    return float(burst) if burst is not None else max(1.0, math.ceil(rate_per_s))
