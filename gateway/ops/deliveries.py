"""``/v1/ops/deliveries``: dead letters (and review items) for the on-call engineer.

* ``GET /v1/ops/deliveries?status=dead&target=&kind=&reason=`` (``ops:read``): the rows
  with their reason, attempts, last error and the peer's OperationOutcome, oldest first,
  paged by ``after_id``;
* ``GET /v1/ops/deliveries/{id}`` (``ops:read``): one row with its attempts;
* ``POST /v1/ops/deliveries/replay`` (``ops:admin``): back in the queue, by ``ids`` or by
  filter (at most 1000 per call; ``next_after_id`` pages through a larger replay).

Responses carry ids, statuses, errors and OperationOutcomes: never the resources.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, model_validator

from gateway.clients.service import Principal
from gateway.db.models import Delivery, DeliveryAttempt, DeliveryStatus
from gateway.db.types import utcnow
from gateway.delivery import ops_repository as repo
from gateway.delivery.service import MAX_REPLAY_BATCH, replay_deliveries
from gateway.deps import (
    MAX_ROW_ID,
    NO_NUL,
    RowIdPath,
    RowIdQuery,
    RuntimeDep,
    SessionDep,
    require_scope,
)
from gateway.errors import NotFoundError

router = APIRouter(prefix="/v1/ops", tags=["ops"])

StatusParam = Literal["dead", "review", "pending", "in_flight", "delivered"]


class AttemptOut(BaseModel):
    """One try of a delivery."""

    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    outcome: str
    error: str | None
    worker: str | None


class DeliveryOut(BaseModel):
    """A delivery as ops see it: ids, state and the peer's answer (no resources)."""

    id: int
    kind: str
    target: str
    status: str
    ordering_key: str
    message_id: str | None
    resource_refs: list[str]
    attempts: int = Field(
        description="Attempts counted toward the target's max_attempts since the delivery "
        "was created or last replayed (a replay starts again from 0; a try put back while "
        "the circuit was open is not counted). Every try is in attempt_log."
    )
    reason: str | None = Field(description="Why it is dead or in review.")
    last_error: str | None
    last_status_code: int | None
    operation_outcome: dict[str, Any] | None
    review: dict[str, Any] | None
    created_at: datetime
    available_at: datetime
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    replay_count: int
    replayed_at: datetime | None


class DeliveryDetailOut(DeliveryOut):
    """A delivery with its attempts."""

    tries: int = Field(description="Every try recorded (the length of attempt_log).")
    attempt_log: list[AttemptOut]


def delivery_detail(d: Delivery, attempts: list[DeliveryAttempt]) -> DeliveryDetailOut:
    """The API (and ``deliveries show``) view of a delivery with every try."""
    log = [_attempt_out(a) for a in attempts]
    return DeliveryDetailOut(**delivery_out(d).model_dump(), tries=len(log), attempt_log=log)


class DeliveryListOut(BaseModel):
    """A page of deliveries."""

    deliveries: list[DeliveryOut]
    total: int
    next_after_id: int | None = Field(description="Pass as after_id for the next page.")


class ReplayFilter(BaseModel):
    """Which deliveries a bulk replay selects (all fields that are set must match)."""

    status: list[Literal["dead", "review"]] = Field(
        default_factory=lambda: ["dead"]  # type: ignore[arg-type]
    )
    kind: str | None = Field(default=None, pattern=NO_NUL)
    target: str | None = Field(default=None, pattern=NO_NUL)
    reason: str | None = Field(default=None, pattern=NO_NUL)
    created_before: datetime | None = None
    created_after: datetime | None = None
    message_id: str | None = Field(default=None, pattern=NO_NUL)

    def to_filter(self) -> repo.DeliveryFilter:
        """The repository filter."""
        return repo.DeliveryFilter(
            statuses=tuple(self.status),
            kind=self.kind,
            target=self.target,
            reason=self.reason,
            created_before=self.created_before,
            created_after=self.created_after,
            message_id=self.message_id,
        )


class ReplayIn(BaseModel):
    """Replay by ``ids``, or by ``filter`` (one of the two)."""

    ids: list[Annotated[int, Field(ge=1, le=MAX_ROW_ID, strict=True)]] | None = Field(
        default=None, max_length=MAX_REPLAY_BATCH
    )
    filter: ReplayFilter | None = None
    # strict: a JSON true is not the number 1 (the OpenAPI document says integer)
    limit: int = Field(default=MAX_REPLAY_BATCH, ge=1, le=MAX_REPLAY_BATCH, strict=True)
    after_id: int | None = Field(default=None, ge=0, le=MAX_ROW_ID, strict=True)

    @model_validator(mode="after")
    def _one_selector(self) -> ReplayIn:
        if (self.ids is None) == (self.filter is None):
            raise ValueError("give either ids or filter")
        return self


