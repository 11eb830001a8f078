"""The circuit breaker of a delivery target: its whole state machine, in one place.

The state is the target's ``target_states`` row, shared by every worker (after
resilience4j's CircuitBreaker: https://resilience4j.readme.io/docs/circuitbreaker)::

    closed ──(failure rate over the window >= failure_rate, with >= minimum_calls calls;
              or failure_threshold transient failures in a row)──► open
    open ──(next trial due; one worker wins take_probe)──► probing GET [base]/metadata
    probing ──(the target answered)──► half_open        ──(probe failed)──► open, longer
    half_open ──(enough of the half_open_trials deliveries answered)──► closed
    half_open ──(enough of them failed)──► open (longer, unless one of them succeeded)

* "answered" is a delivery, a permanent 4xx or a review: the target is up;
* the window is a sliding-window counter (:func:`window_add`): the calls and transient
  failures of the current ``window_s`` and of the previous one, the previous weighted by
  how much of it still overlaps the last ``window_s`` (:func:`failure_rate`);
* the next trial after the circuit opens: the EHR's ``Retry-After`` when the failure
  carried one (at most ``max_retry_after_s``), else :func:`gateway.queue.policy.
  probe_delay_s` (equal jitter, doubling per trial round that failed without a single
  success, up to ``max_open_s``; a success resets the doubling);
* half-open admits ``half_open_trials`` deliveries in flight; it closes once so many
  succeeded that their failure rate stays under ``failure_rate`` whatever the others do
  (2 of 3 with the defaults), and opens again once so many failed that it reaches it;
* while open nothing of the target is claimed; a delivery that failed on the open circuit
  is due again at once (the breaker's trial schedule is its wait, not both), and when the
  circuit closes the deliveries whose retry backoff began in the outage are made due
  (:func:`release_held`): one timing model, never the two waits added up;
* a ``Retry-After`` on 429/503 pauses the whole target until ``throttled_until``;
* the target's OAuth token backing off (the auth circuit, :func:`auth_wait_until`) also
  keeps its deliveries waiting.

Every transition takes the time from the caller (``now``: the worker's clock), and each
persisted one is written under the row's lock (``FOR UPDATE`` on PostgreSQL) in the
caller's transaction. :class:`CircuitBreakers` adds the one process-local shortcut: a
worker that knows a target is closed and healthy adds its successes to the window at
most once a second instead of rewriting the row on every success.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.clock import Clock
from gateway.db.bulk import insert_ignore
from gateway.db.models import Delivery, DeliveryStatus, OAuthToken, TargetState
from gateway.oauth.tokens import auth_wait_until
from gateway.queue.policy import probe_delay_s
from gateway.queue.repository import is_postgres
from mappers.profiles.ehr import CircuitBreakerPolicy

#: How long a probe of an open circuit may take before another worker may probe.
PROBE_LEASE = timedelta(seconds=60)
#: How long a worker that knows a target is healthy keeps its successes before adding
#: them to the shared window.
SUCCESS_WRITE_INTERVAL_S = 1.0

Key = tuple[str, str]  # (kind, target)


@dataclass(frozen=True)
class Gate:
    """What a claim round may do with a target now.

    ``claim``: deliveries may be claimed, at most ``max_in_flight`` in flight (all
    workers); ``probe``: the circuit is open and its next trial is due.
    """

    claim: bool
    max_in_flight: int = 0
    probe: bool = False


def gate(
    state: TargetState | None,
    token: OAuthToken | None,
    *,
    now: datetime,
    max_concurrent: int,
    uses_token: bool,
    trials: int = 1,
) -> Gate:
    """The gate of a target from its state row and token row (either may be missing);
    ``trials``: the deliveries in flight while half-open (``half_open_trials``)."""
    if state is not None and state.paused_at is not None:  # a person paused it: nothing goes
        return Gate(claim=False)
    circuit = state.circuit if state is not None else "closed"
    if circuit == "open":
        due = state is not None and (state.next_probe_at is None or state.next_probe_at <= now)
        return Gate(claim=False, probe=due)
    if state is not None and state.throttled_until and state.throttled_until > now:
        return Gate(claim=False)
    if uses_token and auth_wait_until(token, now):
        return Gate(claim=False)
    if circuit == "half_open":
        return Gate(claim=True, max_in_flight=max(1, min(trials, max_concurrent)))
    return Gate(claim=True, max_in_flight=max_concurrent)


def healthy(state: TargetState | None) -> bool:
    """Closed with no failure counted."""
    return state is not None and state.circuit == "closed" and state.consecutive_failures == 0


# --------------------------------------------------------------------------- the window


def window_add(
    state: TargetState, *, now: datetime, policy: CircuitBreakerPolicy, calls: int, failures: int
) -> None:
    """Count ``calls`` calls, ``failures`` of them transient failures, in the window.

    The window is ``window_s`` long and starts at ``window_started_at``; when ``now`` is
    past its end it becomes the previous window (or both are emptied, after two windows
    of silence)."""
    span = timedelta(seconds=policy.window_s)
    start = state.window_started_at
    if start is None or now - start >= 2 * span or now < start:
        state.window_started_at = now
        state.prev_window_calls = state.prev_window_failures = 0
        state.window_calls = state.window_failures = 0
    elif now - start >= span:
        state.prev_window_calls = state.window_calls or 0
        state.prev_window_failures = state.window_failures or 0
        state.window_calls = state.window_failures = 0
        state.window_started_at = start + span
    state.window_calls = (state.window_calls or 0) + calls
    state.window_failures = (state.window_failures or 0) + failures


def failure_rate(
    state: TargetState, *, now: datetime, policy: CircuitBreakerPolicy
) -> tuple[float, float]:
    """The share of transient failures among the calls of the last ``window_s`` seconds
    (0..1) and the number of calls it is estimated from: the current window's counts plus
    the previous window's, weighted by the part of it still inside the last ``window_s``.

    >>> s = TargetState(window_started_at=datetime(2026, 1, 1, 0, 0, 30), window_calls=4,
    ...     window_failures=4, prev_window_calls=12, prev_window_failures=0)
    >>> failure_rate(s, now=datetime(2026, 1, 1, 0, 0, 45),
    ...     policy=CircuitBreakerPolicy(window_s=30))     # 4 + 12/2 calls, 4 failed
    (0.4, 10.0)
    """
    start = state.window_started_at
    if start is None or now - start >= timedelta(seconds=2 * policy.window_s):
        return 0.0, 0.0
    elapsed = max(0.0, (now - start).total_seconds())
    if elapsed >= policy.window_s:  # the current window is over: it is the previous one
        weight = 1 - (elapsed - policy.window_s) / policy.window_s
        calls = (state.window_calls or 0) * weight
        failures = (state.window_failures or 0) * weight
    else:
        weight = 1 - elapsed / policy.window_s
        calls = (state.window_calls or 0) + (state.prev_window_calls or 0) * weight
        failures = (state.window_failures or 0) + (state.prev_window_failures or 0) * weight
    if calls <= 0:
        return 0.0, 0.0
    return round(failures / calls, 4), round(calls, 2)


def reopen_after(policy: CircuitBreakerPolicy) -> int:
    """Failed trials that open a half-open circuit again: their share of
    ``half_open_trials`` reaches ``failure_rate`` (2 of 3 with the defaults)."""
    return max(1, math.ceil(policy.failure_rate * policy.half_open_trials - 1e-9))


def close_after(policy: CircuitBreakerPolicy) -> int:
    """Successful trials that close a half-open circuit: the others could not bring the
    trials' failure rate to ``failure_rate`` any more (2 of 3 with the defaults)."""
    return max(1, policy.half_open_trials - reopen_after(policy) + 1)


