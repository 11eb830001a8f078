"""The circuit breaker of a delivery target: its whole state machine, in one place.

The state is the target's ``target_states`` row, shared by every worker::

    closed ──(failure_threshold transient failures in a row)──► open
    open ──(next_probe_at passed; one worker wins take_probe)──► probing
    probing ──(the target answered)──► half_open      ──(probe failed)──► open, longer
    half_open ──(the one trial delivery answered)──► closed
    half_open ──(the trial failed)──► open, longer

* "answered" is a delivery, a permanent 4xx or a review: the target is up;
* the wait before a probe is :func:`gateway.queue.policy.probe_delay_s` (equal jitter,
  doubling with each failed probe or trial up to ``max_open_s``);
* while open nothing of the target is claimed; while half-open one delivery at a time;
* a ``Retry-After`` on 429/503 pauses the whole target until ``throttled_until``;
* the target's OAuth token backing off (the auth circuit, :func:`auth_wait_until`) also
  keeps its deliveries waiting.

Every transition takes the time from the caller (``now``: the worker's clock), and each
persisted one is written under the row's lock (``FOR UPDATE`` on PostgreSQL) in the
caller's transaction. :class:`CircuitBreakers` adds the one process-local shortcut: a
worker that knows a target is closed and healthy does not rewrite its row on every
success.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.clock import Clock
from gateway.db.bulk import insert_ignore
from gateway.db.models import OAuthToken, TargetState
from gateway.oauth.tokens import auth_wait_until
from gateway.queue.policy import probe_delay_s
from gateway.queue.repository import is_postgres
from mappers.profiles.ehr import CircuitBreakerPolicy

#: How long a probe of an open circuit may take before another worker may probe.
PROBE_LEASE = timedelta(seconds=60)
#: How long a worker that knows a target is healthy skips rewriting its row on success.
SUCCESS_WRITE_INTERVAL_S = 1.0

Key = tuple[str, str]  # (kind, target)


@dataclass(frozen=True)
class Gate:
    """What a claim round may do with a target now.

    ``claim``: deliveries may be claimed, at most ``max_in_flight`` in flight (all
    workers); ``probe``: the circuit is open and its probe is due.
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
) -> Gate:
    """The gate of a target from its state row and token row (either may be missing)."""
    circuit = state.circuit if state is not None else "closed"
    if circuit == "open":
        due = state is not None and (state.next_probe_at is None or state.next_probe_at <= now)
        return Gate(claim=False, probe=due)
    if state is not None and state.throttled_until and state.throttled_until > now:
        return Gate(claim=False)
    if uses_token and auth_wait_until(token, now):
        return Gate(claim=False)
    return Gate(claim=True, max_in_flight=1 if circuit == "half_open" else max_concurrent)


def healthy(state: TargetState | None) -> bool:
    """Closed with no failure counted."""
    return state is not None and state.circuit == "closed" and state.consecutive_failures == 0


@dataclass(frozen=True)
class FailureResult:
    """The target's state after a transient failure was counted."""

    before: str  # circuit state before this failure: closed | half_open | open
    circuit: str  # after: closed | open
    next_probe_at: datetime | None
    throttled_until: datetime | None

    @property
    def holds_deliveries(self) -> bool:
        """The target is down (the circuit is open and this failure was not the
        half-open trial): its deliveries wait for it instead of being dead-lettered."""
        return self.circuit == "open" and self.before != "half_open"