class ReplayOut(BaseModel):
    """What a replay did."""

    matched: int
    replayed: int
    ids: list[int]
    next_after_id: int | None = Field(
        description="More rows may match: repeat with this after_id (filter replays)."
    )


def delivery_out(d: Delivery) -> DeliveryOut:
    """The API view of a delivery row."""
    return DeliveryOut(
        id=d.id,
        kind=d.kind,
        target=d.target,
        status=d.status,
        ordering_key=d.ordering_key,
        message_id=d.inbound_message_id,
        resource_refs=list(d.resource_refs or []),
        attempts=d.attempts,
        reason=d.dead_reason,
        last_error=d.last_error,
        last_status_code=d.last_status_code,
        operation_outcome=d.operation_outcome,
        review=d.review,
        created_at=d.created_at,
        available_at=d.available_at,
        first_attempt_at=d.first_attempt_at,
        last_attempt_at=d.last_attempt_at,
        delivered_at=d.delivered_at,
        replay_count=d.replay_count,
        replayed_at=d.replayed_at,
    )


def _attempt_out(a: DeliveryAttempt) -> AttemptOut:
    return AttemptOut(
        attempt=a.attempt,
        started_at=a.started_at,
        duration_ms=a.duration_ms,
        status_code=a.status_code,
        outcome=a.outcome,
        error=a.error,
        worker=a.worker,
    )


@router.get(
    "/deliveries",
    response_model=DeliveryListOut,
    summary="List deliveries by status (dead letters by default)",
)
async def list_deliveries(
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
    status: Annotated[list[StatusParam], Query()] = ["dead"],  # noqa: B006 - FastAPI query default
    target: str | None = None,
    kind: str | None = None,
    reason: str | None = None,
    message_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    after_id: RowIdQuery = None,
) -> DeliveryListOut:
    """Deliveries with the given status(es), oldest first, with reason, attempts, last
    error and the EHR's OperationOutcome."""
    where = repo.DeliveryFilter(
        statuses=tuple(DeliveryStatus(s) for s in status),
        kind=kind,
        target=target,
        reason=reason,
        message_id=message_id,
    )
    rows = await repo.list_deliveries(session, where=where, limit=limit + 1, after_id=after_id)
    page = rows[:limit]
    total = await repo.count_deliveries(session, where=where)
    return DeliveryListOut(
        deliveries=[delivery_out(d) for d in page],
        total=total,
        next_after_id=page[-1].id if len(rows) > limit else None,
    )


@router.get(
    "/deliveries/{delivery_id:int}",
    response_model=DeliveryDetailOut,
    summary="One delivery with its attempts",
)
async def get_delivery(
    delivery_id: RowIdPath,
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
) -> DeliveryDetailOut:
    """A delivery and every attempt (status codes, durations, errors)."""
    row = await repo.get_delivery(session, delivery_id)
    if row is None:
        raise NotFoundError("no such delivery")
    return delivery_detail(row, list(await repo.attempts_of(session, delivery_id)))


@router.post(
    "/deliveries/replay",
    response_model=ReplayOut,
    summary="Replay dead (or review) deliveries by id or by filter",
)
async def replay(
    body: ReplayIn,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> ReplayOut:
    """Put dead or review deliveries back in the queue with a fresh set of attempts.

    Safe because every write is idempotent (conditional creates, updates of known ids).
    Each replayed row is recorded in the audit log with the caller's name.
    """
    result = await replay_deliveries(
        session,
        actor=principal.name,
        now=utcnow(),
        profiles=runtime.profiles.current,
        ids=body.ids,
        where=body.filter.to_filter() if body.filter is not None else None,
        limit=body.limit,
        after_id=body.after_id,
    )
    worker = getattr(request.app.state, "worker", None)
    if worker is not None and result.replayed:
        worker.wake()
    more = body.filter is not None and result.matched == body.limit
    return ReplayOut(
        matched=result.matched,
        replayed=len(result.replayed),
        ids=result.replayed,
        next_after_id=result.last_matched_id if more else None,
    )