# --------------------------------------------------------------------------- transitions


@dataclass(frozen=True)
class FailureResult:
    """The target's state after a transient failure was counted."""

    before: str  # circuit state before this failure: closed | half_open | open
    circuit: str  # after: closed | half_open | open
    next_probe_at: datetime | None
    throttled_until: datetime | None

    @property
    def holds_deliveries(self) -> bool:
        """The target is down (the circuit is open and this failure was not a half-open
        trial): its deliveries wait for it instead of being dead-lettered."""
        return self.circuit == "open" and self.before != "half_open"


def _pause_s(retry_after_s: float | None, policy: CircuitBreakerPolicy) -> float | None:
    """A ``Retry-After`` within ``max_retry_after_s`` (None: none sent)."""
    if retry_after_s is None or retry_after_s <= 0:
        return None
    return min(retry_after_s, policy.max_retry_after_s)


def _open(
    state: TargetState,
    *,
    now: datetime,
    policy: CircuitBreakerPolicy,
    reason: str,
    retry_after_s: float | None,
    rng: random.Random | None,
) -> None:
    if state.circuit == "half_open":  # a trial round failed
        state.probe_failures = 0 if state.trial_successes else state.probe_failures + 1
    else:
        state.probe_failures = 0
        state.opened_at = now
    state.circuit = "open"
    state.trial_successes = state.trial_failures = 0
    pause = _pause_s(retry_after_s, policy)
    if pause is not None:
        state.next_probe_at = now + timedelta(seconds=pause)
        reason += f"; next trial after the EHR's Retry-After ({pause:g} s)"
    else:
        state.next_probe_at = now + _probe_delay(state.probe_failures, policy, rng)
    state.open_reason = reason[:500]


