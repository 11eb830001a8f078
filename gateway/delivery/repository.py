"""Outbox queries: claiming due deliveries, recording outcomes, target state, replay.

Claiming is per target, in one short transaction (procrastinate's fetch-job pattern):

1. lock the target's ``target_states`` row ``FOR UPDATE SKIP LOCKED`` (PostgreSQL): one
   worker claims for a target at a time, the others skip it for this round, so the
   concurrency limit below holds across workers;
2. count the target's deliveries in flight under a live lease; claim at most
   ``max_in_flight`` minus that;
3. one ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``: due rows
   (pending and ``available_at`` passed, or in flight with an expired lease: a crashed
   worker's claims), only where no older row of the same (target, ordering key) is still
   pending or in flight. One patient's deliveries go in order and a failing one holds back
   only that patient; a dead or review row no longer holds anyone back.

On SQLite (one worker) the same statements run without the lock clauses. A claim is a
lease (``locked_until``), extended by the worker's heartbeat while it works.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Integer,
    String,
    Table,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from gateway.db.bulk import insert_ignore
from gateway.db.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    FhirResource,
    OAuthToken,
    RemoteId,
    TargetState,
)
from gateway.db.types import UTCDateTime
from gateway.delivery.policy import probe_delay_s
from gateway.fhir.repository import resource_keys
from mappers.profiles.ehr import CircuitBreakerPolicy

ACTIVE = (DeliveryStatus.PENDING, DeliveryStatus.IN_FLIGHT)
REPLAYABLE = (DeliveryStatus.DEAD, DeliveryStatus.REVIEW)


def _is_postgres(session: AsyncSession) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


# --------------------------------------------------------------------------- target state


async def ensure_target_states(session: AsyncSession, keys: Iterable[tuple[str, str]]) -> None:
    """Create missing ``target_states`` rows for ``(kind, target)`` pairs."""
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
    session: AsyncSession, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[TargetState, OAuthToken | None]]:
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
    session: AsyncSession, *, kind: str, target: str, now: datetime, lease: timedelta
) -> bool:
    """Claim the right to probe an open circuit whose probe is due (one worker wins)."""
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


async def _locked_state(session: AsyncSession, kind: str, target: str) -> TargetState:
    await ensure_target_states(session, [(kind, target)])
    stmt = (
        select(TargetState)
        .where(TargetState.kind == kind, TargetState.target == target)
        .execution_options(populate_existing=True)
    )
    if _is_postgres(session):
        stmt = stmt.with_for_update()
    row = await session.scalar(stmt)
    assert row is not None  # ensured above
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
    """Record a probe of an open circuit: half-open when it answered, else open for longer.

    Returns:
        The circuit state after.
    """
    state = await _locked_state(session, kind, target)
    if state.circuit != "open":
        return state.circuit
    if ok:
        state.circuit = "half_open"
        state.next_probe_at = None
    else:
        state.probe_failures += 1
        state.next_probe_at = now + timedelta(seconds=probe_delay_s(state.probe_failures, policy))
        # A failed probe says nothing new about how the target fails: keep the last
        # delivery's error (docs/DELIVERY.md, "The EHR is down": it says how it fails).
        state.last_error = (error or state.last_error or "probe failed")[:500]
        state.last_failure_at = now
    return state.circuit


async def target_succeeded(
    session: AsyncSession, *, kind: str, target: str, now: datetime, delivered: bool
) -> None:
    """The target answered (delivered, or a permanent 4xx): close its circuit and reset
    its failure count. Writes only when something changes (or ``last_success_at`` is more
    than a second old), so the hot path rarely touches the shared row."""
    changed = or_(
        TargetState.consecutive_failures != 0,
        TargetState.circuit != "closed",
    )
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


@dataclass(frozen=True)
class FailureResult:
    """The target's state after a transient failure was counted."""

    before: str  # circuit state before this failure: closed | half_open | open
    circuit: str  # after: closed | open
    next_probe_at: datetime | None
    throttled_until: datetime | None


