"""Delivery operations for people: listing dead letters, replaying them, target health.

Used by the ops API (``/v1/ops/deliveries``, ``/v1/ops/targets``, ``/metrics``) and the
CLI (``fhir-gateway deliveries ...``). Functions flush at most; the caller commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import metrics
from gateway.audit import service as audit
from gateway.clients.actor import current_actor
from gateway.db.models import OAuthToken, Subscriber, TargetState
from gateway.delivery import ops_repository as repo
from gateway.delivery.circuit import (
    all_target_states,
    failure_rate,
    locked_state,
)
from gateway.delivery.outbox import narrow_to_profiles
from gateway.errors import NotFoundError
from gateway.oauth import repository as oauth_repo
from gateway.oauth.tokens import auth_wait_until
from mappers.profiles.ehr import CircuitBreakerPolicy
from mappers.profiles.loader import ProfileSet

#: Most rows one replay request may touch (bulk replays page through this).
MAX_REPLAY_BATCH = 1000


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did: the rows it selected and the ones it put back in the queue
    (a row another replay or worker changed meanwhile is selected but not replayed)."""

    matched: int
    replayed: list[int]
    last_matched_id: int | None = None


async def replay_deliveries(
    session: AsyncSession,
    *,
    actor: str,
    now: datetime,
    profiles: ProfileSet,
    ids: Sequence[int] | None = None,
    where: repo.DeliveryFilter | None = None,
    limit: int = MAX_REPLAY_BATCH,
    after_id: int | None = None,
) -> ReplayResult:
    """Replay dead (or review) deliveries by id or by filter, and audit each. What an EHR
    delivery sends is decided again with ``profiles`` (a replay is an enqueue:
    :func:`gateway.delivery.outbox.narrow_to_profiles`). Flushes.

    Args:
        session: the caller's session (the caller commits).
        actor: who replays (API client name, ``cli``).
        now: the replay time (``available_at`` and ``max_age`` restart here).
        profiles: the current profile set (the targets' ``send`` lists).
        ids: explicit delivery ids; rows that are not dead or review are skipped.
        where: a filter, used when ``ids`` is None.
        limit: at most this many rows (``MAX_REPLAY_BATCH`` at most).
        after_id: with ``where``, only ids above this (to page through a bulk replay).
    """
    limit = max(1, min(limit, MAX_REPLAY_BATCH))
    if ids is None:
        rows = await repo.list_deliveries(
            session, where=where or repo.DeliveryFilter(), limit=limit, after_id=after_id
        )
        ids = [r.id for r in rows]
    else:
        ids = list(dict.fromkeys(ids))[:limit]
    replayed = await repo.replay(session, ids=ids, now=now)
    await narrow_to_profiles(session, ids=replayed, profiles=profiles)
    patients = await repo.patients_of(session, ids=replayed)
    who = current_actor()
    if who.name != actor:
        who = replace(who, name=actor)
    for delivery_id in replayed:
        audit.record(
            session,
            action="replay",
            entity_type="Delivery",
            entity_id=str(delivery_id),
            patient_id=patients.get(delivery_id),
            actor=who,
            at=now,
        )
    await session.flush()
    return ReplayResult(len(ids), replayed, max(ids) if ids else None)


@dataclass(frozen=True)
class TokenHealth:
    """The shared OAuth token of a target, as ops see it (never the token itself).

    ``state``: ``none`` (no auth), ``missing`` (never fetched), ``valid``, ``expired``,
    ``unavailable`` (token endpoint failing, deliveries wait), ``config_error``
    (credentials refused, deliveries wait).
    """

    method: str
    state: str
    expires_at: datetime | None = None
    refreshed_at: datetime | None = None
    failures: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    kid: str | None = None


@dataclass(frozen=True)
class TargetHealth:
    """One target: configuration, queue, circuit breaker and token."""

    kind: str
    name: str
    configured: bool
    queue: repo.QueueStats
    oldest_pending_age_s: float
    circuit: str
    consecutive_failures: int
    opened_at: datetime | None
    next_probe_at: datetime | None
    throttled_until: datetime | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_error: str | None
    token: TokenHealth | None
    failure_rate: float = 0.0
    window_calls: float = 0.0
    circuit_reason: str | None = None
    next_trial_at: datetime | None = None
    trial_successes: int = 0
    trial_failures: int = 0
    paused_at: datetime | None = None
    paused_by: str | None = None
    pause_reason: str | None = None


def _token_health(method: str, row: OAuthToken | None, now: datetime) -> TokenHealth:
    if method == "none":
        return TokenHealth(method, "none")
    if row is None:
        return TokenHealth(method, "missing")
    if auth_wait_until(row, now) is not None:
        state = "config_error" if row.error_kind == "config" else "unavailable"
    elif row.access_token and row.expires_at and row.expires_at > now:
        state = "valid"
    elif row.error_kind == "config":
        state = "config_error"
    else:
        state = "expired" if row.expires_at is not None else "missing"
    return TokenHealth(
        method,
        state,
        row.expires_at,
        row.refreshed_at,
        row.failures or 0,
        row.next_attempt_at,
        row.last_error,
        row.last_error_at,
        row.signed_with_kid,
    )


