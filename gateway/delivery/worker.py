"""The delivery loop: claims due outbox rows and hands them to the sender of their kind.

Generic over kinds (:mod:`gateway.delivery.sender`): EHR deliveries and ops webhooks share
the claim, lease, concurrency, rate, circuit-breaker, retry, dead-letter and replay
machinery; only sending differs. It is one of the worker process's loops
(:mod:`gateway.queue.loop`; wired in :mod:`gateway.worker`).

The loop keeps up to ``concurrency`` deliveries in flight. Whenever slots are free it
claims for each target of each sender, skipping a target while its circuit is open (a
probe is started when due: one worker probes, the others wait), a ``Retry-After`` from
it has not passed, or its OAuth token is being backed off
(:func:`gateway.delivery.circuit.gate`), and claiming at most what the target's
``max_concurrent`` leaves (one while half-open). A heartbeat extends the leases of the
rows in flight; a killed worker's rows are claimed again when their lease runs out, and
idempotent writes make the second send harmless. Outcomes are written by
:class:`gateway.delivery.recording.OutcomeRecorder`, only for rows the worker still
holds.

The worker holds no database connection while it waits for a peer. Every time it reads
comes from its :class:`~gateway.clock.Clock`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import datetime, timedelta

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.db.models import Delivery
from gateway.db.uow import SessionFactory, unit_of_work
from gateway.delivery import circuit
from gateway.delivery import repository as repo
from gateway.delivery.recording import Finished, OnReached, OutcomeRecorder
from gateway.delivery.sender import Delivered, Failed, Sender, TargetConfig
from gateway.logging import get_logger, log_failure
from gateway.queue.loop import Heartbeat, wait_any

log = get_logger(__name__)

#: How long the list of targets is reused between claim rounds (seconds).
TARGETS_TTL_S = 1.0


class DeliveryWorker:
    """Delivers outbox rows, ``concurrency`` at a time (a :class:`~gateway.queue.loop.Loop`).

    Args:
        sessions: write sessions (``runtime.write_session``).
        senders: the sender per kind.
        name: this worker's lease owner name.
        concurrency: deliveries in flight at once in this process.
        lease: how long a claim holds a row (``GATEWAY_WORKER_LEASE``).
        poll: the wait between claim rounds when nothing happens.
        clock: the clock (tests pass a :class:`~gateway.clock.ManualClock`).
        on_reached: told which messages reached their targets, in the transaction that
            records them (the wiring records the cases' ``ehr_delivered`` events).
    """

    name = "deliveries"

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        senders: Mapping[str, Sender],
        name: str,
        concurrency: int = 4,
        lease: timedelta = timedelta(seconds=60),
        poll: timedelta = timedelta(milliseconds=500),
        clock: Clock = SYSTEM_CLOCK,
        on_reached: OnReached | None = None,
    ) -> None:
        self.worker = name
        self.concurrency = concurrency
        self.senders: dict[str, Sender] = dict(senders)
        self.clock = clock
        self._sessions = sessions
        self._lease = lease
        self._poll_s = poll.total_seconds()
        self._breakers = circuit.CircuitBreakers(clock)
        self._recorder = OutcomeRecorder(
            sessions=sessions,
            worker=name,
            clock=clock,
            breakers=self._breakers,
            on_reached=on_reached,
        )
        self.heartbeat = Heartbeat(
            repo.OUTBOX, sessions=sessions, worker=name, lease=lease, clock=clock
        )
        self._running: dict[int, asyncio.Task[None]] = {}
        self._pairs: list[tuple[Sender, TargetConfig]] | None = None
        self._pairs_until = 0.0
        self._sending = 0
        self._probing: dict[circuit.Key, asyncio.Task[None]] = {}
        self._known_targets: set[circuit.Key] = set()
        self._round = 0
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()

    def wake(self) -> None:
        """Look for work now instead of at the next poll (and read the targets again)."""
        self._pairs_until = 0.0
        self._wakeup.set()

    def _free_slots(self) -> int:
        """Deliveries this worker may claim now: ``concurrency`` requests in flight, and
        at most as many more outcomes waiting to be written."""
        return max(
            0,
            min(self.concurrency - self._sending, 2 * self.concurrency - len(self._running)),
        )

    @property
    def in_flight(self) -> int:
        """Deliveries this worker is sending right now."""
        return len(self._running)

    # ------------------------------------------------------------------ loops

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then let the deliveries in flight finish."""
        threshold = max(1, self.concurrency // 2)
        heartbeat = asyncio.create_task(self.heartbeat.run(stop))
        log.info("delivery.worker_started", worker=self.worker, concurrency=self.concurrency)
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
                # Woken by: stop, wake(), a delivery or probe that finished (a free slot,
                # or a patient's next delivery unblocked), or the poll interval.
                await wait_any(stop, self._wakeup, self._changed, timeout_s=self._poll_s)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self._settle()
            log.info("delivery.worker_stopped", worker=self.worker)

    async def _settle(self) -> None:
        pending = [*self._running.values(), *self._probing.values()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def run_once(self) -> int:
        """One claim round, then wait for everything it started (tests, benchmarks).

        Returns:
            How many deliveries were attempted.
        """
        claimed = await self._claim_round(self._free_slots(), fresh=True)
        await self._settle()
        return claimed

    # ------------------------------------------------------------------ claiming

    async def _targets(self, *, fresh: bool = False) -> list[tuple[Sender, TargetConfig]]:
        """Every sender's targets, read again at most every :data:`TARGETS_TTL_S` (the
        webhook sender reads its subscribers from the database) unless ``fresh``."""
        at = self.clock.monotonic()
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
        now = self.clock.now()
        self._round += 1
        start = self._round % len(pairs)
        probes: list[tuple[Sender, TargetConfig]] = []
        batches: list[tuple[Sender, TargetConfig, list[Delivery]]] = []
        new = [k for k in keys if k not in self._known_targets]
        async with unit_of_work(self._sessions) as session:
            if new:
                await circuit.ensure_target_states(session, new)
            gates = await circuit.target_gates(session, keys)
            for sender, config in pairs[start:] + pairs[:start]:
                if free <= 0:
                    break
                key = (config.kind, config.name)
                state, token = gates.get(key, (None, None))
                self._breakers.seen(key, state)
                opened = circuit.gate(
                    state,
                    token,
                    now=now,
                    max_concurrent=config.max_concurrent,
                    uses_token=config.uses_token,
                    trials=config.circuit.half_open_trials,
                )
                if opened.probe:
                    probes.append((sender, config))
                if not opened.claim:
                    continue
                claimed = await repo.claim_for_target(
                    session,
                    kind=config.kind,
                    target=config.name,
                    limit=free,
                    max_in_flight=opened.max_in_flight,
                    worker=self.worker,
                    lease=self._lease,
                    now=now,
                )
                if claimed:
                    batches.append((sender, config, claimed))
                    free -= len(claimed)
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
                self.heartbeat.hold(delivery.id)
                self._running[delivery.id] = asyncio.create_task(
                    self._process(sender, config, delivery)
                )
            started += len(claimed)
        return started

    async def _start_probe(self, sender: Sender, config: TargetConfig, now: datetime) -> None:
        key = (config.kind, config.name)
        if key in self._probing:
            return
        async with unit_of_work(self._sessions) as session:
            won = await circuit.take_probe(session, kind=config.kind, target=config.name, now=now)
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
            async with unit_of_work(self._sessions) as session:
                state = await circuit.record_probe(
                    session,
                    kind=config.kind,
                    target=config.name,
                    ok=ok,
                    now=self.clock.now(),
                    policy=config.circuit,
                )
            log.info(
                "delivery.circuit_probed",
                kind=config.kind,
                target=config.name,
                ok=ok,
                circuit=state,
            )
        except Exception as exc:
            self._log_unexpected("delivery.probe_failed", exc)
        finally:
            self._probing.pop(key, None)
            self._changed.set()

    # ------------------------------------------------------------------ delivering

    async def _process(self, sender: Sender, config: TargetConfig, delivery: Delivery) -> None:
        started_at = self.clock.now()
        t0 = self.clock.monotonic()
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
            duration_s = self.clock.monotonic() - t0
            await self._recorder.submit(Finished(config, delivery, outcome, started_at, duration_s))
        finally:
            if sending:
                self._sending -= 1
            self.heartbeat.drop(delivery.id)
            self._running.pop(delivery.id, None)
            self._changed.set()

    def _log_unexpected(self, event: str, exc: BaseException, **fields: object) -> None:
        # The message of an unexpected exception may hold PHI: type and frames only.
        log_failure(log, event, exc, worker=self.worker, **fields)

    async def aclose(self) -> None:
        """Close the senders' connections."""
        for sender in self.senders.values():
            await sender.aclose()