def count_failure(
    state: TargetState,
    *,
    now: datetime,
    policy: CircuitBreakerPolicy,
    error: str,
    throttle_s: float | None = None,
    rng: random.Random | None = None,
) -> FailureResult:
    """A transient failure: closed, ``failure_threshold`` in a row open the circuit;
    half-open, the trial failed and it opens again for longer. ``throttle_s`` (a
    ``Retry-After`` on 429/503) pauses the whole target that long. Changes ``state``."""
    before = state.circuit
    state.last_failure_at = now
    state.last_error = error[:500]
    if state.circuit == "half_open":
        state.circuit = "open"
        state.probe_failures += 1
        state.opened_at = now
        state.next_probe_at = now + _probe_delay(state.probe_failures, policy, rng)
    elif state.circuit == "closed":
        state.consecutive_failures += 1
        if state.consecutive_failures >= policy.failure_threshold:
            state.circuit = "open"
            state.probe_failures = 0
            state.opened_at = now
            state.next_probe_at = now + _probe_delay(0, policy, rng)
    if throttle_s is not None and throttle_s > 0:
        until = now + timedelta(seconds=throttle_s)
        if state.throttled_until is None or state.throttled_until < until:
            state.throttled_until = until
    return FailureResult(before, state.circuit, state.next_probe_at, state.throttled_until)


def count_probe(
    state: TargetState,
    *,
    ok: bool,
    now: datetime,
    policy: CircuitBreakerPolicy,
    error: str | None = None,
    rng: random.Random | None = None,
) -> str:
    """A probe of an open circuit: half-open when the target answered, else open for
    longer. Changes ``state``; returns the circuit state after."""
    if state.circuit != "open":
        return state.circuit
    if ok:
        state.circuit = "half_open"
        state.next_probe_at = None
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
    until the transaction ends."""
    await ensure_target_states(session, [(kind, target)])
    stmt = (
        select(TargetState)
        .where(TargetState.kind == kind, TargetState.target == target)
        .execution_options(populate_existing=True)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update()
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
) -> FailureResult:
    """:func:`count_failure` on the locked row."""
    state = await locked_state(session, kind=kind, target=target)
    return count_failure(state, now=now, policy=policy, error=error, throttle_s=throttle_s)


async def record_answer(
    session: AsyncSession, *, kind: str, target: str, now: datetime, delivered: bool
) -> None:
    """The target answered (delivered, or a permanent 4xx): close its circuit and reset
    its failure count. Writes only when something changes (or ``last_success_at`` is more
    than a second old), so the hot path rarely touches the shared row."""
    changed = or_(TargetState.consecutive_failures != 0, TargetState.circuit != "closed")
    values: dict[str, Any] = {
        "consecutive_failures": 0,
        "circuit": "closed",
        "probe_failures": 0,
        "next_probe_at": None,
    }
    if delivered:
        values["last_success_at"] = now
        changed = or_(
            changed,
            TargetState.last_success_at.is_(None),
            TargetState.last_success_at < now - timedelta(seconds=1),
        )
    await session.execute(
        update(TargetState)
        .where(TargetState.kind == kind, TargetState.target == target, changed)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


class CircuitBreakers:
    """What one worker remembers of its targets' circuits between transactions: which
    it saw closed and healthy, and when it last wrote a success for each.

    Args:
        clock: the worker's clock.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._healthy: set[Key] = set()
        self._success_written: dict[Key, float] = {}

    def seen(self, key: Key, state: TargetState | None) -> None:
        """Note the state a claim round read."""
        if healthy(state):
            self._healthy.add(key)
        else:
            self._healthy.discard(key)

    def failed(self, key: Key) -> None:
        """A transient failure of the target is being recorded."""
        self._healthy.discard(key)

    async def answered(
        self, session: AsyncSession, key: Key, *, now: datetime, delivered: bool
    ) -> None:
        """:func:`record_answer`, skipped while this worker knows the target is closed
        and wrote a success less than :data:`SUCCESS_WRITE_INTERVAL_S` ago."""
        last = self._success_written.get(key)
        at = self._clock.monotonic()
        if key in self._healthy and last is not None and at - last < SUCCESS_WRITE_INTERVAL_S:
            return
        kind, target = key
        await record_answer(session, kind=kind, target=target, now=now, delivered=delivered)
        self._success_written[key] = at
        self._healthy.add(key)
