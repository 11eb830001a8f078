"""The retry policy as a pure function.

Exponential backoff with full jitter (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/):
the n-th retry waits a uniformly random time in ``[0, min(cap, base * 2**(n-1))]``, at
least the ``Retry-After`` the server asked for (RFC 9110 section 10.2.3).

Worked example, base 2 s, cap 300 s: after attempt 1 wait up to 2 s, after attempt 2 up to
4 s, 3 -> 8 s, ..., 8 -> 256 s, 9 and later -> 300 s. A 429 with ``Retry-After: 30`` after
attempt 1 waits 30 s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from mappers.profiles import RetryPolicy


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

    Gives up with ``max_attempts`` when ``attempts >= policy.max_attempts`` and with
    ``max_age`` when the next try would fall after ``created_at + policy.max_age_s``.
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
