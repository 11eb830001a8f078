"""The delivery worker: claims due outbox rows and hands them to the sender of their kind.

Generic over kinds (:mod:`gateway.delivery.sender`): EHR deliveries and ops webhooks share
the claim, lease, concurrency, rate, circuit-breaker, retry, dead-letter and replay
machinery; only sending differs.

The loop keeps up to ``concurrency`` deliveries in flight. Whenever slots are free it
claims for each target of each sender, skipping a target while

* its circuit is open (a probe is started when due: one worker probes, the others wait),
* a ``Retry-After`` from it has not passed (``throttled_until``),
* its OAuth token is unavailable and being backed off (the auth circuit),

and claiming at most what the target's ``max_concurrent`` leaves (one while half-open).
A heartbeat extends the leases of the rows in flight; a killed worker's rows are claimed
again when their lease runs out, and idempotent writes make the second send harmless.

Outcomes (each recorded in one transaction, only if this worker still holds the lease):

* delivered: ``delivered``; the sender's effects (the EHR's ids, the case event);
* transient failure: counted against the circuit breaker; retried with full-jitter
  backoff (at least ``Retry-After``), or dead-lettered when the policy gives up, except
  while the circuit is open: the EHR is down, the row waits for it and is not
  dead-lettered;
* rejected (4xx): dead-lettered at once with the peer's OperationOutcome;
* needs review (412, several matching patients): ``review`` with the matches;
* wait (no token, misconfigured target): back in the queue, the attempt not counted.

The worker holds no database connection while it waits for a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.exc import DBAPIError

from gateway import metrics
from gateway.db.models import Delivery, DeliveryStatus
from gateway.db.types import utcnow
from gateway.delivery import repository as repo
from gateway.delivery.ehr_sender import default_ehr_sender
from gateway.delivery.policy import next_retry
from gateway.delivery.sender import (
    Delivered,
    Failed,
    NeedsReview,
    Outcome,
    Rejected,
    Sender,
    TargetConfig,
    Wait,
)
from gateway.ehr.errors import EhrConfigError
from gateway.ehr.factory import EhrClients
from gateway.events.service import sweep_pending
from gateway.logging import get_logger, log_failure
from gateway.oauth.tokens import auth_wait_until
from gateway.runtime import Runtime
from gateway.subscribers.sender import WebhookSender
from gateway.workflow.service import EventInput, record_events, sweep_workflow

log = get_logger(__name__)

#: How long a probe of an open circuit may take before another worker may probe.
PROBE_LEASE = timedelta(seconds=60)
#: Statuses after which a 'Retry-After' pauses the whole target.
THROTTLING_STATUS = frozenset({429, 503})
#: How long the list of targets is reused between claim rounds (seconds).
TARGETS_TTL_S = 1.0
#: Most outcomes written in one transaction.
RECORD_BATCH = 64
#: ``delivery_attempts.outcome`` of each outcome type (waits are not attempts).
ATTEMPT_OUTCOME: dict[type, str] = {
    Delivered: "delivered",
    Failed: "transient",
    Rejected: "permanent",
    NeedsReview: "permanent",
}


@dataclass(frozen=True)
class _Finished:
    """A sent delivery waiting to be recorded."""

    config: TargetConfig
    delivery: Delivery
    outcome: Outcome
    started_at: datetime
    duration_s: float


def default_senders(
    runtime: Runtime,
    *,
    http: httpx.AsyncClient | None = None,
    token_transport: httpx.AsyncBaseTransport | None = None,
    max_connections: int = 100,
) -> dict[str, Sender]:
    """The senders of every delivery kind, by kind: ``ehr`` (FHIR to EHR targets) and
    ``webhook`` (signed case state changes to ops subscribers)."""
    clients = EhrClients.for_runtime(
        runtime, http=http, token_transport=token_transport, max_connections=max_connections
    )
    return {
        "ehr": default_ehr_sender(runtime, clients=clients),
        "webhook": WebhookSender(runtime, http=http),
    }


class DeliveryWorker:
    """Delivers outbox rows, ``concurrency`` at a time.

    Args:
        runtime: the wired runtime.
        concurrency: deliveries in flight at once in this process.
        senders: the sender per kind (default: :func:`default_senders`).
        http: shared HTTP client for FHIR requests (one connection pool).
        token_transport: httpx transport for token requests (tests).
        name: this worker's lease owner name (default: host, pid and a random suffix).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        concurrency: int = 4,
        senders: Mapping[str, Sender] | None = None,
        http: httpx.AsyncClient | None = None,
        token_transport: httpx.AsyncBaseTransport | None = None,
        name: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.concurrency = concurrency
        self.name = name or f"{runtime.instance_id}:{uuid.uuid4().hex[:8]}"
        self.senders: dict[str, Sender] = dict(
            senders
            if senders is not None
            else default_senders(
                runtime,
                http=http,
                token_transport=token_transport,
                max_connections=max(10, concurrency * 2),
            )
        )
        self._running: dict[int, asyncio.Task[None]] = {}
        self._pairs: list[tuple[Sender, TargetConfig]] | None = None
        self._pairs_until = 0.0
        self._sending = 0
        self._probing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._known_targets: set[tuple[str, str]] = set()
        self._round = 0
        self._to_record: list[tuple[_Finished, asyncio.Future[None]]] = []
        self._recording = False
        self._clean_targets: set[tuple[str, str]] = set()
        self._success_written: dict[tuple[str, str], float] = {}
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()

    def wake(self) -> None:
        """Look for work now instead of at the next poll (and read the targets again)."""
        self._pairs_until = 0.0
        self._wakeup.set()

    async def read_resource(
        self, target: str, resource_type: str, resource_id: str
    ) -> dict[str, Any]:
        """Read a resource from an EHR target with its token (id-only notifications).

        Raises:
            EhrConfigError: no such target; the errors of :meth:`EhrClient.read`.
        """
        profile = self.runtime.profiles.current.ehr.get(target)
        sender = self.senders.get("ehr")
        clients = getattr(sender, "clients", None)
        if profile is None or clients is None:
            raise EhrConfigError(f"no EHR target {target!r}")
        result: dict[str, Any] = await clients.client_for(profile).read(resource_type, resource_id)
        return result

    def _free_slots(self) -> int:
        """Deliveries this worker may claim now: ``concurrency`` requests in flight, and
        at most as many more outcomes waiting to be written."""
        return max(
            0,
            min(
                self.concurrency - self._sending,
                2 * self.concurrency - len(self._running),
            ),
        )

    @property
    def in_flight(self) -> int:
        """Deliveries this worker is sending right now."""
        return len(self._running)

    # ------------------------------------------------------------------ loops

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then let the deliveries in flight finish."""
        settings = self.runtime.settings
        poll = settings.worker_poll_interval.total_seconds()
        threshold = max(1, self.concurrency // 2)
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        last_sweep = 0.0
        sweep_again = False
        log.info("worker.started", worker=self.name, concurrency=self.concurrency)
        try:
            while not stop.is_set():
                # Cleared before claiming: a delivery finishing meanwhile ends the wait.
                self._changed.clear()
                self._wakeup.clear()
                free = self._free_slots()
                if free >= threshold or (free > 0 and not self._sending):
                    try:
                        await self._claim_round(free)
                    except Exception as exc:
                        self._log_unexpected("worker.claim_failed", exc)
                # Stored events and workflow timers are swept at least every poll, busy
                # or not (under a steady delivery load a sweep only when idle would starve
                # them), and again at once while a sweep finds a backlog.
                if sweep_again or time.monotonic() - last_sweep >= poll:
                    last_sweep = time.monotonic()
                    swept = 0
                    try:
                        swept = await sweep_pending(self.runtime, reader=self.read_resource)
                        swept += await sweep_workflow(self.runtime)
                    except Exception as exc:
                        self._log_unexpected("worker.sweep_failed", exc)
                    sweep_again = swept > 0
                if not sweep_again:
                    await self._wait(stop, poll_s=poll)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            pending = [*self._running.values(), *self._probing.values()]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            log.info("worker.stopped", worker=self.name)

    async def _wait(self, stop: asyncio.Event, *, poll_s: float) -> None:
        """Sleep until stopped, woken, a delivery or probe finished (a free slot, or a
        patient's next delivery unblocked), or ``timeout``."""
        waiters = [
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(self._wakeup.wait()),
            asyncio.ensure_future(self._changed.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        lease = self.runtime.settings.worker_lease
        interval = max(0.05, lease.total_seconds() / 3)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            ids = list(self._running)
            if not ids:
                continue
            try:
                async with self.runtime.write_session() as session:
                    await repo.extend_leases(
                        session, ids=ids, worker=self.name, until=utcnow() + lease
                    )
                    await session.commit()
            except Exception as exc:
                self._log_unexpected("worker.heartbeat_failed", exc)

    async def run_once(self) -> int:
        """One claim round, then wait for everything it started (tests, benchmarks).

        Returns:
            How many deliveries were attempted.
        """
        claimed = await self._claim_round(self._free_slots(), fresh=True)
        pending = [*self._running.values(), *self._probing.values()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return claimed

    # ------------------------------------------------------------------ claiming

    async def _targets(self, *, fresh: bool = False) -> list[tuple[Sender, TargetConfig]]:
        """Every sender's targets, read again at most every :data:`TARGETS_TTL_S` (the
        webhook sender reads its subscribers from the database) unless ``fresh``."""
        at = time.monotonic()
        if fresh or self._pairs is None or at >= self._pairs_until:
            pairs = []
            for sender in self.senders.values():
                for config in await sender.targets():
                    pairs.append((sender, config))
            self._pairs, self._pairs_until = pairs, at + TARGETS_TTL_S
        return self._pairs

    async def _claim_round(self, free: int, *, fresh: bool = False) -> int:
        """Claim up to ``free`` deliveries across targets and start them; start due
        probes. Returns how many deliveries were started.

        One transaction: the targets' gates (circuit, throttle, token) are read and every
        open target is claimed from; each target's claim locks its state row (PostgreSQL)
        until the commit."""
        if free <= 0:
            return 0
        pairs = await self._targets(fresh=fresh)
        if not pairs:
            return 0
        keys = [(c.kind, c.name) for _, c in pairs]
        now = utcnow()
        self._round += 1
        start = self._round % len(pairs)
        settings = self.runtime.settings
        probes: list[tuple[Sender, TargetConfig]] = []
        batches: list[tuple[Sender, TargetConfig, list[Delivery]]] = []
        async with self.runtime.write_session() as session:
            new = [k for k in keys if k not in self._known_targets]
            if new:
                await repo.ensure_target_states(session, new)
            gates = await repo.target_gates(session, keys)
            for sender, config in pairs[start:] + pairs[:start]:
                if free <= 0:
                    break
                key = (config.kind, config.name)
                state, token = gates.get(key, (None, None))
                circuit = state.circuit if state is not None else "closed"
                if state is not None and circuit == "closed" and state.consecutive_failures == 0:
                    self._clean_targets.add(key)
                else:
                    self._clean_targets.discard(key)
                if circuit == "open":
                    if state is not None and (
                        state.next_probe_at is None or state.next_probe_at <= now
                    ):
                        probes.append((sender, config))
                    continue
                if state is not None and state.throttled_until and state.throttled_until > now:
                    continue
                if config.uses_token and auth_wait_until(token, now):
                    continue
                claimed = await repo.claim_for_target(
                    session,
                    kind=config.kind,
                    target=config.name,
                    limit=free,
                    max_in_flight=1 if circuit == "half_open" else config.max_concurrent,
                    worker=self.name,
                    lease=settings.worker_lease,
                    now=now,
                )
                if claimed:
                    batches.append((sender, config, claimed))
                    free -= len(claimed)
            await session.commit()
        self._known_targets.update(new)
        for sender, config in probes:
            await self._start_probe(sender, config, now)
        started = 0
        for sender, config, claimed in batches:
            prepare = getattr(sender, "prepare", None)
            if prepare is not None:
                try:
                    await prepare(claimed)
                except Exception as exc:  # each send() then loads its own data
                    self._log_unexpected("delivery.prepare_failed", exc)
            for delivery in claimed:
                self._sending += 1
                self._running[delivery.id] = asyncio.create_task(
                    self._process(sender, config, delivery)
                )
            started += len(claimed)
        return started

    async def _start_probe(self, sender: Sender, config: TargetConfig, now: datetime) -> None:
        key = (config.kind, config.name)
        if key in self._probing:
            return
        async with self.runtime.write_session() as session:
            won = await repo.take_probe(
                session, kind=config.kind, target=config.name, now=now, lease=PROBE_LEASE
            )
            await session.commit()
        if won:
            self._probing[key] = asyncio.create_task(self._probe(sender, config))

    async def _probe(self, sender: Sender, config: TargetConfig) -> None:
        key = (config.kind, config.name)
        try:
            try:
                ok = await sender.probe(config.name)
            except Exception as exc:
                self._log_unexpected("delivery.probe_crashed", exc)
                ok = False
            async with self.runtime.write_session() as session:
                circuit = await repo.record_probe(
                    session,
                    kind=config.kind,
                    target=config.name,
                    ok=ok,
                    now=utcnow(),
                    policy=config.circuit,
                )
                await session.commit()
            log.info(
                "delivery.circuit_probed",
                kind=config.kind,
                target=config.name,
                ok=ok,
                circuit=circuit,
            )
        except Exception as exc:
            self._log_unexpected("delivery.probe_failed", exc)
        finally:
            self._probing.pop(key, None)
            self._changed.set()

    # ------------------------------------------------------------------ delivering

    async def _process(self, sender: Sender, config: TargetConfig, delivery: Delivery) -> None:
        started_at = utcnow()
        t0 = time.perf_counter()
        sending = True
        try:
            try:
                outcome = await sender.send(delivery)
            except Exception as exc:
                self._log_unexpected("delivery.crashed", exc, delivery_id=delivery.id)
                outcome = Failed(f"unexpected error in the sender ({type(exc).__name__})")
            if isinstance(outcome, Delivered):
                # The request is over: its slot may take the next delivery while this
                # outcome is written (the row stays leased, and counted, until then). A
                # failure keeps its slot until recorded, so the next claim sees the
                # circuit breaker and Retry-After it may have set.
                sending = False
                self._sending -= 1
                self._changed.set()
            finished = _Finished(config, delivery, outcome, started_at, time.perf_counter() - t0)
            await self._submit(finished)
        finally:
            if sending:
                self._sending -= 1
            self._running.pop(delivery.id, None)
            self._changed.set()

    async def _submit(self, item: _Finished) -> None:
        """Record an outcome. Outcomes that finish while a batch is being written are
        written together in the next one (one transaction, one commit): under load the
        commits are shared, at rest each outcome is written at once."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_record.append((item, future))
        if not self._recording:
            self._recording = True
            try:
                while self._to_record:
                    batch = self._to_record[:RECORD_BATCH]
                    del self._to_record[:RECORD_BATCH]
                    await self._record_batch([i for i, _ in batch])
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
            finally:
                self._recording = False
        await future

    async def _record_batch(self, items: list[_Finished]) -> None:
        """Write a batch of outcomes in one transaction; if that fails, each on its own
        (one bad outcome must not lose the others). A row whose write fails stays in
        flight; its lease expires and it is claimed again."""
        try:
            recorded = await self._write_reconnecting(items)
        except Exception as exc:
            if len(items) == 1:
                self._log_unexpected(
                    "delivery.record_failed", exc, delivery_id=items[0].delivery.id
                )
                return
            recorded = []
            for item in items:
                try:
                    recorded += await self._write([item])
                except Exception as one_exc:
                    self._log_unexpected(
                        "delivery.record_failed", one_exc, delivery_id=item.delivery.id
                    )
        for item, label, values in recorded:
            self._report(item, label, values)

    async def _write_reconnecting(
        self, items: list[_Finished]
    ) -> list[tuple[_Finished, str, dict[str, Any]]]:
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

    async def _write(self, items: list[_Finished]) -> list[tuple[_Finished, str, dict[str, Any]]]:
        now = utcnow()
        done: list[tuple[_Finished, str, dict[str, Any]]] = []
        async with self.runtime.write_session() as session:
            owned = await repo.lock_owned(
                session, ids=[i.delivery.id for i in items], worker=self.name
            )
            rows: list[dict[str, Any]] = []
            attempt_rows: list[dict[str, Any]] = []
            answered: dict[tuple[str, str], bool] = {}
            case_events: list[EventInput] = []
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
                if outcome.effects is not None:
                    await outcome.effects(session)
                if isinstance(outcome, Delivered):
                    case_events.extend(outcome.case_events)
                if not isinstance(outcome, Wait):
                    error = getattr(outcome, "error", None)
                    attempt_rows.append(
                        {
                            "delivery_id": delivery.id,
                            "attempt": delivery.attempts,
                            "worker": self.name,
                            "started_at": item.started_at,
                            "duration_ms": int(item.duration_s * 1000),
                            "status_code": outcome.status_code,
                            "outcome": ATTEMPT_OUTCOME[type(outcome)],
                            "error": error[:500] if error else None,
                        }
                    )
                key = (item.config.kind, item.config.name)
                if isinstance(outcome, Delivered | NeedsReview) or (
                    isinstance(outcome, Rejected) and outcome.status_code is not None
                ):
                    answered[key] = answered.get(key, False) or isinstance(outcome, Delivered)
                elif isinstance(outcome, Failed):
                    self._clean_targets.discard(key)
                done.append((item, label, values))
            workflow = self.runtime.profiles.current.workflow
            if case_events and workflow is not None:
                await record_events(session, workflow, case_events)
            await repo.update_rows(session, rows)
            await repo.add_attempts(session, attempt_rows)
            for (kind, target), delivered in answered.items():
                # The target answered: close its circuit. Skipped while this worker knows it
                # is closed and wrote a success in the last second (the hot path).
                key = (kind, target)
                last = self._success_written.get(key, 0.0)
                if key in self._clean_targets and time.monotonic() - last < 1.0:
                    continue
                await repo.target_succeeded(
                    session, kind=kind, target=target, now=now, delivered=delivered
                )
                self._success_written[key] = time.monotonic()
                self._clean_targets.add(key)
            await session.commit()
        return done

    async def _values(
        self, session: Any, item: _Finished, now: datetime
    ) -> tuple[dict[str, Any], str]:
        """The row's new values and the metric label of an outcome."""
        outcome = item.outcome
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
        assert isinstance(outcome, Wait)
        return {
            "status": DeliveryStatus.PENDING,
            "available_at": now + timedelta(seconds=max(0.0, outcome.wait_s)),
            "attempts": max(0, item.delivery.attempts - 1),
            "last_error": outcome.error[:500],
        }, "waiting"

    def _report(self, item: _Finished, label: str, values: dict[str, Any]) -> None:
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
        if isinstance(outcome, Delivered):
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
            assert isinstance(outcome, Wait)
            log.info(
                "delivery.waiting",
                reason=outcome.reason,
                wait_s=round(outcome.wait_s, 3),
                **fields,
            )

    async def _failed(
        self,
        session: Any,
        config: TargetConfig,
        delivery: Delivery,
        outcome: Failed,
        now: datetime,
    ) -> tuple[dict[str, Any], str]:
        """Row values for a transient failure, after counting it against the circuit."""
        throttle = outcome.retry_after_s if outcome.status_code in THROTTLING_STATUS else None
        failure = await repo.target_failed(
            session,
            kind=config.kind,
            target=config.name,
            now=now,
            policy=config.circuit,
            error=outcome.error,
            throttle_s=throttle,
        )
        started = max(delivery.created_at, delivery.replayed_at or delivery.created_at)
        decision = next_retry(
            attempts=delivery.attempts,
            created_at=started,
            now=now,
            policy=config.retry,
            retry_after_s=outcome.retry_after_s,
        )
        # The EHR is down (the circuit is open, and this was not the half-open trial):
        # the row waits for it and is not dead-lettered.
        held = failure.circuit == "open" and failure.before != "half_open"
        values: dict[str, Any] = {
            "last_error": outcome.error[:500],
            "last_status_code": outcome.status_code,
        }
        if decision.give_up and not held:
            values.update(status=DeliveryStatus.DEAD, dead_reason=decision.give_up)
            return values, "dead"
        # While the circuit is open nothing of the target is claimed: no need to push
        # the row past the probe; it goes as soon as the circuit closes.
        retry_at = decision.retry_at or now
        if failure.throttled_until is not None:
            retry_at = max(retry_at, failure.throttled_until)
        values.update(status=DeliveryStatus.PENDING, available_at=retry_at)
        return values, "transient"

    def _log_unexpected(self, event: str, exc: BaseException, **fields: Any) -> None:
        # The message of an unexpected exception may hold PHI: type and frames only.
        log_failure(log, event, exc, worker=self.name, **fields)

    async def aclose(self) -> None:
        """Close the senders' connections."""
        for sender in self.senders.values():
            await sender.aclose()
