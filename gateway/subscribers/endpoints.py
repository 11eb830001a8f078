"""``/v1/ops/subscribers``: ops-layer endpoints that receive signed case webhooks."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator
from sqlalchemy import select

from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.db.models import Subscriber
from gateway.deps import RowIdPath, RuntimeDep, SessionDep, require_scope
from gateway.egress import EgressRefusedError
from gateway.errors import ConflictError, NotFoundError, UnprocessableError
from gateway.subscribers.service import (
    SUBSCRIBABLE_TYPES,
    new_secret,
    rotate_secret,
    set_subscriber_active,
)
from mappers.errors import Problem
from mappers.profiles import RetryPolicy

router = APIRouter(prefix="/v1/ops", tags=["ops"])

_TYPES = set(SUBSCRIBABLE_TYPES)


#: An absolute http(s) URL of printable ASCII.
URL_PATTERN = r"^https?://[!-.0-~]+(/[!-~]*)?$"


class SubscriberIn(BaseModel):
    """A new subscriber. ``secret`` (``whsec_`` + base64 of 24 to 64 bytes) is generated
    when not given; ``event_types`` are ``case.opened``, ``case.state_changed``,
    ``case.overdue``, ``case.*``, ``exception.overdue`` (an exception past its SLA),
    ``exception.*`` or ``*``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", examples=["crm"])
    url: str = Field(
        max_length=2000,
        # an RFC 3986 URI is ASCII (an IDN host in its xn-- form); the same class of
        # characters in Python and in the ECMA-262 regexes of JSON Schema
        pattern=URL_PATTERN,
        examples=["https://crm.example.com/hooks/fhir-gateway"],
    )
    event_types: list[str] = Field(
        min_length=1,
        examples=[["case.state_changed"]],
        json_schema_extra={"items": {"type": "string", "enum": list[JsonValue](sorted(_TYPES))}},
    )
    secret: str | None = Field(
        default=None,
        max_length=200,
        # documented: whsec_ + base64 of 24 to 64 bytes (checked by the validator below)
        json_schema_extra={
            "pattern": (
                r"^whsec_(?:(?:[A-Za-z0-9+/]{4}){8,20}(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
                r"|(?:[A-Za-z0-9+/]{4}){21}(?:[A-Za-z0-9+/]{2}==)?)$"
            )
        },
    )
    retry: RetryPolicy | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(URL_PATTERN, value):
            raise ValueError("must be an absolute http(s) URL")
        return value

    @field_validator("event_types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - _TYPES)
        if unknown:
            raise ValueError(f"unknown event type(s); known: {', '.join(sorted(_TYPES))}")
        return sorted(set(value))

    @field_validator("secret")
    @classmethod
    def _standard_webhooks_secret(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("must be whsec_ followed by base64") from exc
        if not value.startswith("whsec_") or not 24 <= len(key) <= 64:
            raise ValueError("must be whsec_ followed by base64 of 24 to 64 bytes")
        return value


class SubscriberOut(BaseModel):
    """A subscriber (its secret is never shown again)."""

    id: int
    name: str
    url: str
    event_types: list[str]
    active: bool
    created_at: datetime
    retry: dict[str, Any] | None


def _out(row: Subscriber) -> SubscriberOut:
    return SubscriberOut(
        id=row.id,
        name=row.name,
        url=row.url,
        event_types=list(row.event_types),
        active=row.active,
        created_at=row.created_at,
        retry=row.retry,
    )


@router.post(
    "/subscribers",
    status_code=201,
    summary="Register a subscriber for signed case webhooks",
    responses={201: {}, 401: {}, 403: {}, 409: {}, 422: {}},
)
async def create_subscriber(
    body: SubscriberIn,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> JSONResponse:
    """Register a subscriber. The answer carries its Standard Webhooks ``secret`` (shown
    this once); every later case change of the types it asked for is POSTed to ``url``,
    signed, through the outbox (retries, backoff, dead letters), in order per case.

    ``url`` must be ``https`` without credentials, to an address the egress policy allows
    (``GATEWAY_EGRESS_ALLOWLIST``; docs/SECURITY.md, "Egress"): 422 ``egress_refused``
    otherwise. Each delivery checks the resolved address again when it connects."""
    try:
        runtime.egress.check_url(body.url)
    except EgressRefusedError as exc:
        raise UnprocessableError(
            "the subscriber URL is not allowed", [Problem("url", "egress_refused", str(exc))]
        ) from exc
    taken = await session.scalar(select(Subscriber.id).where(Subscriber.name == body.name))
    if taken is not None:
        raise ConflictError(
            "a subscriber with this name exists",
            [Problem("name", "duplicate", "choose another name")],
        )
    secret = body.secret or new_secret()
    row = Subscriber(
        name=body.name,
        url=body.url,
        secret=secret,
        event_types=body.event_types,
        active=True,
        retry=body.retry.model_dump() if body.retry else None,
    )
    session.add(row)
    await session.flush()
    audit.record(
        session,
        action="create",
        entity_type="Subscriber",
        entity_id=str(row.id),
        detail={"name": row.name, "event_types": ",".join(row.event_types)},
    )
    out = _out(row).model_dump(mode="json")
    return JSONResponse({**out, "secret": secret}, status_code=201)


@router.get("/subscribers", response_model=list[SubscriberOut], summary="Subscribers")
async def list_subscribers(
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
) -> list[SubscriberOut]:
    """Every subscriber, active or not (no secrets)."""
    rows = (await session.scalars(select(Subscriber).order_by(Subscriber.name))).all()
    return [_out(r) for r in rows]


@router.delete(
    "/subscribers/{subscriber_id}",
    status_code=204,
    summary="Deactivate a subscriber",
    responses={204: {}, 404: {}},
)
async def deactivate_subscriber(
    subscriber_id: RowIdPath,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> Response:
    """Stop sending to a subscriber; webhooks still queued for it are dead-lettered when
    their turn comes (replayable if it is activated again)."""
    row = await session.get(Subscriber, subscriber_id)
    if row is None:
        raise NotFoundError("no such subscriber")
    await set_subscriber_active(session, subscriber=row, active=False)
    return Response(status_code=204)


class RotatedOut(BaseModel):
    """A subscriber's new secret, shown this once."""

    id: int
    name: str
    secret: str


@router.post(
    "/subscribers/{subscriber_id}/rotate-secret",
    response_model=RotatedOut,
    summary="Give a subscriber a new signing secret",
    responses={404: {}},
)
async def rotate_subscriber_secret(
    subscriber_id: RowIdPath,
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> RotatedOut:
    """Replace the subscriber's Standard Webhooks secret with a new random one, returned
    this once: webhooks sent after this answer are signed with it (install it at the
    subscriber first if it cannot hold two). Recorded in the audit trail."""
    row = await session.get(Subscriber, subscriber_id)
    if row is None:
        raise NotFoundError("no such subscriber")
    secret = await rotate_secret(session, subscriber=row)
    return RotatedOut(id=row.id, name=row.name, secret=secret)
