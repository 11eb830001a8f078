"""``POST /v1/events``: canonical clinical events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import JSONResponse

from gateway.clients.service import Principal
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.events import service
from gateway.ingest.endpoints import _content_type, _run_guarded
from gateway.ingest.schemas import document_body
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
    content_type = _content_type(request)
    outcome = await _run_guarded(
        request,
        session,
        runtime,
        channel="events",
        sender=principal.name,
        raw=raw,
        call=lambda: service.receive_event(
            session, runtime, raw=raw, content_type=content_type, actor=principal.name
        ),
    )
    if outcome.message_id and not outcome.body.get("duplicate"):
        background.add_task(service.process_message_by_id, runtime, outcome.message_id)
    return JSONResponse(outcome.body, status_code=202)
