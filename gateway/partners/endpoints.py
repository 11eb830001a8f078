"""``POST /v1/partners/{partner}/webhooks``: JSON webhooks from provider networks and
pharmacies, each described by a profile in ``profiles/events/``."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import JSONResponse

from gateway.deps import RuntimeDep, SessionDep
from gateway.events.after_response import apply_after_response
from gateway.http import request_content_type, run_guarded
from gateway.partners import service

router = APIRouter(prefix="/v1", tags=["partners"])


@router.post(
    "/partners/{partner}/webhooks",
    status_code=202,
    summary="A partner's event webhook (signed; fields and statuses per its profile)",
    responses={202: {}, 400: {}, 401: {}, 404: {}, 413: {}, 415: {}, 422: {}, 503: {}},
)
async def partner_webhook(
    partner: str,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> JSONResponse:
    """Verify the signature (Standard Webhooks or HMAC-SHA256, per the partner's profile;
    401 when missing, wrong or stale), store the event and acknowledge with 202; it is
    applied to the patient's case right after. The same event id again is answered with
    the stored answer (``duplicate: true``) and not applied twice.
    """
    profile = service.webhook_partner(runtime, partner)
    raw = await request.body()
    service.verify_partner(profile, body=raw, headers=request.headers, secrets=runtime.secrets)
    content_type = request_content_type(request)
    outcome = await run_guarded(
        request,
        session,
        runtime,
        channel=service.CHANNEL,
        sender=partner,
        raw=raw,
        call=lambda: service.receive_partner_webhook(
            session, runtime, partner=profile, raw=raw, content_type=content_type
        ),
    )
    background.add_task(apply_after_response, request, runtime, outcome)
    return JSONResponse(outcome.body, status_code=outcome.status_code)
