"""Applying stored clinical events: the inbox side of the one queue.

A message in the inbox (:data:`gateway.events.service.INBOX`) is applied in three steps:

1. it is leased: by the process that stored it, in the insert
   (:func:`~gateway.events.service.lease_for_this_process`), or by a claim of the
   worker's inbox loop (a batch: ``UPDATE ... RETURNING`` over ``SELECT ... FOR UPDATE
   SKIP LOCKED``), or by id (an ops retry);
2. it is read again into clinical events with the current profiles (:func:`prepare`:
   pure mappers; the focus resources of an id-only notification are read from the EHR
   with the EHR clients the worker injects), holding no database connection;
3. each event's patient is matched and the event applied to its case, and the message
   marked applied, in one transaction (:func:`apply_prepared` flushes; the entry point
   commits), only while the lease is still this process's.

What cannot be parsed or applied is marked ``failed`` and lands in the exceptions queue
with the reason. What may work later goes back to the queue: an id-only notification in
a process without EHR clients (no attempt counted), an EHR that cannot be reached (with
the inbox's :data:`RETRY` policy, honouring ``Retry-After``; ``retries_exhausted`` in the
exceptions queue when it gives up), a transaction that lost a race for the same case
(the database refused it: the row lock, the case version or the event's unique key; due
again at once, where the duplicate is then a no-op).

:class:`EventApplier` holds what the entry points need (sessions, the profiles, the EHR
clients, the clock, the lease owner) and owns their transactions: ``apply_received``
(after the acknowledgement), ``process`` (an ops retry) and ``step`` (the worker's inbox
loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.db.bulk import BulkInserts
from gateway.db.models import ExceptionRecord, InboundMessage, MessageStatus
from gateway.db.uow import SessionFactory, unit_of_work
from gateway.ehr.errors import EhrConfigError, EhrUnavailableError
from gateway.ehr.factory import EhrClients
from gateway.events.prepare import FetchDeferredError, prepare
from gateway.events.service import INBOX, LEASE, Prepared
from gateway.inbox import repository as inbox
from gateway.logging import get_logger
from gateway.patients.matching import find_patient, record_conflicts
from gateway.queue import repository as queue
from gateway.queue.policy import next_retry
from gateway.runtime import Runtime
from gateway.subscribers.service import enqueue_case_webhook
from gateway.workflow.batch import record_events
from gateway.workflow.service import ChangeSink, EventInput, apply_event
from mappers.errors import Problem
from mappers.events import ClinicalEvent
from mappers.profiles import ProfileSet, RetryPolicy, WorkflowProfile

log = get_logger(__name__)

#: How a message that fails transiently (the EHR cannot be read) is retried: full-jitter
#: backoff from 2 s doubling to 5 minutes, at least ``Retry-After``; the 8th failed
#: attempt puts it in the exceptions queue (``retries_exhausted``).
RETRY = RetryPolicy(base_delay_s=2, max_delay_s=300, max_attempts=8, max_age_s=7 * 24 * 3600)
#: Most messages one step of the inbox loop claims.
BATCH = 100


class LeaseLostError(Exception):
    """Another process took the message over (its lease had expired) and applies it."""


# --------------------------------------------------------------------------- applying


async def apply_prepared(
    session: AsyncSession,
    message: InboundMessage,
    prepared: Prepared,
    *,
    workflow: WorkflowProfile,
    notify: ChangeSink,
    worker: str,
    now: datetime,
) -> str:
    """Match and apply the events of one message; record problems as exceptions; mark
    the message applied and end its lease (only if ``worker`` still holds it: else
    :class:`LeaseLostError`, and the caller rolls back).

    ``message`` only needs its id, channel, sender and response (it may be detached).
    Flushes; the caller commits.

    Returns:
        The message's new status (``processed``, ``failed`` or ``ignored``).
    """
    outcomes: list[dict[str, Any]] = []
    failed = False
    for event in prepared.events:
        one = await _match(session, message, event)
        if one is None:
            failed = True
            outcomes.append({"event_id": event.event_id, "outcome": "unmatched_patient"})
            continue
        result = await apply_event(session, workflow, notify=notify, event=one)
        failed = failed or result.outcome in ("rejected", "no_case")
        outcomes.append(
            {"event_id": event.event_id, "outcome": result.outcome, "case_id": result.case_id}
        )
    values = _finished(session, message, prepared, outcomes, failed=failed, now=now)
    marked = await queue.finish(session, INBOX, row_id=message.id, worker=worker, values=values)
    if not marked:
        raise LeaseLostError(message.id)
    await session.flush()
    return str(values["status"])


def _finished(
    session: AsyncSession,
    message: InboundMessage,
    prepared: Prepared,
    outcomes: list[dict[str, Any]],
    *,
    failed: bool,
    now: datetime,
) -> dict[str, Any]:
    """The inbox row's values once its events were applied (``outcomes``: one per event);
    the message's mapping problems go to the exceptions queue."""
    if prepared.problems:
        failed = True
        session.add(_exception(message, "unmappable_input", prepared.problems))
    status = (
        MessageStatus.FAILED
        if failed
        else (MessageStatus.PROCESSED if prepared.events else MessageStatus.IGNORED)
    )
    summary: dict[str, Any] = {
        "events": outcomes,
        "ignored": prepared.ignored,
        "problems": len(prepared.problems),
    }
    single = outcomes[0] if len(outcomes) == 1 else {}
    return {
        "status": status,
        "processed_at": now,
        "response": {
            **(message.response or {}),
            "status": str(status),
            "outcome": single.get("outcome"),
            "case_id": single.get("case_id"),
            "applied": summary,
        },
    }


