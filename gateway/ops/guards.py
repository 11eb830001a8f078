"""Cutover guards (issue 16): the rollback rules of an EHR target's cutover, decided
before launch day in its profile (``guards:``, :class:`mappers.profiles.ehr.CutoverGuards`)
and checked by the worker (:class:`GuardLoop`).

Each guard is a rate over the last ``window_s`` seconds of live traffic (imported
records, whose principal is ``import:<job>``, are history and do not count):

* ``paid_without_medication_request``: checkouts stored in the window, old enough to
  judge (at least ``medication_request_within_s`` ago), whose delivery to the target was
  not delivered (or, in shadow mode, shadowed) within ``medication_request_within_s`` of
  receipt, in percent; breached above ``max_paid_without_medication_request_pct``;
* ``exceptions_per_hour``: new exceptions-queue entries, scaled to an hour; breached
  above ``max_exceptions_per_hour``;
* ``intake_acceptance``: intake submissions accepted among accepted + refused, in
  percent; breached below ``min_intake_acceptance_pct``.

The two rates need at least ``min_samples`` records. A breach opens a
``guard_breaches`` row and alerts the ops subscribers (``target.guard_breached``, Standard
Webhooks through the outbox, as case webhooks); it shows on ``GET /v1/ops/targets``. With
``auto_pause`` the target's deliveries are paused (its ``throttled_until`` is kept
ahead of the next check) until the breach clears (``target.guard_cleared``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import (
    Delivery,
    DeliveryStatus,
    ExceptionRecord,
    GuardBreach,
    InboundMessage,
    MessageStatus,
)
from gateway.db.uow import SessionFactory, unit_of_work
from gateway.delivery.circuit import locked_state
from gateway.delivery.shadow import audit_target_modes
from gateway.logging import get_logger
from gateway.runtime import Runtime
from gateway.subscribers.service import enqueue_target_webhook
from mappers.profiles import ProfileSet
from mappers.profiles.ehr import CutoverGuards, EhrTargetProfile

log = get_logger(__name__)

CHECKOUT_CHANNELS = ("checkout", "stripe")


@dataclass(frozen=True)
class GuardValue:
    """One guard's measure now: ``value`` against ``threshold``; ``breached`` when over
    (under, for a minimum); ``value`` None when there are too few samples to judge."""

    guard: str
    value: float | None
    threshold: float
    breached: bool


async def measure(
    session: AsyncSession, target: EhrTargetProfile, guards: CutoverGuards, *, now: datetime
) -> list[GuardValue]:
    """Each configured guard of ``target`` over its window, now."""
    since = now - timedelta(seconds=guards.window_s)
    live = or_(InboundMessage.principal.is_(None), ~InboundMessage.principal.like("import:%"))
    out: list[GuardValue] = []
    if guards.max_paid_without_medication_request_pct is not None:
        within = timedelta(seconds=guards.medication_request_within_s)
        judged = and_(
            InboundMessage.channel.in_(CHECKOUT_CHANNELS),
            InboundMessage.status == MessageStatus.PROCESSED,
            InboundMessage.received_at >= since,
            InboundMessage.received_at <= now - within,
            live,
        )
        total = int(
            await session.scalar(select(func.count()).select_from(InboundMessage).where(judged))
            or 0
        )
        rows = (
            await session.execute(
                select(InboundMessage.received_at, Delivery.delivered_at, Delivery.status)
                .join(Delivery, Delivery.inbound_message_id == InboundMessage.id)
                .where(
                    judged,
                    Delivery.target == target.name,
                    Delivery.kind == "ehr",
                    Delivery.status.in_([DeliveryStatus.DELIVERED, DeliveryStatus.SHADOWED]),
                )
            )
        ).all()
        in_time = sum(
            1
            for received, delivered, status in rows
            if status == DeliveryStatus.SHADOWED
            or (delivered is not None and delivered - received <= within)
        )
        threshold = guards.max_paid_without_medication_request_pct
        if total >= guards.min_samples:
            pct = 100.0 * (total - min(in_time, total)) / total
            out.append(
                GuardValue("paid_without_medication_request", pct, threshold, pct > threshold)
            )
        else:
            out.append(GuardValue("paid_without_medication_request", None, threshold, False))
    if guards.max_exceptions_per_hour is not None:
        count = int(
            await session.scalar(
                select(func.count())
                .select_from(ExceptionRecord)
                .where(ExceptionRecord.created_at >= since)
            )
            or 0
        )
        per_hour = count * 3600.0 / guards.window_s
        threshold = float(guards.max_exceptions_per_hour)
        out.append(GuardValue("exceptions_per_hour", per_hour, threshold, per_hour > threshold))
    if guards.min_intake_acceptance_pct is not None:
        accepted = int(
            await session.scalar(
                select(func.count())
                .select_from(InboundMessage)
                .where(
                    InboundMessage.channel == "intake",
                    InboundMessage.status == MessageStatus.PROCESSED,
                    InboundMessage.received_at >= since,
                    live,
                )
            )
            or 0
        )
        refused = int(
            await session.scalar(
                select(func.count())
                .select_from(ExceptionRecord)
                .where(
                    ExceptionRecord.channel == "intake",
                    ExceptionRecord.kind == "rejected_input",
                    ExceptionRecord.created_at >= since,
                )
            )
            or 0
        )
        threshold = guards.min_intake_acceptance_pct
        total = accepted + refused
        if total >= guards.min_samples:
            pct = 100.0 * accepted / total
            out.append(GuardValue("intake_acceptance", pct, threshold, pct < threshold))
        else:
            out.append(GuardValue("intake_acceptance", None, threshold, False))
    return out


async def open_breaches(session: AsyncSession) -> Sequence[GuardBreach]:
    """Every breach not cleared yet, oldest first."""
    return (
        await session.scalars(
            select(GuardBreach).where(GuardBreach.cleared_at.is_(None)).order_by(GuardBreach.id)
        )
    ).all()


async def evaluate(session: AsyncSession, profiles: ProfileSet, *, now: datetime) -> int:
    """Measure every guarded target's guards; open and alert new breaches, clear and
    announce those back within their thresholds, keep auto-paused targets paused.
    Flushes; the caller commits.

    Returns:
        How many breaches were opened or cleared.
    """
    changes = 0
    current = {(b.target, b.guard): b for b in await open_breaches(session)}
    for target in profiles.enabled_targets():
        guards = target.guards
        if guards is None:
            continue
        for value in await measure(session, target, guards, now=now):
            key = (target.name, value.guard)
            breach = current.get(key)
            if value.breached and breach is None:
                assert value.value is not None
                breach = GuardBreach(
                    target=target.name,
                    guard=value.guard,
                    value=value.value,
                    threshold=value.threshold,
                    paused=guards.auto_pause,
                    breached_at=now,
                )
                session.add(breach)
                current[key] = breach
                changes += 1
                await enqueue_target_webhook(
                    session,
                    "target.guard_breached",
                    target=target.name,
                    data={
                        "guard": value.guard,
                        "value": round(value.value, 3),
                        "threshold": value.threshold,
                        "window_s": guards.window_s,
                        "paused": guards.auto_pause,
                    },
                )
                log.warning(
                    "guards.breached",
                    target=target.name,
                    guard=value.guard,
                    paused=guards.auto_pause,
                )
            elif value.breached and breach is not None and value.value is not None:
                breach.value = value.value
            elif not value.breached and breach is not None and value.value is not None:
                breach.cleared_at = now
                del current[key]
                changes += 1
                await enqueue_target_webhook(
                    session,
                    "target.guard_cleared",
                    target=target.name,
                    data={
                        "guard": value.guard,
                        "value": round(value.value, 3),
                        "threshold": value.threshold,
                    },
                )
                log.info("guards.cleared", target=target.name, guard=value.guard)
        paused = any(b.paused for (t, _), b in current.items() if t == target.name)
        await _hold(session, target.name, paused=paused, now=now, guards=guards)
    await session.flush()
    return changes


async def _hold(
    session: AsyncSession, target: str, *, paused: bool, now: datetime, guards: CutoverGuards
) -> None:
    """Keep a paused target's deliveries from being claimed until after the next check
    (its ``throttled_until``, which every claim honours)."""
    if not paused:
        return
    until = now + timedelta(seconds=guards.check_every_s * 2)
    # the circuit's own row access: created if missing (a claim round may create it at
    # the same time), locked; and a longer hold already there (an EHR's 429
    # ``Retry-After``) is never shortened
    state = await locked_state(session, kind="ehr", target=target)
    if state.throttled_until is None or state.throttled_until < until:
        state.throttled_until = until


class GuardLoop:
    """The worker's ``cutover-guards`` loop step: records target mode changes in the
    audit trail, and evaluates the guards (at most every ``check_every_s`` of the
    shortest guarded target)."""

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        profiles: Callable[[], ProfileSet],
        now: Callable[[], datetime],
    ) -> None:
        self._sessions = sessions
        self._profiles = profiles
        self._now = now
        self._next_at: datetime | None = None
        self._audited: ProfileSet | None = None

    async def step(self) -> int:
        """One round; 0 (the loop waits its poll interval)."""
        now = self._now()
        profiles = self._profiles()
        audit_modes = profiles is not self._audited  # started, or reloaded
        intervals = [t.guards.check_every_s for t in profiles.enabled_targets() if t.guards]
        due = bool(intervals) and (self._next_at is None or now >= self._next_at)
        if not audit_modes and not due:
            return 0  # no transaction (on SQLite, no turn of the write lock) for nothing
        async with unit_of_work(self._sessions) as session:
            if audit_modes:
                await audit_target_modes(session, profiles)
            if due:
                await evaluate(session, profiles, now=now)
        self._audited = profiles
        if due:
            self._next_at = now + timedelta(seconds=min(intervals))
        return 0


async def record_target_modes(runtime: Runtime) -> None:
    """At start-up: record each EHR target's mode in the audit trail if it changed since
    last recorded (a profile edited while the gateway was stopped). A database that
    cannot be written yet (not migrated) is logged, not fatal: the worker records it."""
    try:
        async with unit_of_work(runtime.write_session) as session:
            await audit_target_modes(session, runtime.profiles.current)
    except SQLAlchemyError as exc:
        log.warning("guards.target_modes_not_recorded", error_type=type(exc).__name__)
