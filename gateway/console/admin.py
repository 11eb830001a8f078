"""The console's configuration pages: EHR targets (health, pause and resume), ops
subscribers (add, disable, rotate the secret) and the loaded profiles."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.console.auth import (
    Staff,
    checked_form,
)
from gateway.console.common import (
    ADMIN,
    OPERATOR,
    reason_of,
    record_view,
    redirect_to,
    render_page,
    staff_of,
)
from gateway.db.models import (
    Subscriber,
)
from gateway.db.types import utcnow
from gateway.delivery.service import (
    pause_target,
    resume_target,
    target_health,
)
from gateway.deps import RowIdPath, RuntimeDep, SessionDep
from gateway.egress import EgressRefusedError
from gateway.errors import GatewayError
from gateway.profiles.service import questionnaires
from gateway.subscribers.service import (
    SUBSCRIBABLE_TYPES,
    new_secret,
    rotate_secret,
    set_subscriber_active,
)

router = APIRouter(prefix="/console", include_in_schema=False)

# --------------------------------------------------------------------------- targets


@router.get("/targets", response_class=HTMLResponse)
async def targets_page(request: Request, session: SessionDep, runtime: RuntimeDep) -> HTMLResponse:
    """Targets: health, circuit, token state, pause and resume."""
    staff = await staff_of(request, session, runtime)
    health = await target_health(session, profiles=runtime.profiles.current, now=utcnow())
    record_view(session, "targets")
    return render_page(request, "targets.html", staff, health=health)


@router.post("/targets/{kind}/{name}/{action}")
async def target_act(
    kind: str, name: str, action: str, request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Pause (with a reason) or resume a target (``operator``)."""
    staff = await staff_of(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    if kind not in ("ehr", "webhook") or action not in ("pause", "resume"):
        return redirect_to("/console/targets", error="no such action")
    try:
        if action == "pause":
            reason = reason_of(form)
            if not reason:
                return redirect_to("/console/targets", notice="reason-needed")
            await pause_target(
                session,
                profiles=runtime.profiles.current,
                kind=kind,
                target=name,
                by=staff.actor_name,
                reason=reason,
                now=utcnow(),
            )
        else:
            await resume_target(session, profiles=runtime.profiles.current, kind=kind, target=name)
            worker = getattr(request.app.state, "worker", None)
            if worker is not None:
                worker.wake()
    except GatewayError as exc:
        await session.rollback()
        return redirect_to("/console/targets", error=exc.detail)
    return redirect_to("/console/targets", notice="paused" if action == "pause" else "resumed")


# --------------------------------------------------------------------------- subscribers


async def _subscribers_response(
    request: Request,
    session: AsyncSession,
    staff: Staff,
    *,
    secret: tuple[str, str] | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    rows = list(await session.scalars(select(Subscriber).order_by(Subscriber.name)))
    return render_page(
        request,
        "subscribers.html",
        staff,
        status_code=status_code,
        rows=rows,
        types=list(SUBSCRIBABLE_TYPES),
        secret=secret,
        error=error,
    )


@router.get("/subscribers", response_class=HTMLResponse)
async def subscribers_page(
    request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """Subscribers: list, add, disable, rotate the secret (``admin`` to act)."""
    staff = await staff_of(request, session, runtime)
    record_view(session, "subscribers")
    return await _subscribers_response(request, session, staff)


_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_URL = re.compile(r"^https?://[!-.0-~]+(/[!-~]*)?$")


@router.post("/subscribers", response_class=HTMLResponse)
async def subscriber_add(
    request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """Add a subscriber; its secret is shown on the answer, once."""
    staff = await staff_of(request, session, runtime)
    form = await checked_form(request, staff, role=ADMIN)
    name = str(form.get("name") or "").strip()
    url = str(form.get("url") or "").strip()
    types = sorted({str(t) for t in form.getlist("event_types")} & set(SUBSCRIBABLE_TYPES))
    problem = None
    if not _NAME.match(name):
        problem = "The name is 1 to 64 of a-z 0-9 _ - (starting a-z or 0-9)."
    elif not _URL.match(url) or len(url) > 2000:
        problem = "The URL must be an absolute http(s) URL."
    elif not types:
        problem = "Choose at least one event type."
    elif await session.scalar(select(Subscriber.id).where(Subscriber.name == name)):
        problem = "A subscriber with this name exists."
    else:
        try:
            runtime.egress.check_url(url)
        except EgressRefusedError as exc:
            problem = f"The URL is not allowed by the egress policy: {exc}"
    if problem:
        return await _subscribers_response(request, session, staff, error=problem, status_code=422)
    secret = new_secret()
    row = Subscriber(name=name, url=url, secret=secret, event_types=types, active=True)
    session.add(row)
    await session.flush()
    audit.record(
        session,
        action="create",
        entity_type="Subscriber",
        entity_id=str(row.id),
        detail={"name": name, "event_types": ",".join(types)},
    )
    return await _subscribers_response(request, session, staff, secret=(name, secret))


@router.post("/subscribers/{subscriber_id}/{action}", response_model=None)
async def subscriber_act(
    subscriber_id: RowIdPath,
    action: str,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    """Disable, enable, or rotate the secret of a subscriber (shown once)."""
    staff = await staff_of(request, session, runtime)
    await checked_form(request, staff, role=ADMIN)
    row = await session.get(Subscriber, subscriber_id)
    if row is None or action not in ("disable", "enable", "rotate"):
        return redirect_to("/console/subscribers", error="no such subscriber or action")
    if action == "rotate":
        secret = await rotate_secret(session, subscriber=row)
        return await _subscribers_response(request, session, staff, secret=(row.name, secret))
    await set_subscriber_active(session, subscriber=row, active=action == "enable")
    return redirect_to(
        "/console/subscribers", notice="disabled" if action == "disable" else "enabled"
    )


# --------------------------------------------------------------------------- profiles


@router.get("/profiles", response_class=HTMLResponse)
async def profiles_page(request: Request, session: SessionDep, runtime: RuntimeDep) -> HTMLResponse:
    """The active profiles with their versions and hashes, the last reload and its
    problems, the published Questionnaires."""
    staff = await staff_of(request, session, runtime)
    current = runtime.profiles.current
    sources = sorted(current.sources.items())
    record_view(session, "profiles")
    return render_page(
        request,
        "profiles.html",
        staff,
        sources=sources,
        set_hash=current.content_hash,
        holder=runtime.profiles,
        questionnaires=questionnaires(current),
        workflow=current.workflow,
    )
