"""Receiving FHIR Subscription notifications (R5 Backport IG, R4) from an EHR target.

``POST /v1/ehr/{target}/notifications`` takes the notification Bundle the EHR posts for a
rest-hook Subscription (https://hl7.org/fhir/uv/subscriptions-backport/STU1.1/channels.html):

1. the sender is verified: the header the Subscription's ``channel.header`` sets must equal
   the secret of the target's ``events.notifications`` (constant-time comparison);
2. the Bundle is parsed (``mappers.notifications``); a malformed one is refused (422) and
   kept in the exceptions queue;
3. the subscription's event numbers are tracked (``fhir_subscriptions``): events that
   never arrived (``events-since-subscription-start`` or the event numbers jump) become an
   ``events_gap`` exception, resolved by the gateway when they arrive late;
4. an ``event-notification`` is stored in the inbox (dedupe on subscription + event
   numbers) and acknowledged; it is applied after the response. ``handshake`` and
   ``heartbeat`` only update the subscription's state.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.bulk import insert_ignore
from gateway.db.models import ExceptionRecord, ExceptionStatus, FhirSubscription
from gateway.db.types import utcnow
from gateway.errors import (
    NotFoundError,
    ServiceUnavailableError,
    UnauthorizedError,
    UnprocessableError,
)
from gateway.events.service import Received, lease_for_this_process
from gateway.http import decode_json_object, store_if_new
from gateway.inbox import repository as inbox
from gateway.logging import get_logger
from gateway.runtime import Runtime
from gateway.secrets import SecretStore
from mappers.errors import MappingErrors, Problem
from mappers.notifications import (
    CONFIGURE_BACKPORT,
    Gap,
    Notification,
    parse_notification,
    track_event_numbers,
)
from mappers.profiles import EhrTargetProfile

log = get_logger(__name__)

CHANNEL = "fhir-notification"
#: At most this many open gaps are tracked per subscription (each is also an exception).
MAX_TRACKED_GAPS = 100


def notification_target(runtime: Runtime, name: str) -> EhrTargetProfile:
    """The EHR target ``name`` if it takes notifications.

    Raises:
        NotFoundError: no such target, or it has no ``events`` block.
    """
    target = runtime.profiles.current.ehr.get(name)
    if target is None or target.events is None:
        raise NotFoundError("no EHR target with notifications by this name")
    return target


def verify_sender(
    target: EhrTargetProfile, headers: Mapping[str, str], *, secrets: SecretStore
) -> None:
    """Check the notification's authentication header (``Subscription.channel.header``).

    Args:
        target: the EHR target (with an ``events`` block).
        headers: the request headers.
        secrets: where ``events.notifications.secret_env`` is looked up (environment,
            then the secret env file).

    Raises:
        ServiceUnavailableError: the secret's variable is not set.
        UnauthorizedError: the header is missing or wrong.
    """
    assert target.events is not None
    auth = target.events.notifications
    secret = secrets.get(auth.secret_env)
    if not secret:
        raise ServiceUnavailableError(
            f"notifications from this target are not configured ({auth.secret_env} is not set)"
        )
    given = headers.get(auth.header.lower(), "")
    if not hmac.compare_digest(given.encode(), (auth.prefix + secret).encode()):
        log.info("notifications.bad_credentials", target=target.name)
        raise UnauthorizedError(
            "the notification's credentials are missing or wrong",
            [
                Problem(
                    auth.header, "invalid_credentials", f"the {auth.header} header does not match"
                )
            ],
            header=auth.header,
        )


def classic_rest_hook_error(
    code: str = "classic_rest_hook", what: str = "a resource written to [endpoint]/Type/id"
) -> UnprocessableError:
    """The refusal of a classic R4 rest-hook notification (an empty ping, or the resource
    itself), which does not say which subscription event happened."""
    return UnprocessableError(
        "not a subscription notification",
        [
            Problem(
                "",
                code,
                f"{what} does not say which subscription event happened: "
                f"{CONFIGURE_BACKPORT}, and its endpoint as this URL",
            )
        ],
    )


async def _state(session: AsyncSession, target: str, subscription: str) -> FhirSubscription:
    """The subscription's tracking row, created on its first notification (``INSERT ... ON
    CONFLICT DO NOTHING``: two first notifications at once create one row), locked ``FOR
    UPDATE`` on PostgreSQL so notifications of one subscription are tracked in turn."""
    stmt = (
        select(FhirSubscription)
        .where(FhirSubscription.target == target, FhirSubscription.subscription == subscription)
        .execution_options(populate_existing=True)
    )
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = await session.scalar(stmt)
    if row is None:
        await session.execute(
            insert_ignore(session, FhirSubscription)
            .values(target=target, subscription=subscription, last_event_number=0, missing=[])
            .on_conflict_do_nothing()
        )
        row = await session.scalar(stmt)
    assert row is not None  # inserted above, or by a concurrent first notification
    return row


async def _track(
    session: AsyncSession, state: FhirSubscription, notification: Notification
) -> list[Gap]:
    update = track_event_numbers(
        last_seen=state.last_event_number,
        missing=[Gap(g["first"], g["last"], g.get("exception_id")) for g in state.missing or []],
        numbers=notification.event_numbers,
        events_since=notification.events_since,
    )
    recorded: dict[tuple[int, int], int] = {}
    for gap in update.new_gaps:
        count = gap.last - gap.first + 1
        record = inbox.new_exception(
            kind="events_gap",
            channel=CHANNEL,
            sender=state.target,
            problems=[
                Problem(
                    "events-since-subscription-start",
                    "events_gap",
                    f"{count} event(s) of {state.subscription} were not received "
                    f"(event numbers {gap.first}..{gap.last}); re-query the EHR or wait for them",
                )
            ],
        )
        session.add(record)
        await session.flush()
        log.warning(
            "notifications.gap",
            target=state.target,
            subscription=state.subscription,
            first=gap.first,
            last=gap.last,
            exception_id=record.id,
        )
        recorded[(gap.first, gap.last)] = record.id
    if update.resolved_exception_ids:
        rows = await session.scalars(
            select(ExceptionRecord).where(
                ExceptionRecord.id.in_(update.resolved_exception_ids),
                ExceptionRecord.status == ExceptionStatus.OPEN,
            )
        )
        for row in rows:
            row.status = ExceptionStatus.RESOLVED
            row.resolved_at = utcnow()
            row.resolved_by = "gateway"
            row.note = "the missing events arrived late"
            log.info("notifications.gap_filled", target=state.target, exception_id=row.id)
    state.last_event_number = update.last_seen
    missing = [
        Gap(g.first, g.last, g.exception_id or recorded.get((g.first, g.last)))
        for g in update.missing
    ]
    state.missing = [g.as_dict() for g in missing[-MAX_TRACKED_GAPS:]]
    return update.new_gaps


def _dedupe_id(notification: Notification, raw: bytes) -> str:
    numbers = ",".join(str(n) for n in sorted(notification.event_numbers))
    if numbers and len(numbers) <= 200:
        return f"{notification.subscription}#{numbers}"
    return f"{notification.subscription}#sha256:{hashlib.sha256(raw).hexdigest()}"


async def receive_notification(
    session: AsyncSession,
    runtime: Runtime,
    *,
    target: EhrTargetProfile,
    raw: bytes,
    content_type: str,
) -> Received:
    """Track and store one verified notification Bundle (flushes; the request commits).

    Returns:
        200 for handshake / heartbeat / query-status, 202 for an event notification
        (stored; ``duplicate`` when it was already received).

    Raises:
        BadRequestError, UnprocessableError: not JSON, or not a notification Bundle.
    """
    if not raw.strip():
        raise classic_rest_hook_error(
            "empty_notification", "an empty body (a classic R4 rest-hook ping)"
        )
    data = decode_json_object(raw)
    try:
        notification = parse_notification(data)
    except MappingErrors as exc:
        raise UnprocessableError(
            "the body is not a subscription notification", exc.problems
        ) from exc
    now = utcnow()
    state = await _state(session, target.name, notification.subscription)
    state.topic = notification.topic or state.topic
    if notification.status and notification.status != state.status:
        log.info(
            "notifications.subscription_status",
            target=target.name,
            subscription=notification.subscription,
            status=notification.status,
        )
        state.status = notification.status
    state.updated_at = now
    body: dict[str, object] = {
        "subscription": notification.subscription,
        "type": notification.type,
    }
    if notification.type == "handshake":
        state.handshake_at = now
        log.info(
            "notifications.handshake", target=target.name, subscription=notification.subscription
        )
        return Received(200, {**body, "status": "ok"})
    gaps = await _track(session, state, notification)
    body["gaps"] = [{"first": g.first, "last": g.last} for g in gaps]
    if notification.type != "event-notification" or not notification.events:
        state.heartbeat_at = now
        return Received(200, {**body, "status": "ok"})
    state.last_notification_at = now
    external_id = _dedupe_id(notification, raw)
    message = inbox.new_message(
        channel=CHANNEL,
        sender=target.name,
        external_id=external_id,
        body=raw,
        content_type=content_type,
        principal=f"ehr-header:{target.name}",
    )
    message.response = {
        "message_id": message.id,
        "status": "received",
        "events": len(notification.events),
        "status_url": f"{runtime.settings.public_base_url}/v1/messages/{message.id}",
    }
    leased = lease_for_this_process(runtime, message)
    existing = await store_if_new(session, message, alone=True)
    if existing is not None:
        return Received(202, {**(existing.response or {}), **body, "duplicate": True}, existing.id)
    log.info(
        "notifications.received",
        message_id=message.id,
        target=target.name,
        subscription=notification.subscription,
        events=len(notification.events),
    )
    return Received(
        202, {**message.response, **body}, message.id, message=message if leased else None
    )