async def _match(
    session: AsyncSession, message: InboundMessage, event: ClinicalEvent
) -> EventInput | None:
    """The event's patient matched (conflicts to the exceptions queue) and the event as
    the workflow takes it; None when no patient matches (an ``unmatched_patient``
    exception)."""
    match = await find_patient(session, event.patient)
    if match.patient_id is None:
        tried = "no patient matches; tried: " + "; ".join(match.tried)
        session.add(
            _exception(
                message, "unmatched_patient", [Problem("patient", "unmatched_patient", tried)]
            )
        )
        log.info("events.unmatched_patient", message_id=message.id, tried=len(match.tried))
        return None
    record_conflicts(
        session, match, channel=message.channel, sender=message.sender, message_id=message.id
    )
    return EventInput(
        source=event.source,
        sender=event.sender,
        event_id=event.event_id,
        type=event.type,
        detail=event.detail,
        occurred_at=event.occurred_at,
        patient_id=match.patient_id,
        program=event.program,
        case_id=event.case_id,
        message_id=message.id,
        channel=message.channel,
        reference=event.reference,
        principal=message.principal,
    )


async def apply_prepared_batch(
    session: AsyncSession,
    batch: list[tuple[InboundMessage, Prepared]],
    *,
    workflow: WorkflowProfile,
    notify: ChangeSink,
    now: datetime,
) -> None:
    """:func:`apply_prepared` for several messages at once, with the same results: each
    event's patient matched, then every event applied with
    :func:`~gateway.workflow.batch.record_events` (the batch's cases found and locked
    in one query, its duplicates in another, the history rows that only add to a case
    in one round trip; the others through ``apply_event``, in order), and every message
    marked in one statement.

    The caller holds and has locked (:func:`gateway.queue.repository.owned`) every
    message's lease. Flushes; the caller commits (or rolls back a savepoint and applies
    the messages one by one).
    """
    inputs: list[EventInput] = []
    plans: list[tuple[InboundMessage, Prepared, list[tuple[str, int | None]]]] = []
    for message, prepared in batch:
        plan: list[tuple[str, int | None]] = []
        for event in prepared.events:
            one = await _match(session, message, event)
            if one is not None:
                inputs.append(one)
            plan.append((event.event_id, len(inputs) - 1 if one is not None else None))
        plans.append((message, prepared, plan))
    results = await record_events(session, workflow, inputs, notify=notify)
    rows: list[dict[str, Any]] = []
    for message, prepared, plan in plans:
        outcomes: list[dict[str, Any]] = []
        failed = False
        for event_id, index in plan:
            if index is None:
                failed = True
                outcomes.append({"event_id": event_id, "outcome": "unmatched_patient"})
                continue
            result = results[index]
            failed = failed or result.outcome in ("rejected", "no_case")
            outcomes.append(
                {"event_id": event_id, "outcome": result.outcome, "case_id": result.case_id}
            )
        values = _finished(session, message, prepared, outcomes, failed=failed, now=now)
        rows.append({"id": message.id, "locked_by": None, "locked_until": None, **values})
    bulk = BulkInserts()
    await queue.write_rows(session, INBOX, rows, bulk=bulk)
    await bulk.flush(session)
    await session.flush()


