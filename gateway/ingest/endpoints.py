"""``/v1`` ingest routes: intake submissions, canonical checkouts, Stripe webhooks,
and the status of a message."""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.clients.actor import Actor, set_actor
from gateway.clients.service import Principal
from gateway.db.models import Delivery
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.errors import NotFoundError, ServiceUnavailableError
from gateway.http import Outcome, document_body, request_content_type, run_guarded
from gateway.inbox import repository as inbox
from gateway.ingest import checkout, intake, stripe
from gateway.ingest.schemas import IngestAccepted, MessageStatusOut
from gateway.ingest.storage import IngestContext
from gateway.logging import get_logger
from gateway.runtime import Runtime
from gateway.workflow.scoping import message_visible
from mappers.checkout import CanonicalCheckout
from mappers.intake import IntakeSubmission

log = get_logger(__name__)
router = APIRouter(prefix="/v1", tags=["ingest"])


class _Submit(Protocol):
    async def __call__(
        self,
        session: AsyncSession,
        ctx: IngestContext,
        *,
        raw: bytes,
        content_type: str,
        actor: str,
    ) -> Outcome: ...


async def _submit(
    request: Request,
    session: AsyncSession,
    runtime: Runtime,
    principal: Principal,
    channel: str,
    submit: _Submit,
) -> Outcome:
    """Read the body, take one snapshot of the profiles, and run ``submit`` guarded
    (a refused payload is kept for review)."""
    raw = await request.body()
    ctx = IngestContext.of(runtime)
    content_type = request_content_type(request)
    return await run_guarded(
        request,
        session,
        runtime,
        channel=channel,
        sender=principal.name,
        raw=raw,
        call=lambda: submit(session, ctx, raw=raw, content_type=content_type, actor=principal.name),
    )


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
    outcome = await _submit(request, session, runtime, principal, "intake", intake.submit_intake)
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
    outcome = await _submit(
        request, session, runtime, principal, "checkout", checkout.submit_checkout
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
    stripe.verify_stripe_signature(
        raw,
        stripe_signature,
        secret=secret.get_secret_value(),
        tolerance=runtime.settings.stripe_tolerance,
    )
    peer = request.client.host if request.client is not None else None
    set_actor(Actor("client", stripe.CHANNEL, None, peer))  # the signature authenticated it
    ctx = IngestContext.of(runtime)
    content_type = request_content_type(request)
    # Verified: a signed body that is not a JSON object is refused and kept for review.
    outcome = await run_guarded(
        request,
        session,
        runtime,
        channel=stripe.CHANNEL,
        sender=stripe.CHANNEL,
        raw=raw,
        json_only=False,
        call=lambda: stripe.receive_stripe_event(session, ctx, raw=raw, content_type=content_type),
    )
    return JSONResponse(outcome.body, status_code=outcome.status_code)


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
    statuses only, no PHI). A client limited to programs sees only messages that reached
    a case of its programs."""
    message = await inbox.get_message(session, message_id)
    if message is not None and not await message_visible(session, principal, message_id):
        message = None
    if message is None:
        raise NotFoundError("no such message")
    patient = (message.response or {}).get("patient")
    reference = patient.get("reference") if isinstance(patient, dict) else None
    audit.record(
        session,
        action="read",
        entity_type="InboundMessage",
        entity_id=message.id,
        patient_id=reference.removeprefix("Patient/")
        if isinstance(reference, str) and reference.startswith("Patient/")
        else None,
    )
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
