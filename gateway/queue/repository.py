"""The queries of the one queue: claim, heartbeat, ownership, finish, retry, release.

A queue is a table whose rows carry ``status``, ``available_at`` (due time),
``locked_until`` and ``locked_by`` (the lease and its owner) and ``attempts``, described
once by a :class:`QueueTable`. Two tables are queues: the outbox (``deliveries``) and the
inbox (``inbound_messages``, the events to apply).

Claiming is procrastinate's fetch-job pattern, one statement::

    UPDATE <table> SET status = <leased>, locked_until = :until, locked_by = :worker,
                       attempts = attempts + 1
    WHERE id IN (
        SELECT id FROM (
            (SELECT id ... WHERE status = <waiting> AND available_at <= :now
                             AND NOT <an older row of the same key is active>
             ORDER BY available_at, id LIMIT :n FOR UPDATE SKIP LOCKED)
            UNION ALL
            (SELECT id ... WHERE status = <leased> AND locked_until < :now ...
             ORDER BY available_at, id LIMIT :n FOR UPDATE SKIP LOCKED)) due
        ORDER BY available_at, id LIMIT :n)
    RETURNING *

* two scans, each in claim order: rows that are due (a partial index on the waiting
  rows reads just the first few) and rows whose lease ran out (a crashed worker's: few).
  One condition with OR would read and sort the whole backlog;
* ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: two workers never take the same row and never
  wait on each other; SQLite runs the same statement without it (one writer at a time);
* per-key order: a row is claimed only when no older row of the same partition and key
  (the patient, the case) is waiting or leased, so one key's rows go in order and a
  failing row holds back only its key;
* the lease: ``locked_until`` (extended by the owner's heartbeat, :func:`extend_leases`)
  and ``locked_by``. Every later write checks the owner (:func:`owned`, :func:`finish`):
  a worker that lost its lease cannot overwrite the outcome of the one that took over.

A table where a leased row keeps its waiting status (the inbox: ``received`` while it is
being applied, as the API shows it) has ``leased == waiting``: there the lease alone marks
a claimed row, and one scan finds due rows and expired leases together.

Retry scheduling is the caller's pure policy (:mod:`gateway.queue.policy`): after a
failure :func:`requeue` puts the row back at the policy's ``available_at``, the attempt
spent, or gives it back without spending it. These functions flush at most; the loop that
calls them owns the transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    Table,
    Update,
    and_,
    bindparam,
    case,
    exists,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from gateway.db.bulk import BulkInserts
from gateway.db.types import UTCDateTime

#: Extra values a claim sets, from the claim time (a bound parameter).
ClaimStamp = Callable[[Any, ColumnElement[datetime]], Mapping[str, Any]]


@dataclass(frozen=True, eq=False)  # compared by identity: a statement cache key
class QueueTable:
    """Which rows of a table form a queue and how they are claimed.

    Attributes:
        model: the mapped class (columns ``id``, ``status``, ``available_at``,
            ``locked_until``, ``locked_by``, ``attempts`` and those named below).
        waiting: the status of a row waiting for a worker.
        leased: the status of a claimed row (``waiting`` when the lease alone marks it).
        order: claim order (columns); the last one makes it total.
        partition: columns every claim names a value for (a delivery's kind and
            target); the per-key order and the partial index are within a partition.
        key: per-key order: a row waits while an older row (lower ``order``) of the same
            partition and key has a status in ``holding``.
        holding: see ``key``.
        scope: a fixed condition on the rows of this queue (the inbox: event channels).
        on_claim: extra values set by a claim (e.g. ``first_attempt_at``).
    """

    model: Any
    waiting: str
    leased: str
    order: tuple[str, ...] = ("available_at", "id")
    partition: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    holding: tuple[str, ...] = ()
    scope: Any = None
    on_claim: ClaimStamp | None = None

    def column(self, name: str) -> Any:
        """The mapped attribute ``name`` of the queue's model."""
        return getattr(self.model, name)


def is_postgres(session: AsyncSession) -> bool:
    """True when the session talks to PostgreSQL (row locks, SKIP LOCKED)."""
    return session.bind is not None and session.bind.dialect.name == "postgresql"


