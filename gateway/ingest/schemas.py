"""Response models of the ingest routes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class ResourceRef(BaseModel):
    """A resource the gateway wrote."""

    resourceType: str
    id: str
    reference: str


class IngestAccepted(BaseModel):
    """202 answer: what was created, the case, the deliveries, where to follow up."""

    submission_id: str | None = None
    checkout_id: str | None = None
    message_id: str
    status: str
    payment: Literal["paid", "deferred"] | None = Field(
        default=None,
        description="A checkout: paid, or deferred (nothing charged now: Stripe setup mode, "
        "a trial).",
    )
    warnings: list[dict[str, str]] = Field(
        default=[],
        description="Values accepted with a change ({location, code, message}, never the "
        "value), e.g. time_dropped: a time of day given with a birth date.",
    )
    patient: dict[str, str] | None = None
    resources: list[ResourceRef] = []
    conflicts: list[dict[str, Any]] = []
    case: dict[str, Any] | None = None
    deliveries: list[dict[str, Any]] = []
    status_url: str | None = None
    replayed: bool = False


class MessageStatusOut(BaseModel):
    """A message's processing status and its deliveries."""

    message_id: str
    channel: str
    external_id: str
    status: str
    received_at: datetime
    processed_at: datetime | None
    revision: int
    result: dict[str, Any] | None
    deliveries: list[dict[str, Any]]