async def target_health(
    session: AsyncSession, *, profiles: ProfileSet, now: datetime
) -> list[TargetHealth]:
    """Health of every target: configured EHR targets, and any target with state or
    deliveries in the database (ops webhook subscribers, removed targets). ``configured``:
    an enabled EHR target of the profiles, or an active ops webhook subscriber."""
    stats = await repo.queue_stats(session)
    states: dict[tuple[str, str], TargetState] = {
        (s.kind, s.target): s for s in await all_target_states(session)
    }
    configured = {("ehr", t.name): t for t in profiles.ehr.values() if t.enabled}
    subscribers = {
        ("webhook", name)
        for name in await session.scalars(select(Subscriber.name).where(Subscriber.active))
    }
    keys = sorted(set(configured) | set(states) | set(stats))
    tokens = await oauth_repo.token_rows(session, [t for k, t in keys if k == "ehr"])
    out = []
    for key in keys:
        kind, name = key
        state = states.get(key)
        queue = stats.get(key) or repo.QueueStats(kind, name)
        oldest = queue.oldest_pending_created_at
        profile = configured.get(key)
        token = (
            _token_health(profile.auth.method, tokens.get(name), now)
            if profile is not None
            else None
        )
        policy = profile.circuit_breaker if profile is not None else CircuitBreakerPolicy()
        rate, calls = failure_rate(state, now=now, policy=policy) if state else (0.0, 0.0)
        throttled = (
            state.throttled_until
            if state and state.throttled_until and state.throttled_until > now
            else None
        )
        reason, next_trial = _circuit_why(state, throttled)
        out.append(
            TargetHealth(
                kind=kind,
                name=name,
                configured=profile is not None or key in subscribers,
                queue=queue,
                oldest_pending_age_s=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
                circuit=state.circuit if state else "closed",
                consecutive_failures=state.consecutive_failures if state else 0,
                opened_at=state.opened_at if state else None,
                next_probe_at=state.next_probe_at if state else None,
                throttled_until=throttled,
                last_success_at=state.last_success_at if state else None,
                last_failure_at=state.last_failure_at if state else None,
                last_error=state.last_error if state else None,
                token=token,
                failure_rate=rate,
                window_calls=calls,
                circuit_reason=reason,
                next_trial_at=next_trial,
                trial_successes=state.trial_successes if state else 0,
                trial_failures=state.trial_failures if state else 0,
                paused_at=state.paused_at if state else None,
                paused_by=state.paused_by if state else None,
                pause_reason=state.pause_reason if state else None,
            )
        )
    return out


def _circuit_why(
    state: TargetState | None, throttled: datetime | None
) -> tuple[str | None, datetime | None]:
    """Why the target's deliveries wait, and when the next trial (or send) may go."""
    if state is None:
        return None, None
    if state.circuit == "open":
        return state.open_reason or state.last_error, state.next_probe_at
    if state.circuit == "half_open":
        return "half-open: trial deliveries in flight (" + (state.open_reason or "") + ")", None
    if throttled is not None:
        return "the EHR's Retry-After", throttled
    return None, None


def metric_snapshots(health: Sequence[TargetHealth], now: datetime) -> list[metrics.TargetSnapshot]:
    """The ``/metrics`` gauges of :func:`target_health`."""
    return [
        metrics.TargetSnapshot(
            kind=h.kind,
            target=h.name,
            queue_depth=h.queue.depth,
            oldest_pending_age_s=h.oldest_pending_age_s,
            dead=h.queue.dead,
            review=h.queue.review,
            circuit=h.circuit,
            failure_rate=h.failure_rate,
            next_trial_in_s=(h.next_trial_at - now).total_seconds()
            if h.next_trial_at is not None
            else None,
            token_expires_in_s=(h.token.expires_at - now).total_seconds()
            if h.token is not None and h.token.expires_at is not None
            else None,
            auth_circuit_open=h.token.state in ("unavailable", "config_error")
            if h.token is not None and h.token.state != "none"
            else None,
        )
        for h in health
    ]


# --------------------------------------------------------------------------- pause


async def _known_target(
    session: AsyncSession, *, profiles: ProfileSet, kind: str, target: str
) -> TargetState:
    configured = kind == "ehr" and target in profiles.ehr
    if not configured:
        configured = (
            kind == "webhook"
            and (await session.scalar(select(Subscriber.id).where(Subscriber.name == target)))
            is not None
        )
    if not configured:
        raise NotFoundError("no such target")
    return await locked_state(session, kind=kind, target=target)


async def pause_target(
    session: AsyncSession,
    *,
    profiles: ProfileSet,
    kind: str,
    target: str,
    by: str,
    reason: str,
    now: datetime,
) -> TargetState:
    """Pause a target: no worker claims its deliveries (they wait, pending, and keep
    their attempts) until :func:`resume_target`. Audited as ``pause``; flushes. Pausing a
    paused target keeps the first pause's time and updates who and why.

    Raises:
        NotFoundError: no EHR target of the profiles, or subscriber, by that name.
    """
    state = await _known_target(session, profiles=profiles, kind=kind, target=target)
    state.paused_at = state.paused_at or now
    state.paused_by = by[:128]
    state.pause_reason = reason
    audit.record(
        session,
        action="pause",
        entity_type="Target",
        entity_id=f"{kind}/{target}",
        detail={"reason_given": bool(reason.strip())},
    )
    await session.flush()
    return state


async def resume_target(
    session: AsyncSession, *, profiles: ProfileSet, kind: str, target: str
) -> TargetState:
    """Resume a paused target (a no-op for one that is not paused). Audited as
    ``resume``; flushes.

    Raises:
        NotFoundError: no such target.
    """
    state = await _known_target(session, profiles=profiles, kind=kind, target=target)
    was = state.paused_at
    state.paused_at = None
    state.paused_by = None
    state.pause_reason = None
    audit.record(
        session,
        action="resume",
        entity_type="Target",
        entity_id=f"{kind}/{target}",
        detail={"was_paused": was is not None},
    )
    await session.flush()
    return state
