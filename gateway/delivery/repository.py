"""Outbox queries of the delivery worker: claiming a target's due deliveries, recording
attempts, and the resources and EHR ids a delivery needs.

The outbox is a queue of the one queue (:mod:`gateway.queue.repository`): ``deliveries``
rows, partitioned by ``(kind, target)``, in order per ``ordering_key`` (the patient; the
case for ops webhooks). Claiming is per target, in the claim round's transaction:

1. lock the target's ``target_states`` row ``FOR UPDATE SKIP LOCKED`` (PostgreSQL): one
   worker claims for a target at a time, the others skip it for this round, so the
   concurrency limit below holds across workers;
2. count the target's deliveries in flight under a live lease; claim at most
   ``max_in_flight`` minus that;
3. the queue's claim (one ``UPDATE ... RETURNING`` over ``SELECT ... FOR UPDATE SKIP
   LOCKED``): due pending rows and rows whose lease ran out (a crashed worker's), only
   where no older row of the same target and ordering key is pending or in flight, so one
   patient's deliveries go in order and a failing one holds back only that patient; a
   dead or review row no longer holds anyone back.

On SQLite (one worker) the same statements run without the lock clauses. The claim is a
lease (``locked_until``, ``locked_by``), extended by the worker's heartbeat.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, String, Table, and_, bindparam, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.bulk import BulkInserts
from gateway.db.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    FhirResource,
    RemoteId,
    TargetState,
)
from gateway.db.types import UTCDateTime
from gateway.queue import repository as queue
from gateway.queue.repository import QueueTable, is_postgres

ACTIVE = (DeliveryStatus.PENDING, DeliveryStatus.IN_FLIGHT)
REPLAYABLE = (DeliveryStatus.DEAD, DeliveryStatus.REVIEW)


def _stamp_attempt(model: Any, now: ColumnElement[datetime]) -> dict[str, Any]:
    """A claim is an attempt: when it started, and the first one's time."""
    return {
        "last_attempt_at": now,
        "first_attempt_at": func.coalesce(model.first_attempt_at, now),
    }


#: The outbox as a queue.
OUTBOX = QueueTable(
    model=Delivery,
    waiting=DeliveryStatus.PENDING,
    leased=DeliveryStatus.IN_FLIGHT,
    order=("available_at", "id"),
    partition=("kind", "target"),
    key=("ordering_key",),
    holding=ACTIVE,
    on_claim=_stamp_attempt,
)


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
        The claimed rows (``status = in_flight``, ``locked_by = worker``), in claim order;
        empty when another worker is claiming for this target right now.
    """
    if limit <= 0:
        return []
    lock_target, count_in_flight = _target_statements()
    params = {"claim_kind": kind, "claim_target": target, "claim_now": now}
    if is_postgres(session) and await session.scalar(lock_target, params) is None:
        return []
    in_flight = await session.scalar(count_in_flight, params)
    limit = min(limit, max_in_flight - int(in_flight or 0))
    return await queue.claim(
        session,
        OUTBOX,
        limit=limit,
        worker=worker,
        locked_until=now + lease,
        now=now,
        partition=(kind, target),
    )


@functools.cache
def _target_statements() -> tuple[Any, Any]:
    """Lock a target's state row (``SKIP LOCKED``), count its rows in flight (bound
    parameters ``claim_kind``, ``claim_target``, ``claim_now``), built once."""
    kind = bindparam("claim_kind", type_=String())
    target = bindparam("claim_target", type_=String())
    now = bindparam("claim_now", type_=UTCDateTime())
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
    return lock_target, count_in_flight


async def add_attempts(
    session: AsyncSession, rows: Sequence[dict[str, Any]], *, bulk: BulkInserts | None = None
) -> None:
    """Insert ``delivery_attempts`` rows (one Core executemany; with ``bulk``: queued
    there, sent with the caller's other writes)."""
    if bulk is not None:
        bulk.rows(DeliveryAttempt).extend(rows)
    elif rows:
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
        .where(*_keys_superset(refs))
    )
    wanted = set(refs)
    resources: dict[str, dict[str, Any]] = {}
    remote: dict[str, str] = {}
    for resource_type, local_id, resource, remote_id in rows:
        ref = f"{resource_type}/{local_id}"
        if ref not in wanted:
            continue
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
        .where(*_keys_superset(refs))
    )
    wanted = set(refs)
    remote: dict[str, str] = {}
    identifiers: dict[str, tuple[str, str]] = {}
    for resource_type, local_id, system, value, remote_id in rows:
        ref = f"{resource_type}/{local_id}"
        if ref not in wanted:
            continue
        if remote_id is not None:
            remote[ref] = remote_id
        if system and value:
            identifiers[ref] = (system, value)
    return remote, identifiers


def _keys_superset(refs: Sequence[str]) -> list[ColumnElement[bool]]:
    """``resource_type IN (...) AND id IN (...)`` for ``refs`` (``Type/id``): a superset
    of the rows (the caller keeps the exact pairs), as two expanding ``IN`` parameters,
    so the statement is compiled once whatever the number of refs (an OR of pairs is a
    new statement for every count); both databases search the primary key for each
    combination."""
    types = sorted({ref.split("/", 1)[0] for ref in refs})
    ids = sorted({ref.split("/", 1)[1] for ref in refs})
    return [FhirResource.resource_type.in_(types), FhirResource.id.in_(ids)]


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
    """Insert or update the EHR's ids for our resources (one statement; of two rows for
    the same resource the last wins)."""
    if not rows:
        return
    rows = list({(r.resource_type, r.local_id): r for r in rows}.values())
    insert = pg_insert if is_postgres(session) else sqlite_insert
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
