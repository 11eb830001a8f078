"""Stripe webhooks (``POST /v1/webhooks/stripe``): verified, stored once, and the checkout
events mapped like a canonical checkout (:mod:`.checkout`).

``Stripe-Signature`` is checked first (HMAC-SHA256 over ``t.raw_body`` with the endpoint
secret, via ``stripe.WebhookSignature.verify_header``;
https://docs.stripe.com/webhooks#verify-manually). A verified event is always
acknowledged with 200: Stripe retries other answers for up to three days and cannot fix
its payload. ``checkout.session.completed`` and ``async_payment_succeeded`` are mapped;
other types are recorded as ``ignored``; a checkout event that does not map is stored as
``failed`` and kept in the exceptions queue.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import stripe
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import MessageStatus
from gateway.errors import BadRequestError, UnprocessableError
from gateway.http import Outcome, decode_json_object
from gateway.inbox import repository as inbox
from gateway.ingest.checkout import handle_checkout, parse_checkout
from gateway.ingest.storage import IngestContext, claim_message, finish_message, replayed
from gateway.logging import get_logger
from mappers.errors import MappingErrors, Problem
from mappers.pipeline import checkout_payload

log = get_logger(__name__)

CHANNEL = "stripe"
#: The Stripe event types that carry a completed checkout.
STRIPE_CHECKOUT_EVENTS = frozenset(
    {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
)


def _timestamp(header: str) -> int | None:
    """``t`` of a ``Stripe-Signature`` header (Unix seconds; None without one)."""
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit() and len(value) < 20:
            return int(value)
    return None


def _invalid_signature() -> BadRequestError:
    return BadRequestError(
        "the Stripe signature does not verify",
        [
            Problem(
                "Stripe-Signature",
                "invalid_signature",
                "no v1 signature matches, or the timestamp is outside the tolerance",
            )
        ],
        header="Stripe-Signature",
    )


def verify_stripe_signature(
    raw: bytes, header: str | None, *, secret: str, tolerance: timedelta
) -> None:
    """Check ``Stripe-Signature`` over the exact body, and its timestamp (``t=``, Unix
    seconds) within ``tolerance`` of now in both directions: Stripe's library
    (``stripe.WebhookSignature.verify_header``) refuses only timestamps older than the
    tolerance; one further ahead than the tolerance (a signature made for later, or a
    clock far off) is refused here.

    Raises:
        BadRequestError: the header is missing (``missing_signature``), no ``v1``
            signature matches or the timestamp is outside ``tolerance``
            (``invalid_signature``), or the body is not UTF-8.
    """
    if not header:
        raise BadRequestError(
            "missing Stripe-Signature header",
            [
                Problem(
                    "Stripe-Signature",
                    "missing_signature",
                    "the Stripe-Signature header is required",
                )
            ],
            header="Stripe-Signature",
        )
    try:
        stripe.WebhookSignature.verify_header(
            raw, header, secret, tolerance=int(tolerance.total_seconds())
        )
    except stripe.SignatureVerificationError as exc:
        log.info("stripe.bad_signature")
        raise _invalid_signature() from exc
    except ValueError as exc:  # not UTF-8: the signature is computed over text
        raise BadRequestError(
            "the body is not UTF-8", [Problem("", "invalid_encoding", "the event is not UTF-8")]
        ) from exc
    timestamp = _timestamp(header)
    if timestamp is None or timestamp > time.time() + tolerance.total_seconds():
        log.info("stripe.bad_signature", reason="timestamp_ahead")
        raise _invalid_signature()


async def receive_stripe_event(
    session: AsyncSession,
    ctx: IngestContext,
    *,
    raw: bytes,
    content_type: str,
    refuse_unmappable: bool = False,
) -> Outcome:
    """Store and handle one verified Stripe event (flushes; the request commits).

    The exact JSON Stripe signed is mapped, not the SDK's object conversion of it (which
    raises on a body that is not an event object).

    Returns:
        200 with ``status``: ``accepted`` (mapped), ``awaiting_payment``, ``ignored`` (not
        a checkout event) or ``failed`` (kept in the exceptions queue); the stored answer
        with ``replayed`` for a copy.

    Args:
        refuse_unmappable: raise for a checkout event that does not map, storing nothing
            (a bulk import lists it as refused, to fix and import again), instead of
            keeping it ``failed`` in the exceptions queue (a live webhook: Stripe cannot
            fix it, so it is acknowledged).

    Raises:
        BadRequestError, UnprocessableError: the signed body is not a JSON object (or,
            with ``refuse_unmappable``, a checkout event that does not map).
    """
    event = decode_json_object(raw)
    event_id = str(event.get("id") or "")
    event_type = str(event.get("type") or "")
    message = inbox.new_message(
        channel=CHANNEL,
        sender=CHANNEL,
        external_id=event_id,
        body=raw,
        content_type=content_type,
        principal=ctx.principal("signature:stripe"),
    )
    answer: dict[str, Any] = {"received": True, "message_id": message.id, "event_type": event_type}
    if event_type not in STRIPE_CHECKOUT_EVENTS:
        # Stored whole, with its status and answer, in one statement.
        message.status = MessageStatus.IGNORED
        message.response = {**answer, "status": "ignored"}
        existing = await claim_message(session, message)
        if existing is not None:
            return replayed(existing, 200)
        log.info("stripe.ignored", message_id=message.id, event_type=event_type)
        return Outcome(200, message.response, message.id)
    existing = await claim_message(session, message)
    if existing is not None:
        return replayed(existing, 200)
    try:
        # A checkout that does not map leaves nothing of its mapping behind (keys,
        # conflicts), only the failed message and its exception.
        async with session.begin_nested():
            try:
                data = checkout_payload(event, ctx.profiles, kind="stripe")
            except MappingErrors as exc:
                raise UnprocessableError("the checkout is not valid", exc.problems) from exc
            checkout, plan_profile = parse_checkout(data, ctx)
            status, body = await handle_checkout(
                session,
                ctx,
                checkout=checkout,
                plan_profile=plan_profile,
                message=message,
                actor=CHANNEL,
            )
    except UnprocessableError as exc:
        if refuse_unmappable:
            raise
        session.add(
            inbox.new_exception(
                kind="unmappable_input",
                channel=CHANNEL,
                sender=CHANNEL,
                message_id=message.id,
                problems=exc.problems,
                payload=raw,
                content_type=content_type,
            )
        )
        await finish_message(
            session, message, status=MessageStatus.FAILED, response={**answer, "status": "failed"}
        )
        log.info("stripe.unmappable", message_id=message.id, problems=len(exc.problems))
        return Outcome(200, message.response or {}, message.id)
    body = {"received": True, "event_type": event_type, **body}
    await finish_message(session, message, status=status, response=body)
    return Outcome(200, body, message.id)
