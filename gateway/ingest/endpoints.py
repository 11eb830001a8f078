"""``/v1`` ingest routes: intake submissions, canonical checkouts, Stripe webhooks,
and the status of a message."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import stripe
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.clients.service import Principal
from gateway.db.models import Delivery
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.errors import (
    BadRequestError,
    GatewayError,
    NotFoundError,
    ServiceUnavailableError,
)
from gateway.http import (
    Outcome,
    decode_json_object,
    document_body,
    record_refusal,
    request_content_type,
    require_json,
)
from gateway.inbox import repository as inbox
from gateway.ingest import service
from gateway.ingest.schemas import IngestAccepted, MessageStatusOut
from gateway.logging import get_logger
from gateway.runtime import Runtime
from mappers.checkout import CanonicalCheckout
from mappers.errors import Problem
from mappers.intake import IntakeSubmission

log = get_logger(__name__)
router = APIRouter(prefix="/v1", tags=["ingest"])


async def _run_guarded(
    request: Request,
    session: AsyncSession,
    runtime: Runtime,
    *,
    channel: str,
    sender: str | None,
    raw: bytes,
    call: Callable[[], Awaitable[Outcome]],
) -> Outcome:
    """Check the body is JSON and run an ingest call; keep a rejected payload (including a
    non-JSON one) for review; retry once on a unique-key race (two requests with the same
    submission or patient at the same moment)."""
    for attempt in (1, 2):
        try:
            require_json(request_content_type(request))
            return await call()
        except IntegrityError:
            await session.rollback()
            if attempt == 2:
                raise
            log.info("ingest.retry_after_conflict", channel=channel)
        except GatewayError as exc:
            await session.rollback()
            if exc.status in (400, 409, 413, 415, 422):
                await record_refusal(
                    runtime,
                    channel=channel,
                    sender=sender,
                    error=exc,
                    payload=raw,
                    content_type=request.headers.get("content-type"),
                )
            raise
    raise AssertionError("unreachable")


@router.post(
    "/intake-submissions",
    status_code=202,
    response_model=IngestAccepted,
    summary="Submit an intake (demographics, answers, consents)",
    openapi_extra=document_body(IntakeSubmission),
    responses={400: {}, 401: {}, 403: {}, 409: {}, 413: {}, 415: {}, 422: {}},
)
async def submit_intake(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("intake:write"))],
) -> JSONResponse:
    """Validate, normalize and map an intake to Patient + QuestionnaireResponse +
    Provenance, store them with one outbox row per EHR target, open or move the case.

    Idempotent on ``submission_id``: the same body again gets the same answer.
    """
    raw = await request.body()
    content_type = request_content_type(request)
    outcome = await _run_guarded(
        request,
        session,
        runtime,
        channel="intake",
        sender=principal.name,
        raw=raw,
        call=lambda: service.submit_intake(
            session, runtime, raw=raw, content_type=content_type, actor=principal.name
        ),
    )
    return JSONResponse(
        outcome.body,
        status_code=outcome.status_code,
        headers={"Location": outcome.body.get("status_url", "")},
    )


@router.post(
    "/checkouts",
    status_code=202,
    response_model=IngestAccepted,
    summary="Submit a completed checkout (canonical form for any payment processor)",
    openapi_extra=document_body(CanonicalCheckout),
    responses={400: {}, 401: {}, 403: {}, 413: {}, 415: {}, 422: {}},
)
async def submit_checkout(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("checkout:write"))],
) -> JSONResponse:
    """Map a paid checkout to Patient + MedicationRequest (draft proposal) + Provenance.

    Idempotent on ``checkout_id`` (per processor).
    """
    raw = await request.body()
    content_type = request_content_type(request)

    async def call() -> Outcome:
        data = decode_json_object(raw)
        raw_processor, raw_id = data.get("processor"), data.get("checkout_id")
        processor = raw_processor if isinstance(raw_processor, str) else "canonical"
        external_id = raw_id if isinstance(raw_id, str) else ""
        return await service.submit_checkout(
            session,
            runtime,
            data=data,
            raw=raw,
            content_type=content_type,
            channel="checkout",
            sender=processor,
            external_id=external_id,
            actor=principal.name,
        )

    outcome = await _run_guarded(
        request, session, runtime, channel="checkout", sender=principal.name, raw=raw, call=call
    )
    return JSONResponse(outcome.body, status_code=outcome.status_code)


@router.post(
    "/webhooks/stripe",
    summary="Stripe webhook endpoint (checkout.session.completed)",
    responses={200: {}, 400: {}, 413: {}, 503: {}},
)
async def stripe_webhook(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    stripe_signature: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Verify ``Stripe-Signature`` (HMAC-SHA256 over ``t.raw_body`` with the endpoint
    secret, 300 s tolerance, via ``stripe.WebhookSignature.verify_header``), store the event,
    and map ``checkout.session.completed`` / ``async_payment_succeeded``.

    A verified event is always acknowledged with 200 (Stripe retries non-2xx answers for
    up to three days and cannot fix its payload); an event that does not map is kept in
    the exceptions queue. Bad or stale signatures get 400.
    """
    secret = runtime.settings.stripe_webhook_secret
    if secret is None:
        raise ServiceUnavailableError(
            "Stripe webhooks are not configured (GATEWAY_STRIPE_WEBHOOK_SECRET)"
        )
    raw = await request.body()
    if not stripe_signature:
        raise BadRequestError(
            "missing Stripe-Signature header",
            [
                Problem(
                    "Stripe-Signature",
                    "missing_signature",
                    "the Stripe-Signature header is required",
                )
            ],
        )
    try:
        stripe.WebhookSignature.verify_header(
            raw,
            stripe_signature,
            secret.get_secret_value(),
            tolerance=int(runtime.settings.stripe_tolerance.total_seconds()),
        )
    except stripe.SignatureVerificationError as exc:
        log.info("stripe.bad_signature")
        raise BadRequestError(
            "the Stripe signature does not verify",
            [
                Problem(
                    "Stripe-Signature",
                    "invalid_signature",
                    "no v1 signature matches, or the timestamp is outside the tolerance",
                )
            ],
        ) from exc
    except ValueError as exc:  # not UTF-8: the signature is computed over text
        raise BadRequestError(
            "the body is not UTF-8", [Problem("", "invalid_encoding", "the event is not UTF-8")]
        ) from exc
    # Verified: map the exact JSON Stripe signed, not the SDK's object conversion of it
    # (which raises on a body that is not an event object). A signed body that is not a
    # JSON object is refused and kept for review.
    try:
        payload = decode_json_object(raw)
    except GatewayError as exc:
        await record_refusal(
            runtime,
            channel="stripe",
            sender="stripe",
            error=exc,
            payload=raw,
            content_type=request.headers.get("content-type"),
        )
        raise
    for attempt in (1, 2):
        try:
            outcome, _problems = await service.receive_stripe_event(
                session,
                runtime,
                event=payload,
                raw=raw,
                content_type=request.headers.get("content-type", "application/json"),
            )
            return JSONResponse(outcome.body, status_code=outcome.status_code)
        except IntegrityError:
            await session.rollback()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@router.get(
    "/messages/{message_id}",
    response_model=MessageStatusOut,
    summary="Status of an inbound message and its deliveries",
    responses={401: {}, 403: {}, 404: {}},
)
async def message_status(
    message_id: str,
    session: SessionDep,
    principal: Annotated[
        Principal,
        Depends(require_scope("intake:write", "checkout:write", "events:write", "ops:read")),
    ],
) -> MessageStatusOut:
    """Where a message is: processed or not, and each EHR delivery's status (ids and
    statuses only, no PHI)."""
    message = await inbox.get_message(session, message_id)
    if message is None:
        raise NotFoundError("no such message")
    deliveries = (
        await session.scalars(
            select(Delivery).where(Delivery.inbound_message_id == message_id).order_by(Delivery.id)
        )
    ).all()
    return MessageStatusOut(
        message_id=message.id,
        channel=message.channel,
        external_id=message.external_id,
        status=message.status,
        received_at=message.received_at,
        processed_at=message.processed_at,
        revision=message.revision,
        result=message.response,
        deliveries=[
            {
                "id": d.id,
                "target": d.target,
                "status": d.status,
                "attempts": d.attempts,
                "delivered_at": d.delivered_at,
                "last_error": d.last_error,
            }
            for d in deliveries
        ],
    )