def count_failure(
    state: TargetState,
    *,
    now: datetime,
    policy: CircuitBreakerPolicy,
    error: str,
    throttle_s: float | None = None,
    retry_after_s: float | None = None,
    successes: int = 0,
    rng: random.Random | None = None,
) -> FailureResult:
    """A transient failure, counted in the window after ``successes`` earlier successes
    not yet counted. Closed: the failure rate or the failures in a row may open the
    circuit; half-open: a failed trial, and enough of them open it again. The next trial
    comes after ``retry_after_s`` (the EHR's ``Retry-After``) when given. ``throttle_s``
    (a ``Retry-After`` on 429/503) pauses the whole target that long. Changes ``state``."""
    before = state.circuit
    if successes:
        window_add(state, now=now, policy=policy, calls=successes, failures=0)
    window_add(state, now=now, policy=policy, calls=1, failures=1)
    state.last_failure_at = now
    state.last_error = error[:500]
    if state.circuit == "half_open":
        state.trial_failures = (state.trial_failures or 0) + 1
        if state.trial_failures >= reopen_after(policy):
            _open(
                state,
                now=now,
                policy=policy,
                reason=f"{state.trial_failures} of {policy.half_open_trials} half-open trials "
                "failed",
                retry_after_s=retry_after_s,
                rng=rng,
            )
    elif state.circuit == "closed":
        state.consecutive_failures = (state.consecutive_failures or 0) + 1
        rate, calls = failure_rate(state, now=now, policy=policy)
        reason = None
        if calls >= policy.minimum_calls and rate >= policy.failure_rate:
            reason = (
                f"failure rate {rate:.0%} over {calls:g} calls in the last {policy.window_s:g} s"
            )
        elif state.consecutive_failures >= policy.failure_threshold:
            reason = f"{state.consecutive_failures} transient failures in a row"
        if reason is not None:
            _open(
                state,
                now=now,
                policy=policy,
                reason=reason,
                retry_after_s=retry_after_s,
                rng=rng,
            )
    pause = _pause_s(throttle_s, policy)
    if pause is not None:
        until = now + timedelta(seconds=pause)
        if state.throttled_until is None or state.throttled_until < until:
            state.throttled_until = until
    return FailureResult(before, state.circuit, state.next_probe_at, state.throttled_until)


def count_answers(
    state: TargetState,
    *,
    now: datetime,
    policy: CircuitBreakerPolicy,
    answered: int,
    delivered: bool,
) -> str:
    """``answered`` calls the target answered (delivered, or a permanent 4xx; ``delivered``
    if any was a delivery): counted in the window; the failures in a row end. Half-open
    (or open: a late answer says the target is up), they count as trials and enough of
    them close the circuit. Changes ``state``; returns the circuit state after."""
    window_add(state, now=now, policy=policy, calls=answered, failures=0)
    state.consecutive_failures = 0
    if delivered:
        state.last_success_at = now
    if state.circuit == "open":
        state.circuit = "half_open"
        state.trial_successes = state.trial_failures = 0
    if state.circuit == "half_open":
        state.trial_successes = (state.trial_successes or 0) + answered
        if state.trial_successes >= close_after(policy):
            state.circuit = "closed"
            state.probe_failures = 0
            state.next_probe_at = None
            state.trial_successes = state.trial_failures = 0
            state.open_reason = None
    return state.circuit