def _exception(message: InboundMessage, kind: str, problems: list[Problem]) -> ExceptionRecord:
    """An exceptions-queue entry about ``message``."""
    return inbox.new_exception(
        kind=kind,
        channel=message.channel,
        sender=message.sender,
        message_id=message.id,
        problems=problems,
    )


# --------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class EventApplier:
    """The entry points that apply inbox messages; each owns its transactions.

    Attributes:
        sessions: write sessions (``runtime.write_session``).
        profiles: the current profile set (one snapshot per message).
        identifier_base: the gateway's identifier base (``GATEWAY_IDENTIFIER_BASE``).
        worker: the lease owner: this process (after the acknowledgement) or the loop.
        notify: told of each change of a case (the subscribers' outbox).
        clients: the EHR clients that read id-only focus resources (None: such a
            message is left for a process that has them, the worker).
        clock: the clock.
        batched: apply a claimed batch in one transaction, a savepoint per message (one
            commit per batch: PostgreSQL); else one transaction per message.
        concurrency: messages of a batch prepared at once (EHR reads).
    """

    sessions: SessionFactory
    profiles: Callable[[], ProfileSet]
    identifier_base: str
    worker: str
    notify: ChangeSink
    clients: EhrClients | None = None
    clock: Clock = SYSTEM_CLOCK
    batched: bool = False
    concurrency: int = 4

    @classmethod
    def for_runtime(
        cls,
        runtime: Runtime,
        *,
        clients: EhrClients | None = None,
        worker: str | None = None,
        clock: Clock | None = None,
        concurrency: int = 4,
    ) -> EventApplier:
        """An applier wired from ``runtime`` (the lease owner defaults to this process,
        the owner of the messages it stores; the clock to the runtime's)."""
        return cls(
            sessions=runtime.write_session,
            profiles=lambda: runtime.profiles.current,
            identifier_base=runtime.systems.base,
            worker=worker or runtime.instance_id,
            notify=enqueue_case_webhook,
            clients=clients,
            clock=clock or runtime.clock,
            batched=runtime.engine.dialect.name == "postgresql",
            concurrency=concurrency,
        )

    async def apply_received(
        self, message: InboundMessage, *, prepared: Prepared | None = None
    ) -> str:
        """Apply a message leased to :attr:`worker` (stored by this process, or claimed),
        with its events when already mapped (``prepared``).

        Never raises: an unexpected error marks the message failed with an exception
        entry.

        Returns:
            ``processed | failed | ignored`` (the new status), ``deferred`` (back in the
            queue: an EHR read, a retry) or ``skipped`` (another process holds it).
        """
        return await self._apply_received(message, prepared, self.profiles())

    async def _apply_received(
        self, message: InboundMessage, prepared: Prepared | None, profiles: ProfileSet
    ) -> str:
        """:meth:`apply_received` with one profile snapshot for mapping and applying."""
        try:
            if prepared is None:
                prepared = await self._prepare(message, profiles)
                if prepared is None:
                    return "deferred"
            return await self._apply_one(message, prepared, profiles.workflow_or_raise)
        except Exception as exc:
            await self._crashed(message, exc)
            return "failed"

    async def process(self, message_id: str) -> str:
        """Claim one stored message by id and apply it (an ops retry); never raises.

        Returns:
            As :meth:`apply_received`; ``skipped`` also when the message is not waiting,
            not due, or leased to another process.
        """
        now = self.clock.now()
        async with unit_of_work(self.sessions) as session:
            message = await queue.claim_one(
                session,
                INBOX,
                row_id=message_id,
                worker=self.worker,
                locked_until=now + LEASE,
                now=now,
            )
        if message is None:
            return "skipped"
        return await self.apply_received(message)

    async def step(self) -> int:
        """One step of the worker's inbox loop: claim up to :data:`BATCH` due messages
        (oldest first), prepare them (:attr:`concurrency` at once), apply them.

        Returns:
            How many messages were processed (deferred and skipped ones not counted).
        """
        now = self.clock.now()
        async with unit_of_work(self.sessions) as session:
            claimed = await queue.claim(
                session, INBOX, limit=BATCH, worker=self.worker, locked_until=now + LEASE, now=now
            )
        if not claimed:
            return 0
        profiles = self.profiles()  # one snapshot for the whole batch
        gate = asyncio.Semaphore(self.concurrency)

        async def prepare_one(message: InboundMessage) -> Prepared | None:
            async with gate:
                try:
                    return await self._prepare(message, profiles)
                except Exception as exc:
                    await self._crashed(message, exc)
                    return None

        prepared = await asyncio.gather(*(prepare_one(m) for m in claimed))
        ready = [(m, p) for m, p in zip(claimed, prepared, strict=True) if p is not None]
        done = 0
        if self.batched and len(ready) > 1:
            done, ready = await self._apply_batch(ready, profiles.workflow_or_raise)
        for message, one in ready:
            outcome = await self._apply_received(message, one, profiles)
            if outcome not in ("skipped", "deferred"):
                done += 1
        return done

    # ------------------------------------------------------------------ internals

    async def _crashed(self, message: InboundMessage, exc: Exception) -> None:
        """An unexpected error: logged by type (its message may hold PHI), the message
        failed with an exception entry."""
        log.error("events.process_failed", message_id=message.id, error_type=type(exc).__name__)
        await self._fail(
            message, "processing_error", "the event could not be applied; see the logs"
        )

    async def _prepare(self, message: InboundMessage, profiles: ProfileSet) -> Prepared | None:
        """:func:`prepare`; None when the message went back to the queue."""
        try:
            return await prepare(
                message,
                profiles=profiles,
                identifier_base=self.identifier_base,
                clients=self.clients,
            )
        except FetchDeferredError:  # for a process with EHR clients: the attempt is not spent
            await self._requeue(message, available_at=self.clock.now(), spent=False)
        except (EhrUnavailableError, EhrConfigError) as exc:
            log.info("events.fetch_failed", message_id=message.id, status_code=exc.status_code)
            await self._retry(
                message, error=str(exc)[:200], retry_after_s=exc.retry_after_s, at_once=False
            )
        return None

    async def _apply_one(
        self, message: InboundMessage, prepared: Prepared, workflow: WorkflowProfile
    ) -> str:
        try:
            # The lease is checked where the message is marked applied: a process that lost
            # it rolls back (no statement more on the hot path after the acknowledgement).
            async with unit_of_work(self.sessions) as session:
                return await self._apply(session, message, prepared, workflow)
        except LeaseLostError:
            return "skipped"
        except (StaleDataError, IntegrityError):
            # The database refused a race for the same case (its row lock or version, or
            # the event's unique key): the message goes back to the queue, due at once,
            # and is applied again on fresh state (a duplicate is then a no-op).
            log.info("events.apply_conflict", message_id=message.id, attempt=message.attempts)
            await self._retry(
                message, error="the case kept changing while the event was applied", at_once=True
            )
            return "deferred"

    async def _apply(
        self,
        session: AsyncSession,
        message: InboundMessage,
        prepared: Prepared,
        workflow: WorkflowProfile,
    ) -> str:
        return await apply_prepared(
            session,
            message,
            prepared,
            workflow=workflow,
            notify=self.notify,
            worker=self.worker,
            now=self.clock.now(),
        )

    async def _apply_batch(
        self, batch: list[tuple[InboundMessage, Prepared]], workflow: WorkflowProfile
    ) -> tuple[int, list[tuple[InboundMessage, Prepared]]]:
        """Apply a batch in one transaction: all together (:func:`apply_prepared_batch`)
        in a savepoint; if the database refuses that (a race for a case, an unexpected
        error), each message in a savepoint of its own. Returns how many were applied (or
        failed) and those to apply again alone."""
        done = 0
        again: list[tuple[InboundMessage, Prepared]] = []
        crashed: list[tuple[InboundMessage, Exception]] = []
        async with unit_of_work(self.sessions) as session:
            mine = await queue.owned(
                session, INBOX, ids=[m.id for m, _ in batch], worker=self.worker
            )
            batch = [(m, p) for m, p in batch if m.id in mine]
            try:
                async with session.begin_nested():
                    await apply_prepared_batch(
                        session, batch, workflow=workflow, notify=self.notify, now=self.clock.now()
                    )
                return len(batch), []
            except Exception as exc:  # each message alone below says which one, and why
                log.info(
                    "events.batch_one_by_one", messages=len(batch), error_type=type(exc).__name__
                )
            for message, prepared in batch:
                try:
                    async with session.begin_nested():
                        await self._apply(session, message, prepared, workflow)
                    done += 1
                except LeaseLostError:
                    continue
                except (StaleDataError, IntegrityError):
                    again.append((message, prepared))
                except Exception as exc:
                    crashed.append((message, exc))
        for message, error in crashed:  # failed after the batch's commit, each on its own
            await self._crashed(message, error)
        return done + len(crashed), again

    async def _retry(
        self,
        message: InboundMessage,
        *,
        error: str,
        retry_after_s: float | None = None,
        at_once: bool,
    ) -> None:
        """Back to the queue after a failed attempt (:data:`RETRY`; due now when
        ``at_once``), or failed for good when the policy gives up."""
        now = self.clock.now()
        decision = next_retry(
            attempts=message.attempts,
            created_at=message.received_at,
            now=now,
            policy=RETRY,
            retry_after_s=retry_after_s,
        )
        if decision.give_up:
            kind = "processing_error" if at_once else "retries_exhausted"
            text = error if at_once else f"gave up after {message.attempts} attempts: {error}"
            await self._fail(message, kind, text)
            return
        await self._requeue(
            message, available_at=now if at_once else (decision.retry_at or now), spent=True
        )

    async def _requeue(
        self, message: InboundMessage, *, available_at: datetime, spent: bool
    ) -> None:
        async with unit_of_work(self.sessions) as session:
            await queue.requeue(
                session,
                INBOX,
                row_id=message.id,
                worker=self.worker,
                available_at=available_at,
                spent=spent,
            )

    async def _fail(self, message: InboundMessage, code: str, reason: str) -> None:
        """Mark a message this process holds ``failed``, with an exceptions-queue entry
        (``processing_error``) saying why."""
        async with unit_of_work(self.sessions) as session:
            failed = await queue.finish(
                session,
                INBOX,
                row_id=message.id,
                worker=self.worker,
                values={"status": MessageStatus.FAILED, "processed_at": self.clock.now()},
            )
            if failed:
                session.add(_exception(message, "processing_error", [Problem("", code, reason)]))


async def apply_received(
    runtime: Runtime, message: InboundMessage, *, prepared: Prepared | None = None
) -> str:
    """Apply a message this process just stored and leased
    (:func:`~gateway.events.service.lease_for_this_process`), right after the
    acknowledgement, with the events mapped on receipt (``prepared``). Never raises;
    see :meth:`EventApplier.apply_received`."""
    return await EventApplier.for_runtime(runtime).apply_received(message, prepared=prepared)


async def process_safely(runtime: Runtime, message_id: str) -> str:
    """Claim and apply one stored message in this process (an ops retry). Never raises;
    see :meth:`EventApplier.process`."""
    return await EventApplier.for_runtime(runtime).process(message_id)
