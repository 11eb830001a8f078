"""``GET /v1/ops/targets`` (``ops:read``) and ``GET /metrics`` (Prometheus).

Per target: queue depth, oldest pending age, dead letters, circuit state, token state
(expires at, last refresh error) and last success; the same numbers as Prometheus gauges,
next to the counters and histograms of :mod:`gateway.metrics`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from gateway import metrics
from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.db.types import utcnow
from gateway.delivery import shadow
from gateway.delivery.service import (
    TargetHealth,
    metric_snapshots,
    pause_target,
    resume_target,
    target_health,
)
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.errors import NotFoundError
from gateway.logging import get_logger
from gateway.ops import guards
from gateway.runtime import Runtime

log = get_logger(__name__)

router = APIRouter(tags=["ops"])


class QueueOut(BaseModel):
    """A target's deliveries by state."""

    depth: int = Field(description="Pending plus in flight.")
    pending: int
    in_flight: int
    dead: int
    review: int
    oldest_pending_age_s: float = Field(description="Age of the oldest pending/in-flight.")


class CircuitOut(BaseModel):
    """The target's circuit breaker."""

    state: str = Field(description="closed | half_open | open")
    consecutive_failures: int
    opened_at: datetime | None
    next_probe_at: datetime | None
    throttled_until: datetime | None = Field(description="A Retry-After being honoured.")
    failure_rate: float = Field(
        description="Share of transient failures among the calls of the breaker's window (0..1)."
    )
    window_calls: float = Field(description="Calls the failure rate is measured over.")
    next_trial_at: datetime | None = Field(
        description="When deliveries may go again: the open circuit's next trial, or the "
        "end of a Retry-After pause."
    )
    reason: str | None = Field(description="Why the circuit is open or deliveries wait.")
    trials: dict[str, int] = Field(
        description="Half-open trial deliveries that succeeded and failed so far."
    )


class TokenOut(BaseModel):
    """The target's shared OAuth token (never the token itself)."""

    method: str
    state: str = Field(description="none | missing | valid | expired | unavailable | config_error")
    expires_at: datetime | None
    refreshed_at: datetime | None
    failures: int
    next_attempt_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    kid: str | None = Field(description="Key that signed the last client assertion.")


class GuardBreachOut(BaseModel):
    """A cutover guard over its threshold (issue 16)."""

    guard: str
    value: float
    threshold: float
    paused: bool = Field(description="The target's deliveries are paused by it.")
    breached_at: datetime


class TargetOut(BaseModel):
    """Health of one delivery target."""

    kind: str
    name: str
    configured: bool
    mode: str = Field(
        default="live", description="live, or shadow: compared with the EHR, nothing written."
    )
    shadow: dict[str, int] = Field(
        default_factory=dict,
        description="Shadow results by outcome (create, no_change, update).",
    )
    guard_breaches: list[GuardBreachOut] = Field(
        default_factory=list, description="Cutover guards over their thresholds now."
    )
    queue: QueueOut
    circuit: CircuitOut
    token: TokenOut | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_error: str | None
    paused: PauseOut | None = Field(
        default=None, description="Paused by a person: nothing is sent until resumed."
    )


class PauseOut(BaseModel):
    """A pause set by a person (``POST /v1/ops/targets/{kind}/{name}/pause``)."""

    paused_at: datetime
    paused_by: str | None
    reason: str | None


