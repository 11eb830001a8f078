"""Writing delivery outcomes: one transaction per batch, only for rows the worker still
holds.

Outcomes (see :mod:`gateway.delivery.sender`), each row's new values:

* delivered: ``delivered``; the sender's effects (the EHR's ids); the message reached
  the target (``on_reached``: its case records it);
* transient failure: counted against the circuit breaker; retried with full-jitter
  backoff (at least ``Retry-After``: :func:`gateway.queue.policy.next_retry`), or
  dead-lettered when the policy gives up, except while the circuit is open: the EHR is
  down, the row waits for it and is not dead-lettered;
* rejected (4xx): dead-lettered at once with the peer's OperationOutcome;
* needs review (412, several matching patients): ``review`` with the matches;
* wait (no token, misconfigured target): back in the queue, the attempt not counted.

Outcomes that finish while a batch is being written are written together in the next one
(one transaction, one commit): under load the commits are shared, at rest each outcome
is written at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import metrics
from gateway.audit import service as audit
from gateway.clients.actor import SYSTEM
from gateway.clock import Clock
from gateway.db.bulk import BulkInserts
from gateway.db.models import Delivery, DeliveryStatus
from gateway.db.uow import SessionFactory, unit_of_work
from gateway.delivery import circuit
from gateway.delivery import repository as repo
from gateway.delivery.sender import (
    BatchedRows,
    Delivered,
    Failed,
    NeedsReview,
    Outcome,
    Reached,
    Rejected,
    TargetConfig,
    Wait,
)
from gateway.logging import get_logger, log_failure
from gateway.queue import repository as queue
from gateway.queue.policy import next_retry

log = get_logger(__name__)

#: Statuses after which a 'Retry-After' pauses the whole target.
THROTTLING_STATUS = frozenset({429, 503})
#: Most outcomes written in one transaction.
RECORD_BATCH = 64
#: ``delivery_attempts.outcome`` of each outcome type (waits are not attempts).
ATTEMPT_OUTCOME: dict[type, str] = {
    Delivered: "delivered",
    Failed: "transient",
    Rejected: "permanent",
    NeedsReview: "permanent",
}

#: Told which messages reached their targets, in the transaction that records those
#: outcomes (the wiring records the cases' ``ehr_delivered`` events).
OnReached = Callable[[AsyncSession, Sequence[Reached]], Awaitable[object]]


@dataclass(frozen=True)
class Finished:
    """A sent delivery waiting to be recorded."""

    config: TargetConfig
    delivery: Delivery
    outcome: Outcome
    started_at: datetime
    duration_s: float


class OutcomeRecorder:
    """Writes a worker's outcomes (see the module docstring).

    Args:
        sessions: write sessions.
        worker: the lease owner: only rows it still holds are written.
        clock: the worker's clock.
        breakers: the worker's view of its targets' circuits.
        on_reached: told which messages reached their targets (None: nobody).
    """

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        worker: str,
        clock: Clock,
        breakers: circuit.CircuitBreakers,
        on_reached: OnReached | None,
    ) -> None:
        self._sessions = sessions
        self._worker = worker
        self._clock = clock
        self._breakers = breakers
        self._on_reached = on_reached
        self._pending: list[tuple[Finished, asyncio.Future[None]]] = []
        self._writing = False

    async def submit(self, item: Finished) -> None:
        """Record an outcome, with those that finish meanwhile; returns once written
        (or, when the write failed, logged: the row's lease expires and it is claimed
        again)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._writing:
            self._writing = True
            try:
                while self._pending:
                    batch = self._pending[:RECORD_BATCH]
                    del self._pending[:RECORD_BATCH]
                    await self._record_batch([i for i, _ in batch])
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
            finally:
                self._writing = False
        await future

    async def _record_batch(self, items: list[Finished]) -> None:
        """Write a batch in one transaction; if that fails, each on its own (one bad
        outcome must not lose the others)."""
        try:
            recorded = await self._write_reconnecting(items)
        except Exception as exc:
            if len(items) == 1:
                self._log_failed(exc, items[0])
                return
            recorded = []
            for item in items:
                try:
                    recorded += await self._write([item])
                except Exception as one_exc:
                    self._log_failed(one_exc, item)
        for item, label, values in recorded:
            report(item, label, values)

    def _log_failed(self, exc: BaseException, item: Finished) -> None:
        log_failure(
            log, "delivery.record_failed", exc, worker=self._worker, delivery_id=item.delivery.id
        )

    async def _write_reconnecting(
        self, items: list[Finished]
    ) -> list[tuple[Finished, str, dict[str, Any]]]:
        """:meth:`_write`, once more on a new connection when the pooled one had been
        dropped by the server (PostgreSQL restart or failover while the pool held it; the
        pool does not pre-ping by default, ``GATEWAY_DATABASE_POOL_PRE_PING``). Without
        this the outcome would be lost and the row sent again when its lease expired.
        Safe to repeat: a write that did commit released the rows, so the second finds
        none of them owned and writes nothing."""
        try:
            return await self._write(items)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            log.warning("delivery.record_reconnected", deliveries=len(items))
            return await self._write(items)

    async def _write(self, items: list[Finished]) -> list[tuple[Finished, str, dict[str, Any]]]:
        now = self._clock.now()
        done: list[tuple[Finished, str, dict[str, Any]]] = []
        async with unit_of_work(self._sessions) as session:
            owned = await queue.owned(
                session, repo.OUTBOX, ids=[i.delivery.id for i in items], worker=self._worker
            )
            rows: list[dict[str, Any]] = []
            attempt_rows: list[dict[str, Any]] = []
            # the rows' outcomes, their attempts and the disclosures' audit entries: one
            # round trip
            bulk = BulkInserts()
            answered: dict[circuit.Key, tuple[TargetConfig, int, bool]] = {}
            reached: list[Reached] = []
            shared: dict[Hashable, tuple[BatchedRows, list[Any]]] = {}
            for item in items:
                delivery, outcome = item.delivery, item.outcome
                if delivery.id not in owned:
                    log.warning(
                        "delivery.lease_lost",
                        delivery_id=delivery.id,
                        target=item.config.name,
                        attempt=delivery.attempts,
                    )
                    continue
                values, label = await self._values(session, item, now)
                rows.append({"id": delivery.id, "locked_by": None, "locked_until": None, **values})
                effects = outcome.effects
                if isinstance(effects, BatchedRows):
                    shared.setdefault(effects.key, (effects, []))[1].extend(effects.rows)
                elif effects is not None:
                    await effects(session)
                if isinstance(outcome, Delivered) and outcome.reached is not None:
                    reached.append(outcome.reached)
                if not isinstance(outcome, Wait):
                    attempt_rows.append(self._attempt_row(item))
                    if item.config.kind == "ehr":
                        _audit_disclosure(session, item, label, now, bulk)
                key = (item.config.kind, item.config.name)
                if isinstance(outcome, Delivered | NeedsReview) or (
                    isinstance(outcome, Rejected) and outcome.status_code is not None
                ):
                    _, count, delivered = answered.get(key, (item.config, 0, False))
                    answered[key] = (
                        item.config,
                        count + 1,
                        delivered or isinstance(outcome, Delivered),
                    )
                done.append((item, label, values))
            for first, shared_rows in shared.values():
                await first.write(session, shared_rows)
            if reached and self._on_reached is not None:
                await self._on_reached(session, reached)
            await queue.write_rows(session, repo.OUTBOX, rows, bulk=bulk)
            await repo.add_attempts(session, attempt_rows, bulk=bulk)
            await bulk.flush(session)
            for key, (config, count, delivered) in answered.items():
                await self._breakers.answered(
                    session,
                    key,
                    now=now,
                    delivered=delivered,
                    policy=config.circuit,
                    count=count,
                )
        return done

    def _attempt_row(self, item: Finished) -> dict[str, Any]:
        outcome = item.outcome
        error = getattr(outcome, "error", None)
        return {
            "delivery_id": item.delivery.id,
            "attempt": item.delivery.attempts,
            "worker": self._worker,
            "started_at": item.started_at,
            "duration_ms": int(item.duration_s * 1000),
            "status_code": getattr(outcome, "status_code", None),
            "outcome": ATTEMPT_OUTCOME[type(outcome)],
            "error": error[:500] if error else None,
        }

    async def _values(
        self, session: AsyncSession, item: Finished, now: datetime
    ) -> tuple[dict[str, Any], str]:
        """The row's new values and the metric label of an outcome."""
        outcome = item.outcome
        if isinstance(outcome, Delivered) and outcome.shadow:
            return {
                "status": DeliveryStatus.SHADOWED,
                "last_status_code": outcome.status_code,
                "last_error": None,
                "operation_outcome": None,
            }, "shadowed"
        if isinstance(outcome, Delivered):
            return {
                "status": DeliveryStatus.DELIVERED,
                "delivered_at": now,
                "last_status_code": outcome.status_code,
                "last_error": None,
                "operation_outcome": None,
            }, "delivered"
        if isinstance(outcome, Failed):
            return await self._failed(session, item.config, item.delivery, outcome, now)
        if isinstance(outcome, Rejected):
            return {
                "status": DeliveryStatus.DEAD,
                "dead_reason": outcome.reason,
                "last_error": outcome.error[:500],
                "last_status_code": outcome.status_code,
                "operation_outcome": outcome.operation_outcome,
            }, "dead"
        if isinstance(outcome, NeedsReview):
            return {
                "status": DeliveryStatus.REVIEW,
                "dead_reason": str(outcome.review.get("reason", "review")),
                "review": outcome.review,
                "last_error": outcome.error[:500],
                "last_status_code": outcome.status_code,
                "operation_outcome": outcome.operation_outcome,
            }, "review"
        return {
            "status": DeliveryStatus.PENDING,
            "available_at": now + timedelta(seconds=max(0.0, outcome.wait_s)),
            "attempts": max(0, item.delivery.attempts - 1),
            "last_error": outcome.error[:500],
        }, "waiting"

    async def _failed(
        self,
        session: AsyncSession,
        config: TargetConfig,
        delivery: Delivery,
        outcome: Failed,
        now: datetime,
    ) -> tuple[dict[str, Any], str]:
        """Row values for a transient failure, after counting it against the circuit."""
        policy = config.circuit
        retry_after = outcome.retry_after_s
        if retry_after is not None:  # honoured within a sane cap
            retry_after = min(retry_after, policy.max_retry_after_s)
        throttle = retry_after if outcome.status_code in THROTTLING_STATUS else None
        failure = await circuit.record_failure(
            session,
            kind=config.kind,
            target=config.name,
            now=now,
            policy=policy,
            error=outcome.error,
            throttle_s=throttle,
            retry_after_s=retry_after,
            successes=self._breakers.failed((config.kind, config.name)),
        )
        started = max(delivery.created_at, delivery.replayed_at or delivery.created_at)
        decision = next_retry(
            attempts=delivery.attempts,
            created_at=started,
            now=now,
            policy=config.retry,
            retry_after_s=retry_after,
        )
        values: dict[str, Any] = {
            "last_error": outcome.error[:500],
            "last_status_code": outcome.status_code,
        }
        if decision.give_up and not failure.holds_deliveries:
            values.update(status=DeliveryStatus.DEAD, dead_reason=decision.give_up)
            return values, "dead"
        # One timing model: while the circuit is open nothing of the target is claimed,
        # and the breaker's trial schedule is this row's wait: due at once, it goes as soon
        # as the circuit lets deliveries through, not a retry backoff after that.
        retry_at = now if failure.holds_deliveries else (decision.retry_at or now)
        if failure.throttled_until is not None:
            retry_at = max(retry_at, failure.throttled_until)
        values.update(status=DeliveryStatus.PENDING, available_at=retry_at)
        return values, "transient"


