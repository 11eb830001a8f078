"""``POST /v1/events`` (canonical clinical events), ``POST /v1/ehr/{target}/notifications``
(FHIR Subscription notifications) and ``GET /v1/ops/fhir-subscriptions``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select

from gateway.clients.service import Principal
from gateway.db.models import FhirSubscription
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.events import notifications, service
from gateway.events.after_response import apply_after_response
from gateway.http import document_body, request_content_type, run_guarded
from mappers.events import CanonicalEvent

router = APIRouter(prefix="/v1", tags=["events"])


@router.post(
    "/events",
    status_code=202,
    summary="Send a clinical event (provider assigned, decision, prescription sent...)",
    openapi_extra=document_body(CanonicalEvent),
    responses={400: {}, 401: {}, 403: {}, 413: {}, 415: {}, 422: {}},
)
async def post_event(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
    principal: Annotated[Principal, Depends(require_scope("events:write"))],
) -> JSONResponse:
    """Store the event durably and acknowledge (202); it is applied to the patient's case
    right after. Duplicates (same ``source`` + ``event_id``) are acknowledged and ignored.
    """
    raw = await request.body()
    content_type = request_content_type(request)
    outcome = await run_guarded(
        request,
        session,
        runtime,
        channel="events",
        sender=principal.name,
        raw=raw,
        call=lambda: service.receive_event(
            session,
            runtime,
            raw=raw,
            content_type=content_type,
            actor=principal.name,
            allowed_sources=principal.event_sources,
        ),
    )
    background.add_task(apply_after_response, request, runtime, outcome)
    return JSONResponse(outcome.body, status_code=202)


@router.post(
    "/ehr/{target}/notifications",
    summary="FHIR Subscription notification from an EHR (R5 Backport IG, R4 rest-hook)",
    responses={200: {}, 202: {}, 400: {}, 401: {}, 404: {}, 413: {}, 415: {}, 422: {}, 503: {}},
)
async def post_notification(
    target: str,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> JSONResponse:
    """Receive a notification Bundle (``history``, ``entry[0]`` the subscription status).

    The EHR authenticates with the header its Subscription's ``channel.header`` sets (the
    target profile's ``events.notifications``). ``handshake`` and ``heartbeat`` answer
    200; an ``event-notification`` is stored and answered 202, then its focus resources
    (in the Bundle for ``full-resource``, read from the EHR for ``id-only``) are mapped
    to clinical events with the target's table and applied. Missed events (event numbers
    that jump) are kept in the exceptions queue as ``events_gap``.
    """
    profile = notifications.notification_target(runtime, target)
    notifications.verify_sender(profile, request.headers, secrets=runtime.secrets)
    raw = await request.body()
    content_type = request_content_type(request)
    outcome = await run_guarded(
        request,
        session,
        runtime,
        channel=notifications.CHANNEL,
        sender=target,
        raw=raw,
        call=lambda: notifications.receive_notification(
            session, runtime, target=profile, raw=raw, content_type=content_type
        ),
    )
    background.add_task(apply_after_response, request, runtime, outcome)
    return JSONResponse(outcome.body, status_code=outcome.status_code)


@router.api_route(
    "/ehr/{target}/notifications/{resource_path:path}",
    methods=["POST", "PUT"],
    summary="Refused: a classic R4 rest-hook writing the resource to [endpoint]/Type/id",
    responses={404: {}, 422: {}},
    include_in_schema=False,
)
async def refuse_classic_rest_hook(target: str, resource_path: str, runtime: RuntimeDep) -> None:
    """A classic R4 rest-hook with a payload (HAPI FHIR's) writes the resource to
    ``[channel.endpoint]/Type/id`` (https://hl7.org/fhir/R4/subscription.html#2.46.7.1):
    it names no subscription event, so it is refused (nothing is read or stored) with a
    problem that says what to configure instead.

    Raises:
        NotFoundError: no EHR target with notifications by this name.
        UnprocessableError: always, otherwise.
    """
    notifications.notification_target(runtime, target)
    raise notifications.classic_rest_hook_error()


class FhirSubscriptionOut(BaseModel):
    """What the gateway knows of one EHR subscription."""

    target: str
    subscription: str
    topic: str | None
    status: str | None
    last_event_number: int
    missing: list[dict[str, Any]]
    handshake_at: datetime | None
    heartbeat_at: datetime | None
    last_notification_at: datetime | None


@router.get(
    "/ops/fhir-subscriptions",
    response_model=list[FhirSubscriptionOut],
    summary="EHR subscriptions: status, last event number, missed events",
)
async def list_fhir_subscriptions(
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
) -> list[FhirSubscriptionOut]:
    """Every subscription that has notified the gateway, with its open gaps."""
    rows = (
        await session.scalars(
            select(FhirSubscription).order_by(
                FhirSubscription.target, FhirSubscription.subscription
            )
        )
    ).all()
    return [
        FhirSubscriptionOut(
            target=r.target,
            subscription=r.subscription,
            topic=r.topic,
            status=r.status,
            last_event_number=r.last_event_number,
            missing=list(r.missing or []),
            handshake_at=r.handshake_at,
            heartbeat_at=r.heartbeat_at,
            last_notification_at=r.last_notification_at,
        )
        for r in rows
    ]