async def claim(
    session: AsyncSession,
    queue: QueueTable,
    *,
    limit: int,
    worker: str,
    locked_until: datetime,
    now: datetime,
    partition: Sequence[Any] = (),
) -> list[Any]:
    """Lease up to ``limit`` due rows of ``queue`` to ``worker``, counting the attempt.

    Args:
        session: the caller's transaction (commit it to keep the claim).
        queue: the queue.
        limit: most rows to claim (nothing is done below 1).
        worker: the lease owner (``locked_by``).
        locked_until: the end of the lease.
        now: the claim time: rows due at or before it, leases that ended before it.
        partition: the values of ``queue.partition``, in order.

    Returns:
        The claimed rows (ORM objects, fresh), in claim order.
    """
    if limit <= 0:
        return []
    stmt = _claim_statement(queue, is_postgres(session))
    params: dict[str, Any] = {
        "claim_now": now,
        "claim_limit": limit,
        "claim_locked_until": locked_until,
        "claim_worker": worker,
    }
    params.update({f"claim_p{i}": value for i, value in enumerate(partition)})
    rows = list((await session.scalars(stmt, params)).all())
    order = queue.order
    return sorted(rows, key=lambda r: tuple(getattr(r, c) for c in order))


async def claim_one(
    session: AsyncSession,
    queue: QueueTable,
    *,
    row_id: Any,
    worker: str,
    locked_until: datetime,
    now: datetime,
) -> Any | None:
    """Lease one row by id (a retry someone asked for), if it is due and not leased.

    Returns:
        The row (fresh), or None when it is not waiting, not due, or leased to another.
    """
    col = queue.column
    conditions = [
        col("id") == row_id,
        col("status") == queue.waiting,
        col("available_at") <= now,
        or_(col("locked_until").is_(None), col("locked_until") < now),
    ]
    if queue.scope is not None:
        conditions.append(queue.scope)
    values: dict[str, Any] = {
        "status": queue.leased,
        "locked_until": locked_until,
        "locked_by": worker,
        "attempts": col("attempts") + 1,
    }
    return await session.scalar(
        update(queue.model)
        .where(*conditions)
        .values(**values)
        .returning(queue.model)
        .execution_options(synchronize_session=False, populate_existing=True)
    )


@functools.cache
def _claim_statement(queue: QueueTable, postgres: bool) -> Any:
    """The claim statement, built once per queue and dialect (bound parameters
    ``claim_now``, ``claim_limit``, ``claim_locked_until``, ``claim_worker`` and
    ``claim_p<i>`` for the partition; a column's name is reserved in an UPDATE)."""
    m = queue.model
    now = bindparam("claim_now", type_=UTCDateTime())
    limit = bindparam("claim_limit", type_=Integer())
    col = queue.column
    where_partition = [
        col(name) == bindparam(f"claim_p{i}", type_=String())
        for i, name in enumerate(queue.partition)
    ]
    if queue.scope is not None:
        where_partition.append(queue.scope)
    not_blocked: list[Any] = []
    if queue.key:
        older = aliased(m)
        not_blocked.append(
            ~exists().where(
                *(getattr(older, c) == col(c) for c in (*queue.partition, *queue.key)),
                older.id < col("id"),
                older.status.in_(list(queue.holding)),
            )
        )
    ordered = [col(c) for c in queue.order]
    selected = [col("id"), *(col(c) for c in queue.order if c != "id")]
    due_conditions = [
        *where_partition,
        col("status") == queue.waiting,
        col("available_at") <= now,
        *not_blocked,
    ]
    if queue.leased == queue.waiting:
        # The lease alone marks a claimed row: due and not leased, or its lease ended.
        due_conditions.append(or_(col("locked_until").is_(None), col("locked_until") < now))
    scans = [select(*selected).where(*due_conditions).order_by(*ordered).limit(limit)]
    if queue.leased != queue.waiting:
        scans.append(
            select(*selected)
            .where(
                *where_partition,
                col("status") == queue.leased,
                col("locked_until") < now,
                *not_blocked,
            )
            .order_by(*ordered)
            .limit(limit)
        )
    if postgres:
        scans = [s.with_for_update(skip_locked=True) for s in scans]
    if len(scans) == 1:
        candidates = scans[0].with_only_columns(col("id"))
    else:
        due = union_all(*(s.cte(f"scan{i}").select() for i, s in enumerate(scans))).subquery()
        candidates = select(due.c.id).order_by(*(due.c[c] for c in queue.order)).limit(limit)
    values: dict[str, Any] = {
        "status": queue.leased,
        "locked_until": bindparam("claim_locked_until", type_=UTCDateTime()),
        "locked_by": bindparam("claim_worker", type_=String()),
        "attempts": col("attempts") + 1,
    }
    if queue.on_claim is not None:
        values.update(queue.on_claim(m, now))
    return (
        update(m)
        .where(col("id").in_(candidates.scalar_subquery()))
        .values(**values)
        .returning(m)
        .execution_options(synchronize_session=False, populate_existing=True)
    )