#: AuditEvent.outcome of a delivery attempt's metric label.
_AUDIT_OUTCOME: dict[str, audit.AuditOutcome] = {"delivered": "0", "dead": "8", "review": "4"}


def _audit_disclosure(
    session: AsyncSession, item: Finished, label: str, now: datetime, bulk: BulkInserts
) -> None:
    """An attempt to send a patient's resources to an EHR, in the audit trail (a
    disclosure, whatever its outcome), as the system (queued in ``bulk``)."""
    delivery = item.delivery
    audit.record(
        session,
        action="deliver",
        entity_type="Delivery",
        entity_id=str(delivery.id),
        patient_id=delivery.ordering_key,
        outcome=_AUDIT_OUTCOME.get(label, "4"),
        detail={
            "target": item.config.name,
            "message_id": delivery.inbound_message_id,
            "attempt": delivery.attempts,
            "resources": len(delivery.resource_refs or []),
        },
        actor=SYSTEM,
        at=now,
        bulk=bulk,
    )


def report(item: Finished, label: str, values: dict[str, Any]) -> None:
    """Metrics and the log line of a recorded outcome (ids only)."""
    outcome, delivery = item.outcome, item.delivery
    kind, target = item.config.kind, item.config.name
    fields: dict[str, Any] = {
        "delivery_id": delivery.id,
        "target": target,
        "attempt": delivery.attempts,
    }
    metrics.DELIVERIES.labels(kind=kind, target=target, outcome=label).inc()
    if not isinstance(outcome, Wait):
        metrics.ATTEMPT_SECONDS.labels(kind=kind, target=target).observe(item.duration_s)
    status_code = getattr(outcome, "status_code", None)
    if isinstance(outcome, Delivered) and outcome.shadow:
        log.info("delivery.shadowed", duration_ms=int(item.duration_s * 1000), **fields)
    elif isinstance(outcome, Delivered):
        if kind == "ehr" and delivery.source_received_at is not None:
            delivered_at = values["delivered_at"]
            metrics.INTAKE_TO_EHR_SECONDS.labels(target=target).observe(
                max(0.0, (delivered_at - delivery.source_received_at).total_seconds())
            )
        log.info("delivery.delivered", duration_ms=int(item.duration_s * 1000), **fields)
    elif isinstance(outcome, Failed):
        log.info(
            "delivery.attempt_failed",
            status_code=status_code,
            dead=label == "dead",
            reason=values.get("dead_reason"),
            **fields,
        )
    elif isinstance(outcome, Rejected | NeedsReview):
        log.warning(
            "delivery.dead_lettered" if label == "dead" else "delivery.review",
            status_code=status_code,
            reason=values.get("dead_reason"),
            **fields,
        )
    else:
        log.info(
            "delivery.waiting",
            reason=outcome.reason,
            wait_s=round(outcome.wait_s, 3),
            **fields,
        )