def count_probe(
    state: TargetState,
    *,
    ok: bool,
    now: datetime,
    policy: CircuitBreakerPolicy,
    error: str | None = None,
    rng: random.Random | None = None,
) -> str:
    """A probe of an open circuit: half-open (the trial deliveries may go) when the
    target answered, else open for longer. Changes ``state``; returns the circuit state
    after."""
    if state.circuit != "open":
        return state.circuit
    if ok:
        state.circuit = "half_open"
        state.next_probe_at = None
        state.trial_successes = state.trial_failures = 0
    else:
        state.probe_failures += 1
        state.next_probe_at = now + _probe_delay(state.probe_failures, policy, rng)
        # A failed probe says nothing new about how the target fails: keep the last
        # delivery's error (docs/DELIVERY.md, "The EHR is down": it says how it fails).
        state.last_error = (error or state.last_error or "probe failed")[:500]
        state.last_failure_at = now
    return state.circuit


def _probe_delay(
    failures: int, policy: CircuitBreakerPolicy, rng: random.Random | None
) -> timedelta:
    return timedelta(seconds=probe_delay_s(failures, policy, rng=rng))


# --------------------------------------------------------------------------- persisted


async def ensure_target_states(session: AsyncSession, keys: Iterable[Key]) -> None:
    """Create missing ``target_states`` rows (closed) for ``(kind, target)`` pairs."""
    values = [
        {
            "kind": k,
            "target": t,
            "circuit": "closed",
            "consecutive_failures": 0,
            "probe_failures": 0,
        }
        for k, t in keys
    ]
    if values:
        await session.execute(
            insert_ignore(session, TargetState).values(values).on_conflict_do_nothing()
        )


async def target_gates(
    session: AsyncSession, keys: Sequence[Key]
) -> dict[Key, tuple[TargetState, OAuthToken | None]]:
    """The state rows of ``(kind, target)`` pairs with the shared token row of EHR
    targets (one query), freshly read."""
    if not keys:
        return {}
    rows = await session.execute(
        select(TargetState, OAuthToken)
        .outerjoin(
            OAuthToken,
            and_(TargetState.kind == "ehr", OAuthToken.target == TargetState.target),
        )
        .where(tuple_(TargetState.kind, TargetState.target).in_(list(keys)))
        .execution_options(populate_existing=True)
    )
    return {(state.kind, state.target): (state, token) for state, token in rows}


async def all_target_states(session: AsyncSession) -> list[TargetState]:
    """Every target state row."""
    return list(await session.scalars(select(TargetState).order_by(TargetState.target)))