def _owned_by(queue: QueueTable, ids: Sequence[Any], worker: str) -> list[Any]:
    col = queue.column
    return [col("id").in_(list(ids)), col("locked_by") == worker, col("status") == queue.leased]


async def extend_leases(
    session: AsyncSession,
    queue: QueueTable,
    *,
    ids: Sequence[Any],
    worker: str,
    locked_until: datetime,
) -> int:
    """Push the lease of ``worker``'s rows among ``ids`` to ``locked_until`` (heartbeat).

    Returns:
        How many rows were still this worker's.
    """
    if not ids:
        return 0
    result = await session.execute(
        update(queue.model)
        .where(*_owned_by(queue, ids, worker))
        .values(locked_until=locked_until)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def owned(
    session: AsyncSession, queue: QueueTable, *, ids: Sequence[Any], worker: str
) -> set[Any]:
    """Of ``ids``, the rows ``worker`` still holds (leased to it), locked ``FOR UPDATE``
    on PostgreSQL until the transaction ends, so their outcome can be written safely."""
    if not ids:
        return set()
    stmt = select(queue.column("id")).where(*_owned_by(queue, ids, worker))
    if is_postgres(session):
        stmt = stmt.with_for_update()
    return set(await session.scalars(stmt))


async def finish(
    session: AsyncSession,
    queue: QueueTable,
    *,
    row_id: Any,
    worker: str,
    values: Mapping[str, Any],
) -> bool:
    """Write a claimed row's outcome (``values``) and end its lease, if ``worker`` still
    holds it.

    Returns:
        False when the lease was lost (another worker took the row over: its outcome
        wins).
    """
    result = await session.execute(
        update(queue.model)
        .where(*_owned_by(queue, [row_id], worker))
        .values(locked_by=None, locked_until=None, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def requeue(
    session: AsyncSession,
    queue: QueueTable,
    *,
    row_id: Any,
    worker: str,
    available_at: datetime,
    spent: bool,
    values: Mapping[str, Any] | None = None,
) -> bool:
    """Put a claimed row back in the queue, due at ``available_at``, if ``worker`` still
    holds it.

    Args:
        spent: the attempt counts (a failure: ``available_at`` is the retry policy's
            answer); False gives it back (nothing was tried: the work needs another
            process, or something it waits for is not there yet).
        values: more columns to set.

    Returns:
        False when the lease was lost.
    """
    attempts = queue.column("attempts")
    back: dict[str, Any] = {"status": queue.waiting, "available_at": available_at}
    if not spent:  # attempts - 1, never below 0 (portable: SQLite has no GREATEST)
        back["attempts"] = case((attempts > 0, attempts - 1), else_=0)
    return await finish(
        session, queue, row_id=row_id, worker=worker, values={**back, **(values or {})}
    )


async def write_rows(
    session: AsyncSession,
    queue: QueueTable,
    rows: Sequence[Mapping[str, Any]],
    *,
    bulk: BulkInserts | None = None,
) -> None:
    """Bulk ``UPDATE ... WHERE id = :id`` of rows this worker has locked (:func:`owned`):
    each mapping has ``id`` and the new values; one executemany per set of columns (with
    ``bulk``: queued there, sent with the caller's other writes)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        keys = tuple(sorted(k for k in row if k != "id"))
        groups.setdefault(keys, []).append({"_id": row["id"], **{k: row[k] for k in keys}})
    table = cast(Table, queue.model.__table__)
    for keys, params in groups.items():

        def build(keys: tuple[str, ...] = keys) -> Update:
            return (
                update(table)
                .where(table.c.id == bindparam("_id"))
                .values({k: bindparam(k) for k in keys})
            )

        if bulk is not None:
            bulk.add_statement(("write_rows", table.name, keys), build, params)
        else:
            await session.execute(build(), params)


def due_condition(queue: QueueTable, now: datetime) -> ColumnElement[bool]:
    """Rows of ``queue`` a claim at ``now`` could take (for counts and tests)."""
    col = queue.column
    due = and_(col("status") == queue.waiting, col("available_at") <= now)
    if queue.leased == queue.waiting:
        return and_(due, or_(col("locked_until").is_(None), col("locked_until") < now))
    return or_(due, and_(col("status") == queue.leased, col("locked_until") < now))