async def target_failed(
    session: AsyncSession,
    *,
    kind: str,
    target: str,
    now: datetime,
    policy: CircuitBreakerPolicy,
    error: str,
    throttle_s: float | None = None,
) -> FailureResult:
    """Count a transient failure against the target's circuit breaker.

    Closed: ``failure_threshold`` failures in a row open it. Half-open: the trial failed,
    it opens again with a longer probe delay. ``throttle_s`` (a ``Retry-After`` on
    429/503) pauses the whole target that long.
    """
    state = await _locked_state(session, kind, target)
    before = state.circuit
    state.last_failure_at = now
    state.last_error = error[:500]
    if state.circuit == "half_open":
        state.circuit = "open"
        state.probe_failures += 1
        state.opened_at = now
        state.next_probe_at = now + timedelta(seconds=probe_delay_s(state.probe_failures, policy))
    elif state.circuit == "closed":
        state.consecutive_failures += 1
        if state.consecutive_failures >= policy.failure_threshold:
            state.circuit = "open"
            state.probe_failures = 0
            state.opened_at = now
            state.next_probe_at = now + timedelta(seconds=probe_delay_s(0, policy))
    if throttle_s is not None and throttle_s > 0:
        until = now + timedelta(seconds=throttle_s)
        if state.throttled_until is None or state.throttled_until < until:
            state.throttled_until = until
    return FailureResult(before, state.circuit, state.next_probe_at, state.throttled_until)


# --------------------------------------------------------------------------- claiming


async def claim_for_target(
    session: AsyncSession,
    *,
    kind: str,
    target: str,
    limit: int,
    max_in_flight: int,
    worker: str,
    lease: timedelta,
    now: datetime,
) -> list[Delivery]:
    """Claim up to ``limit`` due deliveries of one target, keeping the target's deliveries
    in flight (all workers) at most ``max_in_flight``. Counts the attempt.

    Returns:
        The claimed rows (``status = in_flight``, ``locked_by = worker``); empty when
        another worker is claiming for this target right now.
    """
    if limit <= 0:
        return []
    postgres = _is_postgres(session)
    lock_target, count_in_flight, claim = _claim_statements(postgres)
    params = {"claim_kind": kind, "claim_target": target, "claim_now": now}
    if postgres and await session.scalar(lock_target, params) is None:
        return []
    in_flight = await session.scalar(count_in_flight, params)
    limit = min(limit, max_in_flight - int(in_flight or 0))
    if limit <= 0:
        return []
    stmt_params = {
        **params,
        "claim_limit": limit,
        "claim_locked_until": now + lease,
        "claim_worker": worker,
    }
    rows = (await session.scalars(claim, stmt_params)).all()
    return sorted(rows, key=lambda r: (r.available_at, r.id))