async def take_probe(
    session: AsyncSession, *, kind: str, target: str, now: datetime, lease: timedelta = PROBE_LEASE
) -> bool:
    """Claim the right to probe an open circuit whose probe is due (one worker wins; the
    next probe may start after ``lease`` if this one never reports)."""
    result = await session.execute(
        update(TargetState)
        .where(
            TargetState.kind == kind,
            TargetState.target == target,
            TargetState.circuit == "open",
            or_(TargetState.next_probe_at.is_(None), TargetState.next_probe_at <= now),
        )
        .values(next_probe_at=now + lease)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def locked_state(session: AsyncSession, *, kind: str, target: str) -> TargetState:
    """The target's state row (created if missing), locked ``FOR UPDATE`` on PostgreSQL
    until the transaction ends. One statement when the row exists (the claim round
    created it)."""
    stmt = (
        select(TargetState)
        .where(TargetState.kind == kind, TargetState.target == target)
        .execution_options(populate_existing=True)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update()
    row = await session.scalar(stmt)
    if row is None:
        await ensure_target_states(session, [(kind, target)])
        row = await session.scalar(stmt)
    if row is None:  # pragma: no cover - inserted just above
        raise LookupError(f"target state {kind}/{target} vanished")
    return row


async def record_probe(
    session: AsyncSession,
    *,
    kind: str,
    target: str,
    ok: bool,
    now: datetime,
    policy: CircuitBreakerPolicy,
    error: str | None = None,
) -> str:
    """:func:`count_probe` on the locked row; returns the circuit state after."""
    state = await locked_state(session, kind=kind, target=target)
    return count_probe(state, ok=ok, now=now, policy=policy, error=error)


async def record_failure(
    session: AsyncSession,
    *,
    kind: str,
    target: str,
    now: datetime,
    policy: CircuitBreakerPolicy,
    error: str,
    throttle_s: float | None = None,
    retry_after_s: float | None = None,
    successes: int = 0,
) -> FailureResult:
    """:func:`count_failure` on the locked row."""
    state = await locked_state(session, kind=kind, target=target)
    return count_failure(
        state,
        now=now,
        policy=policy,
        error=error,
        throttle_s=throttle_s,
        retry_after_s=retry_after_s,
        successes=successes,
    )


async def record_answers(
    session: AsyncSession,
    *,
    kind: str,
    target: str,
    now: datetime,
    policy: CircuitBreakerPolicy,
    answered: int,
    delivered: bool,
) -> str:
    """:func:`count_answers` on the locked row; when that closes the circuit, the
    deliveries held by the outage are made due (:func:`release_held`). Returns the
    circuit state after."""
    state = await locked_state(session, kind=kind, target=target)
    before = state.circuit
    after = count_answers(state, now=now, policy=policy, answered=answered, delivered=delivered)
    if before != "closed" and after == "closed":
        since = (state.opened_at or now) - timedelta(seconds=policy.window_s)
        await release_held(session, kind=kind, target=target, now=now, since=since)
    return after


async def release_held(
    session: AsyncSession, *, kind: str, target: str, now: datetime, since: datetime
) -> int:
    """Make the target's pending deliveries that failed since ``since`` (the outage)
    due now: their retry backoff was the outage's, and the circuit has just closed, so
    they do not wait for it on top of the breaker's schedule. Returns how many."""
    d = Delivery
    result = await session.execute(
        update(d)
        .where(
            d.kind == kind,
            d.target == target,
            d.status == DeliveryStatus.PENDING,
            d.available_at > now,
            d.last_attempt_at >= since,
        )
        .values(available_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


class CircuitBreakers:
    """What one worker remembers of its targets' circuits between transactions: which
    it saw closed and healthy, the successes it has not added to the shared window yet,
    and when it last added them.

    Args:
        clock: the worker's clock.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._healthy: set[Key] = set()
        self._success_written: dict[Key, float] = {}
        self._unwritten: dict[Key, int] = {}

    def seen(self, key: Key, state: TargetState | None) -> None:
        """Note the state a claim round read."""
        if healthy(state):
            self._healthy.add(key)
        else:
            self._healthy.discard(key)

    def failed(self, key: Key) -> int:
        """A transient failure of the target is being recorded: returns (and forgets)
        the successes not yet in the window, to be counted before it."""
        self._healthy.discard(key)
        return self._unwritten.pop(key, 0)

    async def answered(
        self,
        session: AsyncSession,
        key: Key,
        *,
        now: datetime,
        delivered: bool,
        policy: CircuitBreakerPolicy,
        count: int = 1,
    ) -> None:
        """:func:`record_answers` for ``count`` answers, with those kept back before;
        kept back instead while this worker knows the target is closed and wrote less
        than :data:`SUCCESS_WRITE_INTERVAL_S` ago."""
        last = self._success_written.get(key)
        at = self._clock.monotonic()
        pending = self._unwritten.pop(key, 0) + count
        if key in self._healthy and last is not None and at - last < SUCCESS_WRITE_INTERVAL_S:
            self._unwritten[key] = pending
            return
        kind, target = key
        circuit = await record_answers(
            session,
            kind=kind,
            target=target,
            now=now,
            policy=policy,
            answered=pending,
            delivered=delivered,
        )
        self._success_written[key] = at
        if circuit == "closed":
            self._healthy.add(key)
        else:
            self._healthy.discard(key)