class PauseIn(BaseModel):
    """Why the target is paused (kept on the target and shown to ops; no PHI please)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500, pattern=r"^[^\x00]*\S[^\x00]*$")


def _target_out(h: TargetHealth) -> TargetOut:
    token = h.token
    return TargetOut(
        kind=h.kind,
        name=h.name,
        configured=h.configured,
        queue=QueueOut(
            depth=h.queue.depth,
            pending=h.queue.pending,
            in_flight=h.queue.in_flight,
            dead=h.queue.dead,
            review=h.queue.review,
            oldest_pending_age_s=round(h.oldest_pending_age_s, 3),
        ),
        circuit=CircuitOut(
            state=h.circuit,
            consecutive_failures=h.consecutive_failures,
            opened_at=h.opened_at,
            next_probe_at=h.next_probe_at,
            throttled_until=h.throttled_until,
            failure_rate=h.failure_rate,
            window_calls=h.window_calls,
            next_trial_at=h.next_trial_at,
            reason=h.circuit_reason,
            trials={"succeeded": h.trial_successes, "failed": h.trial_failures},
        ),
        token=TokenOut(
            method=token.method,
            state=token.state,
            expires_at=token.expires_at,
            refreshed_at=token.refreshed_at,
            failures=token.failures,
            next_attempt_at=token.next_attempt_at,
            last_error=token.last_error,
            last_error_at=token.last_error_at,
            kid=token.kid,
        )
        if token is not None
        else None,
        last_success_at=h.last_success_at,
        last_failure_at=h.last_failure_at,
        last_error=h.last_error,
        paused=PauseOut(paused_at=h.paused_at, paused_by=h.paused_by, reason=h.pause_reason)
        if h.paused_at is not None
        else None,
    )


@router.get(
    "/v1/ops/targets",
    response_model=list[TargetOut],
    summary="Delivery targets: queue, circuit breaker, token, last success",
)
async def list_targets(
    session: SessionDep,
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
) -> list[TargetOut]:
    """Every target with its queue depth, oldest pending age, circuit state, token state
    and last success."""
    profiles = runtime.profiles.current
    health = await target_health(session, profiles=profiles, now=utcnow())
    counts = await shadow.shadow_counts(session)
    breaches = await guards.open_breaches(session)
    out = []
    for h in health:
        target = _target_out(h)
        if h.kind == "ehr":
            profile = profiles.ehr.get(h.name)
            target.mode = profile.mode if profile is not None else "live"
            target.shadow = counts.get(h.name, {})
            target.guard_breaches = [
                GuardBreachOut(
                    guard=b.guard,
                    value=b.value,
                    threshold=b.threshold,
                    paused=b.paused,
                    breached_at=b.breached_at,
                )
                for b in breaches
                if b.target == h.name
            ]
        out.append(target)
    return out


TargetKind = Literal["ehr", "webhook"]
TargetName = Annotated[str, Path(max_length=128, pattern=r"^[^\x00/]+$")]


async def _one_target(session: SessionDep, runtime: Runtime, kind: str, name: str) -> TargetOut:
    health = await target_health(session, profiles=runtime.profiles.current, now=utcnow())
    return next(_target_out(h) for h in health if (h.kind, h.name) == (kind, name))


@router.post(
    "/v1/ops/targets/{kind}/{name}/pause",
    response_model=TargetOut,
    summary="Pause a target: nothing is sent to it until resumed",
    responses={404: {}},
)
async def pause(
    kind: TargetKind,
    name: TargetName,
    body: PauseIn,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> TargetOut:
    """Stop the workers claiming this target's deliveries (an EHR's maintenance window,
    a subscriber known broken): they stay pending with their attempts, and go when the
    target is resumed. Recorded in the audit trail. 404 for an unknown target."""
    await pause_target(
        session,
        profiles=runtime.profiles.current,
        kind=kind,
        target=name,
        by=principal.name,
        reason=body.reason,
        now=utcnow(),
    )
    return await _one_target(session, runtime, kind, name)


@router.post(
    "/v1/ops/targets/{kind}/{name}/resume",
    response_model=TargetOut,
    summary="Resume a paused target",
    responses={404: {}},
)
async def resume(
    kind: TargetKind,
    name: TargetName,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> TargetOut:
    """Let the workers send to the target again (a no-op when it is not paused).
    Recorded in the audit trail."""
    await resume_target(session, profiles=runtime.profiles.current, kind=kind, target=name)
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.wake()
    return await _one_target(session, runtime, kind, name)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition: this process's counters and histograms, and the queue and
    target gauges read from the database now. With ``GATEWAY_METRICS_AUTH=true`` it needs
    an API key with ``ops:read`` (Prometheus: ``authorization: {credentials_file: ...}``).

    Raises:
        UnauthorizedError, ForbiddenError: with ``GATEWAY_METRICS_AUTH``, no key or no
            ``ops:read``.
    """
    runtime: Runtime = request.app.state.runtime
    if runtime.settings.metrics_auth:
        await require_scope("ops:read")(request)
    now = utcnow()
    snapshots: list[metrics.TargetSnapshot] = []
    try:
        async with runtime.sessionmaker() as session:
            health = await target_health(session, profiles=runtime.profiles.current, now=now)
        snapshots = metric_snapshots(health, now)
    except Exception as exc:  # the database is down: still serve the process metrics
        log.warning("metrics.state_unavailable", error_type=type(exc).__name__)
    return Response(metrics.render(snapshots), media_type=metrics.CONTENT_TYPE)


class ShadowResultOut(BaseModel):
    """What a shadow delivery would have written for one resource."""

    id: int
    delivery_id: int | None
    message_id: str | None
    resource: str = Field(description="Our resource, Type/id.")
    identifier: str | None = Field(description="The business identifier searched, system|value.")
    outcome: str = Field(description="create | no_change | update")
    remote_id: str | None = Field(description="The EHR's resource found.")
    diff: list[dict[str, Any]] | None = Field(
        description="RFC 6902 JSON Patch from the EHR's resource to ours, over the elements "
        "we own (update only)."
    )
    recorded_at: datetime


@router.get(
    "/v1/ops/targets/{name}/shadow",
    response_model=list[ShadowResultOut],
    summary="What a target in shadow mode would have written (create / no change / update + diff)",
    responses={401: {}, 403: {}, 404: {}},
)
async def list_shadow_results(
    name: str,
    session: SessionDep,
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
    outcome: Annotated[Literal["create", "no_change", "update"] | None, Query()] = None,
    after: Annotated[int, Query(ge=0, description="Page: results after this id")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[ShadowResultOut]:
    """A target's shadow results, oldest first (``outcome=update`` lists the diffs). The
    diffs hold FHIR content: the read is audited.

    Raises:
        NotFoundError: no EHR target of that name.
    """
    if name not in runtime.profiles.current.ehr:
        raise NotFoundError("no such EHR target")
    rows = await shadow.list_results(
        session, target=name, outcome=outcome, after_id=after, limit=limit
    )
    audit.record(
        session,
        action="search",
        entity_type="ShadowResult",
        entity_id=name,
        detail={"outcome": outcome or "*", "results": str(len(rows))},
    )
    return [
        ShadowResultOut(
            id=r.id,
            delivery_id=r.delivery_id,
            message_id=r.message_id,
            resource=r.resource_ref,
            identifier=r.identifier,
            outcome=r.outcome,
            remote_id=r.remote_id,
            diff=r.diff,
            recorded_at=r.recorded_at,
        )
        for r in rows
    ]