@functools.cache
def _claim_statements(postgres: bool) -> tuple[Any, Any, Any]:
    """The claim's three statements, built once (bound parameters ``claim_kind``,
    ``claim_target``, ``claim_now``, ``claim_limit``, ``claim_locked_until``,
    ``claim_worker``; names of columns are reserved in an UPDATE): lock the target's state
    row, count its rows in flight, claim."""
    kind = bindparam("claim_kind", type_=String())
    target = bindparam("claim_target", type_=String())
    now = bindparam("claim_now", type_=UTCDateTime())
    limit = bindparam("claim_limit", type_=Integer())
    lock_target = (
        select(TargetState.target)
        .where(TargetState.kind == kind, TargetState.target == target)
        .with_for_update(skip_locked=True)
    )
    d = Delivery
    count_in_flight = (
        select(func.count())
        .select_from(d)
        .where(
            d.kind == kind,
            d.target == target,
            d.status == DeliveryStatus.IN_FLIGHT,
            d.locked_until >= now,
        )
    )
    older = aliased(Delivery)
    blocked = exists().where(
        older.target == d.target,
        older.kind == d.kind,
        older.ordering_key == d.ordering_key,
        older.id < d.id,
        older.status.in_(ACTIVE),
    )
    # Two scans, each in claim order: the target's pending rows that are due (the partial
    # index ix_deliveries_due reads just the first few), and rows whose lease ran out (a
    # crashed worker's; few). One condition with OR would read and sort the whole backlog.
    pending = (
        select(d.id, d.available_at)
        .where(
            d.kind == kind,
            d.target == target,
            d.status == DeliveryStatus.PENDING,
            d.available_at <= now,
            ~blocked,
        )
        .order_by(d.available_at, d.id)
        .limit(limit)
    )
    expired = (
        select(d.id, d.available_at)
        .where(
            d.kind == kind,
            d.target == target,
            d.status == DeliveryStatus.IN_FLIGHT,
            d.locked_until < now,
            ~blocked,
        )
        .order_by(d.available_at, d.id)
        .limit(limit)
    )
    if postgres:
        pending = pending.with_for_update(skip_locked=True)
        expired = expired.with_for_update(skip_locked=True)
    due = union_all(pending.cte("pending").select(), expired.cte("expired").select()).subquery()
    candidates = select(due.c.id).order_by(due.c.available_at, due.c.id).limit(limit)
    claim = (
        update(d)
        .where(d.id.in_(candidates.scalar_subquery()))
        .values(
            status=DeliveryStatus.IN_FLIGHT,
            locked_until=bindparam("claim_locked_until", type_=UTCDateTime()),
            locked_by=bindparam("claim_worker", type_=String()),
            attempts=d.attempts + 1,
            last_attempt_at=now,
            first_attempt_at=func.coalesce(d.first_attempt_at, now),
        )
        .returning(d)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return lock_target, count_in_flight, claim


async def extend_leases(
    session: AsyncSession, *, ids: Sequence[int], worker: str, until: datetime
) -> int:
    """Push ``locked_until`` of this worker's in-flight rows to ``until`` (heartbeat)."""
    if not ids:
        return 0
    result = await session.execute(
        update(Delivery)
        .where(
            Delivery.id.in_(list(ids)),
            Delivery.locked_by == worker,
            Delivery.status == DeliveryStatus.IN_FLIGHT,
        )
        .values(locked_until=until)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _owned(delivery_id: int, worker: str) -> Any:
    return and_(
        Delivery.id == delivery_id,
        Delivery.locked_by == worker,
        Delivery.status == DeliveryStatus.IN_FLIGHT,
    )


async def finish(
    session: AsyncSession, *, delivery_id: int, worker: str, values: dict[str, Any]
) -> bool:
    """Update a claimed row if this worker still holds it; False when the lease was lost
    (another worker took it over: its outcome wins, and idempotent writes make the
    double send harmless)."""
    result = await session.execute(
        update(Delivery)
        .where(_owned(delivery_id, worker))
        .values(locked_by=None, locked_until=None, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def lock_owned(session: AsyncSession, *, ids: Sequence[int], worker: str) -> set[int]:
    """Of ``ids``, the rows this worker still holds (in flight, its lease), locked
    ``FOR UPDATE`` on PostgreSQL until the transaction ends: the batch form of
    :func:`finish`'s ownership check."""
    if not ids:
        return set()
    stmt = select(Delivery.id).where(
        Delivery.id.in_(list(ids)),
        Delivery.locked_by == worker,
        Delivery.status == DeliveryStatus.IN_FLIGHT,
    )
    if _is_postgres(session):
        stmt = stmt.with_for_update()
    return set(await session.scalars(stmt))


async def update_rows(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk ``UPDATE deliveries ... WHERE id = :id`` for rows this worker has locked: each
    dict has ``id`` and the new values; one Core executemany per set of keys."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        keys = tuple(sorted(k for k in row if k != "id"))
        groups.setdefault(keys, []).append({"_id": row["id"], **{k: row[k] for k in keys}})
    table = cast(Table, Delivery.__table__)
    for keys, params in groups.items():
        stmt = (
            update(table)
            .where(table.c.id == bindparam("_id"))
            .values({k: bindparam(k) for k in keys})
        )
        await session.execute(stmt, params)


async def add_attempts(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``delivery_attempts`` rows (one Core executemany)."""
    if rows:
        await session.execute(insert(cast(Table, DeliveryAttempt.__table__)), list(rows))


# --------------------------------------------------------------------------- remote ids


async def resources_for_target(
    session: AsyncSession, *, target: str, refs: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The stored resources of ``refs`` (``Type/id``) and the ids ``target`` assigned to
    them, in one query (columns only, no ORM objects).

    Returns:
        ``ref -> resource`` (missing ones left out) and ``ref -> remote id``.
    """
    if not refs:
        return {}, {}
    f, r = FhirResource, RemoteId
    rows = await session.execute(
        select(f.resource_type, f.id, f.resource, r.remote_id)
        .outerjoin(
            r,
            and_(r.target == target, r.resource_type == f.resource_type, r.local_id == f.id),
        )
        .where(resource_keys(refs))
    )
    resources: dict[str, dict[str, Any]] = {}
    remote: dict[str, str] = {}
    for resource_type, local_id, resource, remote_id in rows:
        ref = f"{resource_type}/{local_id}"
        resources[ref] = resource
        if remote_id is not None:
            remote[ref] = remote_id
    return resources, remote


async def outside_for_target(
    session: AsyncSession, *, target: str, refs: Sequence[str]
) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """For stored resources a delivery refers to but does not carry: the ids ``target``
    assigned to them and their business identifiers, in one query (stored resources are
    never deleted, so every remote id has its resource row).

    Returns:
        ``ref -> remote id`` and ``ref -> (system, value)``.
    """
    if not refs:
        return {}, {}
    f, r = FhirResource, RemoteId
    rows = await session.execute(
        select(f.resource_type, f.id, f.identifier_system, f.identifier_value, r.remote_id)
        .outerjoin(
            r,
            and_(r.target == target, r.resource_type == f.resource_type, r.local_id == f.id),
        )
        .where(resource_keys(refs))
    )
    remote: dict[str, str] = {}
    identifiers: dict[str, tuple[str, str]] = {}
    for resource_type, local_id, system, value, remote_id in rows:
        ref = f"{resource_type}/{local_id}"
        if remote_id is not None:
            remote[ref] = remote_id
        if system and value:
            identifiers[ref] = (system, value)
    return remote, identifiers


@dataclass(frozen=True)
class RemoteIdRow:
    """One id the EHR assigned, to store."""

    resource_type: str
    local_id: str
    remote_id: str
    remote_version: str | None
    delivered_version: int | None


async def save_remote_ids(
    session: AsyncSession, *, target: str, rows: Sequence[RemoteIdRow], now: datetime
) -> None:
    """Insert or update the EHR's ids for our resources (one statement)."""
    if not rows:
        return
    insert = pg_insert if _is_postgres(session) else sqlite_insert
    stmt = insert(cast(Table, RemoteId.__table__))  # Core: no ORM bulk-insert bookkeeping
    stmt = stmt.on_conflict_do_update(
        index_elements=["target", "resource_type", "local_id"],
        set_={
            "remote_id": stmt.excluded.remote_id,
            "remote_version": stmt.excluded.remote_version,
            "delivered_version": stmt.excluded.delivered_version,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    params = [  # executemany of one cached statement (psycopg pipelines it)
        {
            "target": target,
            "resource_type": r.resource_type,
            "local_id": r.local_id,
            "remote_id": r.remote_id,
            "remote_version": r.remote_version,
            "delivered_version": r.delivered_version,
            "updated_at": now,
        }
        for r in rows
    ]
    await session.execute(stmt, params)


# --------------------------------------------------------------------------- ops queries


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries an ops listing or bulk replay selects (all given fields must
    match)."""

    statuses: tuple[str, ...] = (DeliveryStatus.DEAD,)
    kind: str | None = None
    target: str | None = None
    reason: str | None = None
    created_before: datetime | None = None
    created_after: datetime | None = None
    message_id: str | None = None

    def where(self) -> list[Any]:
        """SQL conditions."""
        d = Delivery
        conditions: list[Any] = [d.status.in_(list(self.statuses))]
        if self.kind:
            conditions.append(d.kind == self.kind)
        if self.target:
            conditions.append(d.target == self.target)
        if self.reason:
            conditions.append(d.dead_reason == self.reason)
        if self.created_before:
            conditions.append(d.created_at < self.created_before)
        if self.created_after:
            conditions.append(d.created_at >= self.created_after)
        if self.message_id:
            conditions.append(d.inbound_message_id == self.message_id)
        return conditions


async def list_deliveries(
    session: AsyncSession, *, where: DeliveryFilter, limit: int, after_id: int | None = None
) -> list[Delivery]:
    """Deliveries matching ``where``, oldest first, ``limit`` at most, ids above
    ``after_id`` (keyset pagination)."""
    stmt = select(Delivery).where(*where.where())
    if after_id is not None:
        stmt = stmt.where(Delivery.id > after_id)
    return list(await session.scalars(stmt.order_by(Delivery.id).limit(limit)))


async def count_deliveries(session: AsyncSession, *, where: DeliveryFilter) -> int:
    """How many deliveries match ``where``."""
    return int(
        await session.scalar(select(func.count()).select_from(Delivery).where(*where.where())) or 0
    )


async def get_delivery(session: AsyncSession, delivery_id: int) -> Delivery | None:
    """One delivery, or None."""
    return await session.get(Delivery, delivery_id)


async def attempts_of(session: AsyncSession, delivery_id: int) -> list[DeliveryAttempt]:
    """The attempts of a delivery, in order."""
    return list(
        await session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id == delivery_id)
            .order_by(DeliveryAttempt.id)
        )
    )


async def replay(session: AsyncSession, *, ids: Sequence[int], now: datetime) -> list[int]:
    """Put dead or review deliveries back in the queue, due now, with a fresh set of
    attempts (``max_age`` counts from now). Others among ``ids`` are left alone.

    Returns:
        The ids that were replayed.
    """
    if not ids:
        return []
    rows = await session.execute(
        update(Delivery)
        .where(Delivery.id.in_(list(ids)), Delivery.status.in_(list(REPLAYABLE)))
        .values(
            status=DeliveryStatus.PENDING,
            available_at=now,
            attempts=0,
            replay_count=Delivery.replay_count + 1,
            replayed_at=now,
            dead_reason=None,
            review=None,
            locked_by=None,
            locked_until=None,
        )
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(r[0] for r in rows)


@dataclass(frozen=True)
class QueueStats:
    """Counts of one target's deliveries by state."""

    kind: str
    target: str
    pending: int = 0
    in_flight: int = 0
    dead: int = 0
    review: int = 0
    oldest_pending_created_at: datetime | None = None

    @property
    def depth(self) -> int:
        """Pending plus in flight."""
        return self.pending + self.in_flight


async def queue_stats(session: AsyncSession) -> dict[tuple[str, str], QueueStats]:
    """Per ``(kind, target)``: pending, in flight, dead, review, oldest pending.

    Delivered rows are not scanned (the status index leaves them out).
    """
    d = Delivery
    rows = await session.execute(
        select(
            d.kind,
            d.target,
            func.sum(case((d.status == DeliveryStatus.PENDING, 1), else_=0)),
            func.sum(case((d.status == DeliveryStatus.IN_FLIGHT, 1), else_=0)),
            func.sum(case((d.status == DeliveryStatus.DEAD, 1), else_=0)),
            func.sum(case((d.status == DeliveryStatus.REVIEW, 1), else_=0)),
            func.min(case((d.status.in_(ACTIVE), d.created_at), else_=None)),
        )
        .where(
            d.status.in_(
                [
                    DeliveryStatus.PENDING,
                    DeliveryStatus.IN_FLIGHT,
                    DeliveryStatus.DEAD,
                    DeliveryStatus.REVIEW,
                ]
            )
        )
        .group_by(d.kind, d.target)
    )
    out = {}
    for kind, target, pending, in_flight, dead, review, oldest in rows:
        if isinstance(oldest, str):  # SQLite returns MIN() of a CASE as text
            oldest = datetime.fromisoformat(oldest)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        out[(kind, target)] = QueueStats(
            kind,
            target,
            int(pending or 0),
            int(in_flight or 0),
            int(dead or 0),
            int(review or 0),
            oldest,
        )
    return out
