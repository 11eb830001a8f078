"""``POST /v1/hl7v2``: one HL7 v2 message (ER7) over HTTP, answered with its ACK."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import Response

from gateway.clients.service import Principal
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.errors import UnsupportedMediaTypeError
from gateway.events.after_response import apply_after_response
from gateway.hl7.service import CONTENT_TYPE, Hl7Credential, receive_hl7
from mappers.errors import Problem

router = APIRouter(prefix="/v1", tags=["hl7v2"])

#: Media types accepted for ER7 bodies (HAPI's HL7-over-HTTP uses the x- one).
ER7_MEDIA_TYPES = frozenset(
    {"application/hl7-v2", "x-application/hl7-v2+er7", "application/edi-hl7", "text/plain"}
)


def _er7_media_type(request: Request) -> str:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in ER7_MEDIA_TYPES:
        raise UnsupportedMediaTypeError(
            "send one HL7 v2 message in ER7 (Content-Type: application/hl7-v2)",
            [
                Problem(
                    "", "unsupported_media_type", f"accepted: {', '.join(sorted(ER7_MEDIA_TYPES))}"
                )
            ],
        )
    return media


@router.post(
    "/hl7v2",
    summary="One HL7 v2 message (ER7); the answer is its ACK",
    response_class=Response,
    responses={
        200: {
            # the ACK has the request's media type (text/plain asks get application/hl7-v2)
            "content": {
                media: {"schema": {"type": "string"}}
                for media in sorted(ER7_MEDIA_TYPES - {"text/plain"})
            },
            "description": "The ACK (AA, AE or AR) in ER7",
        },
        401: {},
        403: {},
        413: {},
        415: {},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "One HL7 v2 message in ER7 (segments separated by CR), MSH first",
            "content": {
                media: {"schema": {"type": "string", "pattern": "^MSH"}}
                for media in sorted(ER7_MEDIA_TYPES)
            },
        }
    },
)
async def post_hl7v2(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
    principal: Annotated[Principal, Depends(require_scope("hl7:write"))],
) -> Response:
    """Store the message and answer with an HL7 ACK (always HTTP 200 once authenticated):
    MSA-1 ``AA`` accepted (applied right after), ``AE`` stored but not mappable (kept in
    the exceptions queue), ``AR`` refused (unreadable, unknown sending facility,
    unsupported version or message type, MSH-10 reused, or a facility or application
    the API client is not bound to: ``clients create --partner``); MSA-2 echoes MSH-10
    and an ERR segment says why. The same message again gets the same answer and is
    applied once. The client is recorded as the principal of the message and its events.
    """
    media = _er7_media_type(request)
    raw = await request.body()
    credential = Hl7Credential(principal.label, principal.partners)
    reply = await receive_hl7(session, runtime, raw=raw, transport="http", credential=credential)
    background.add_task(apply_after_response, request, runtime, reply)
    return Response(
        reply.ack,
        media_type=f"{media if media != 'text/plain' else CONTENT_TYPE}; charset=utf-8",
        headers={"X-HL7-Ack-Code": reply.code},
    )
