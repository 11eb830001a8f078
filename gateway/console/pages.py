"""The console's pages and forms (``/console``), server-rendered with Jinja2.

Every page needs a signed-in staff user (:mod:`gateway.console.auth`) and is recorded in
the audit trail (``view``; a case page as a ``read`` of the case, with its patient).
Every form posts its CSRF token; acting needs the ``operator`` role (subscribers:
``admin``). Actions call the services ``/v1`` calls, so both record the same audit
entries and case history: :mod:`gateway.triage.service` (exceptions),
:mod:`gateway.delivery.service` (replay, pause, resume, target health),
:mod:`gateway.workflow.override` (state override), :mod:`gateway.subscribers.service`.

After an action the browser is redirected (303) to the page it came from, with a
``notice`` code (never data) in the query. No PHI goes in a URL: pages are addressed by
opaque ids (case, exception, delivery).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, BackgroundTasks, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from sqlalchemy import and_, false, func, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.audit.refusals import record_refusal
from gateway.clients.actor import Actor, acting_as
from gateway.console import oidc
from gateway.console.auth import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    ConsoleForbiddenError,
    NotSignedInError,
    Staff,
    checked_form,
    clear_cookie,
    current_staff,
    new_login_token,
    peer_of,
    set_cookie,
    tokens_match,
)
from gateway.db.models import (
    Case,
    CaseEvent,
    Delivery,
    DeliveryStatus,
    ExceptionRecord,
    ExceptionStatus,
    FhirResource,
    StaffRole,
    Subscriber,
)
from gateway.db.types import utcnow
from gateway.delivery import ops_repository as delivery_repo
from gateway.delivery.service import (
    pause_target,
    replay_deliveries,
    resume_target,
    target_health,
)
from gateway.deps import RowIdPath, RuntimeDep, SessionDep
from gateway.egress import EgressRefusedError
from gateway.errors import GatewayError
from gateway.events.after_response import apply_after_response, apply_id_after_response
from gateway.ingest.remap import remap_message
from gateway.ingest.storage import IngestContext
from gateway.logging import get_logger
from gateway.patients import review as reviews
from gateway.profiles.service import questionnaires
from gateway.runtime import Runtime
from gateway.staff.service import authenticate, close_session, get_staff, open_session
from gateway.subscribers.service import (
    WEBHOOK_TYPES,
    new_secret,
    rotate_secret,
    set_subscriber_active,
)
from gateway.triage import reviews as decisions
from gateway.triage import service as triage
from gateway.workflow.override import override_state
from gateway.workflow.timers import exceptions_past_sla
from mappers.workflow import exception_due_at

log = get_logger(__name__)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/console", include_in_schema=False)

PAGE_SIZE = 50
OPERATOR = StaffRole.OPERATOR
ADMIN = StaffRole.ADMIN

#: What a ``notice`` code in the query says (codes only: no data in URLs).
NOTICES = {
    "signed-out": "You are signed out.",
    "assigned": "Assigned.",
    "resolved": "Resolved.",
    "retried": "Sent back to be applied again.",
    "replayed": "Back in the delivery queue.",
    "remapped": "Re-mapped with the current profiles and back in the delivery queue.",
    "overridden": "The case state was overridden.",
    "paused": "The target is paused: nothing is sent to it until resumed.",
    "resumed": "The target is resumed.",
    "disabled": "The subscriber is disabled.",
    "merged": "Merged: the changes go to the EHRs.",
    "not-same": "Recorded as different people; the pair is not proposed again.",
    "enabled": "The subscriber is enabled.",
    "nothing-selected": "Select at least one row first.",
    "reason-needed": "Give a reason.",
}


# --------------------------------------------------------------------------- rendering


def _when(value: datetime | None) -> Markup:
    """A time as ``<time>``: UTC text (replaced by the browser's local time by
    ``console.js``), the ISO 8601 instant in ``datetime`` and the tooltip."""
    if value is None:
        return Markup('<span class="muted">never</span>')
    iso = value.isoformat(timespec="seconds")
    text = value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{0}" title="{0}">{1}</time>').format(iso, text)


def _age(seconds: float | None) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {(s % 3600) // 60} min"
    return f"{s // 86400} d {(s % 86400) // 3600} h"


templates.env.filters["when"] = _when
templates.env.filters["age"] = _age
templates.env.globals["CSRF_FIELD"] = CSRF_FIELD


def _render(
    request: Request,
    name: str,
    staff: Staff | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    notice = request.query_params.get("notice")
    context.setdefault("notice", NOTICES.get(notice or ""))
    context.setdefault("error", (request.query_params.get("error") or "")[:300] or None)
    response = templates.TemplateResponse(
        request, name, {"staff": staff, "now": utcnow(), **context}, status_code=status_code
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _back(path: str, **query: str | int | None) -> RedirectResponse:
    params = {k: v for k, v in query.items() if v not in (None, "")}
    url = path + ("?" + urlencode(params) if params else "")
    return RedirectResponse(url, status_code=303)


def _viewed(session: AsyncSession, page: str, **detail: Any) -> None:
    audit.record(
        session,
        action="view",
        entity_type="ConsolePage",
        entity_id=page,
        detail={k: v for k, v in detail.items() if v not in (None, "")} or None,
    )


async def _staff(request: Request, session: AsyncSession, runtime: Runtime) -> Staff:
    return await current_staff(request, session, runtime)


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path only (no open redirect)."""
    if value and re.fullmatch(r"/console(/[A-Za-z0-9_./-]*)?", value) and ".." not in value:
        return value
    return "/console"


# --------------------------------------------------------------------------- sign-in


@router.get("/login", response_class=HTMLResponse)
async def login_page(
    request: Request, runtime: RuntimeDep, next: str | None = None
) -> HTMLResponse:
    """The sign-in form (with a double-submit CSRF token)."""
    token = new_login_token()
    response = _render(
        request,
        "login.html",
        None,
        login_token=token,
        next=_safe_next(next),
        sso=oidc.enabled(runtime),
    )
    set_cookie(response, request, runtime, LOGIN_CSRF_COOKIE, token)
    return response


def _oidc_transport(request: Request) -> Any:
    """The transport to the OpenID provider: a test's, or None (the egress policy's)."""
    return getattr(request.app.state, "console_oidc_transport", None)


def _login_failed(
    request: Request, runtime: Runtime, message: str, username: str | None = None
) -> HTMLResponse:
    token = new_login_token()
    response = _render(
        request,
        "login.html",
        None,
        status_code=401,
        login_token=token,
        next="/console",
        error=message,
        username=username,
        sso=oidc.enabled(runtime),
    )
    set_cookie(response, request, runtime, LOGIN_CSRF_COOKIE, token)
    return response


@router.get("/oidc/start", response_model=None)
async def oidc_start(request: Request, runtime: RuntimeDep) -> Response:
    """Send the browser to the OpenID provider (single sign-on), keeping the flow's
    state, nonce and code verifier in a short-lived cookie."""
    if not oidc.enabled(runtime):
        return _back("/console/login")
    try:
        url, flow = await oidc.start(runtime, transport=_oidc_transport(request))
    except oidc.OidcError as exc:
        log.warning("console.oidc_failed", step="start", why=str(exc))
        return _login_failed(request, runtime, f"Single sign-on is unavailable: {exc}.")
    response = RedirectResponse(url, status_code=303)
    set_cookie(response, request, runtime, oidc.FLOW_COOKIE, flow.cookie())
    return response


@router.get("/oidc/callback", response_model=None)
async def oidc_callback(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    code: Annotated[str, Query(max_length=2048)] = "",
    state: Annotated[str, Query(max_length=256)] = "",
) -> Response:
    """Back from the OpenID provider: verify, then open a session for the staff account
    the ID token names (it must exist and be active)."""
    flow = oidc.Flow.from_cookie(request.cookies.get(oidc.FLOW_COOKIE))
    peer = peer_of(request)
    username: str | None = None
    try:
        if flow is None or not code:
            raise oidc.OidcError("the sign-in expired or was not started here: start again")
        username = await oidc.finish(
            runtime, flow=flow, code=code, state=state, transport=_oidc_transport(request)
        )
    except oidc.OidcError as exc:
        log.warning("console.oidc_failed", step="callback", why=str(exc))
        audit.record(
            session,
            action="login-failed",
            entity_type="StaffUser",
            entity_id="-",
            outcome="4",
            detail={"method": "oidc"},
            actor=Actor("user", "staff:-", None, peer),
        )
        response = _login_failed(request, runtime, f"Single sign-on failed: {exc}.")
        clear_cookie(response, request, runtime, oidc.FLOW_COOKIE)
        return response
    user = await get_staff(session, username)
    if user is None or not user.active:
        audit.record(
            session,
            action="login-failed",
            entity_type="StaffUser",
            entity_id="-",
            outcome="4",
            detail={"method": "oidc"},
            actor=Actor("user", f"staff:{username[:64]}", None, peer),
        )
        response = _login_failed(
            request, runtime, "Your single sign-on account has no active staff account here."
        )
        clear_cookie(response, request, runtime, oidc.FLOW_COOKIE)
        return response
    cookie, _ = await open_session(
        session,
        user=user,
        now=utcnow(),
        address=peer,
        idle=runtime.settings.console_idle_timeout,
    )
    audit.record(
        session,
        action="login",
        entity_type="StaffUser",
        entity_id=str(user.id),
        detail={"method": "oidc"},
        actor=Actor("user", f"staff:{user.username}", None, peer),
    )
    redirect = RedirectResponse("/console", status_code=303)
    set_cookie(redirect, request, runtime, SESSION_COOKIE, cookie)
    clear_cookie(redirect, request, runtime, oidc.FLOW_COOKIE)
    return redirect


@router.post("/login", response_model=None)
async def login(
    request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse | RedirectResponse:
    """Check the username and password; open a session (a new cookie) and go on."""
    form = await request.form()
    if not tokens_match(request.cookies.get(LOGIN_CSRF_COOKIE), form.get(CSRF_FIELD)):
        raise ConsoleForbiddenError("the sign-in form expired or was not ours: reload it")
    username = str(form.get("username") or "").strip().lower()[:64]
    password = str(form.get("password") or "")
    user = await authenticate(session, username=username, password=password)
    peer = peer_of(request)
    if user is None:
        with acting_as(Actor("user", f"staff:{username or '-'}", None, peer)):
            audit.record(
                session, action="login-failed", entity_type="StaffUser", entity_id="-", outcome="4"
            )
        token = new_login_token()
        response = _render(
            request,
            "login.html",
            None,
            status_code=401,
            login_token=token,
            next=_safe_next(str(form.get("next") or "")),
            error="The username or password is not right, or the account is disabled.",
            username=username,
            sso=oidc.enabled(runtime),
        )
        set_cookie(response, request, runtime, LOGIN_CSRF_COOKIE, token)
        return response
    cookie, _ = await open_session(
        session,
        user=user,
        now=utcnow(),
        address=peer,
        idle=runtime.settings.console_idle_timeout,
    )
    with acting_as(Actor("user", f"staff:{user.username}", None, peer)):
        audit.record(session, action="login", entity_type="StaffUser", entity_id=str(user.id))
    redirect = RedirectResponse(_safe_next(str(form.get("next") or "")), status_code=303)
    set_cookie(redirect, request, runtime, SESSION_COOKIE, cookie)
    clear_cookie(redirect, request, runtime, LOGIN_CSRF_COOKIE)
    return redirect


@router.post("/logout")
async def logout(request: Request, session: SessionDep, runtime: RuntimeDep) -> Response:
    """End the session (CSRF-checked) and forget the cookie."""
    staff = await _staff(request, session, runtime)
    await checked_form(request, staff, role=StaffRole.VIEWER)
    await close_session(session, session_id=staff.session_id)
    audit.record(session, action="logout", entity_type="StaffUser", entity_id=staff.username)
    response = _back("/console/login", notice="signed-out")
    clear_cookie(response, request, runtime, SESSION_COOKIE)
    return response


# --------------------------------------------------------------------------- overview


@router.get("", response_class=HTMLResponse)
async def overview(request: Request, session: SessionDep, runtime: RuntimeDep) -> HTMLResponse:
    """Per target: queue, oldest pending, dead letters, circuit, token, pause and
    deliveries per minute; open exceptions by kind; cases past their SLA."""
    staff = await _staff(request, session, runtime)
    now = utcnow()
    health = await target_health(session, profiles=runtime.profiles.current, now=now)
    since = now - timedelta(minutes=5)
    rates = {
        (k, t): n / 5
        for k, t, n in await session.execute(
            select(Delivery.kind, Delivery.target, func.count())
            .where(Delivery.status == DeliveryStatus.DELIVERED, Delivery.delivered_at >= since)
            .group_by(Delivery.kind, Delivery.target)
        )
    }
    sparkline = await _hourly_deliveries(session, now=now)
    by_kind = [
        {"kind": kind, "count": count, "oldest": oldest}
        for kind, count, oldest in await session.execute(
            select(ExceptionRecord.kind, func.count(), func.min(ExceptionRecord.created_at))
            .where(ExceptionRecord.status == ExceptionStatus.OPEN)
            .group_by(ExceptionRecord.kind)
            .order_by(func.count().desc())
        )
    ]
    breaching = list(
        await session.scalars(
            select(Case).where(Case.sla_due_at <= now).order_by(Case.sla_due_at).limit(20)
        )
    )
    _viewed(session, "overview")
    return _render(
        request,
        "overview.html",
        staff,
        health=health,
        rates=rates,
        by_kind=by_kind,
        breaching=breaching,
        sparkline=sparkline,
        refresh_s=30,
    )


async def _hourly_deliveries(session: AsyncSession, *, now: datetime) -> dict[str, Any]:
    """Deliveries per hour over the last 24 hours (oldest first), as the bars of an SVG
    sparkline: ``{"counts", "total", "max", "bars": [(x, y, height, label)]}``."""
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    if session.get_bind().dialect.name == "postgresql":
        hour = func.to_char(func.timezone("UTC", Delivery.delivered_at), "YYYY-MM-DD HH24")
    else:
        hour = func.strftime("%Y-%m-%d %H", Delivery.delivered_at)
    found = {
        key: n
        for key, n in await session.execute(
            select(hour, func.count())
            .where(Delivery.status == DeliveryStatus.DELIVERED, Delivery.delivered_at >= start)
            .group_by(hour)
        )
    }
    hours = [start + timedelta(hours=i) for i in range(24)]
    counts = [int(found.get(h.strftime("%Y-%m-%d %H"), 0)) for h in hours]
    top = max(counts) or 1
    bars = []
    for i, (h, c) in enumerate(zip(hours, counts, strict=True)):
        height = max(1, round(38 * c / top))
        bars.append((i * 10, 40 - height, height, f"{h.strftime('%H:00')} UTC: {c}"))
    return {"counts": counts, "total": sum(counts), "max": max(counts), "bars": bars}


# --------------------------------------------------------------------------- exceptions


def _exception_filters(request: Request) -> dict[str, str]:
    keys = ("status", "kind", "sender", "owner", "older_than_h", "sla")
    return {k: request.query_params.get(k, "") for k in keys}


@router.get("/exceptions", response_class=HTMLResponse)
async def exceptions_page(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    before_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> HTMLResponse:
    """The exceptions queue: filters, owners, single and bulk actions, newest first,
    paged by cursor (``before_id``)."""
    staff = await _staff(request, session, runtime)
    f = _exception_filters(request)
    status = f["status"] or ExceptionStatus.OPEN
    stmt = select(ExceptionRecord).order_by(ExceptionRecord.id.desc()).limit(PAGE_SIZE + 1)
    if status != "all":
        stmt = stmt.where(ExceptionRecord.status == status)
    if f["kind"]:
        stmt = stmt.where(ExceptionRecord.kind == f["kind"])
    if f["sender"]:
        stmt = stmt.where(ExceptionRecord.sender == f["sender"])
    owner = f["owner"]
    if owner == "me":
        stmt = stmt.where(ExceptionRecord.assigned_to == staff.username)
    elif owner == "-":
        stmt = stmt.where(ExceptionRecord.assigned_to.is_(None))
    elif owner:
        stmt = stmt.where(ExceptionRecord.assigned_to == owner)
    if f["older_than_h"].isdigit():
        stmt = stmt.where(
            ExceptionRecord.created_at <= utcnow() - timedelta(hours=int(f["older_than_h"]))
        )
    workflow = runtime.profiles.current.workflow_or_raise
    now = utcnow()
    if f["sla"] in ("overdue", "ok"):
        late = exceptions_past_sla(workflow, now=now)
        if late is None:
            stmt = stmt.where(false()) if f["sla"] == "overdue" else stmt
        else:
            stmt = stmt.where(late if f["sla"] == "overdue" else not_(late))
    if before_id is not None:
        stmt = stmt.where(ExceptionRecord.id < before_id)
    rows = list(await session.scalars(stmt))
    page, more = rows[:PAGE_SIZE], len(rows) > PAGE_SIZE
    due = {r.id: exception_due_at(workflow, kind=r.kind, created_at=r.created_at) for r in page}
    channels = await triage.message_channels(session, page)
    kinds = list(await session.scalars(select(ExceptionRecord.kind).distinct()))
    _viewed(session, "exceptions", **f)
    next_query = (
        urlencode({**{k: v for k, v in f.items() if v}, "before_id": page[-1].id})
        if (more and page)
        else None
    )
    return _render(
        request,
        "exceptions.html",
        staff,
        rows=page,
        retryable={
            r.id: triage.retryable(r, channels.get(r.inbound_message_id or "")) for r in page
        },
        filters={**f, "status": status},
        due=due,
        kinds=sorted(kinds),
        next_query=next_query,
    )


@router.get("/exceptions/{exception_id}", response_class=HTMLResponse)
async def exception_page(
    exception_id: RowIdPath, request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """One exception: its problems (codes and fields, never values), owner and actions."""
    staff = await _staff(request, session, runtime)
    row = await triage.get_exception_or_raise(session, exception_id)
    channels = await triage.message_channels(session, [row])
    audit.record(
        session,
        action="view",
        entity_type="Exception",
        entity_id=str(row.id),
        patient_id=await triage.patient_of(session, row),
    )
    workflow = runtime.profiles.current.workflow_or_raise
    return _render(
        request,
        "exception.html",
        staff,
        row=row,
        due_at=exception_due_at(workflow, kind=row.kind, created_at=row.created_at),
        retryable=triage.retryable(row, channels.get(row.inbound_message_id or "")),
    )


def _reason(form: Any) -> str:
    return str(form.get("reason") or "").strip()[:1000]


def _ids(form: Any) -> list[int]:
    out = []
    for value in form.getlist("ids"):
        if str(value).isdigit() and 0 < int(value) < 2**63:
            out.append(int(value))
    return out[:500]


async def _act_on_exceptions(
    request: Request,
    session: AsyncSession,
    runtime: Runtime,
    background: BackgroundTasks,
    staff: Staff,
    *,
    ids: Sequence[int],
    action: str,
    reason: str,
    assignee: str | None,
) -> None:
    now = utcnow()
    for exception_id in ids:
        row = await triage.get_exception_or_raise(session, exception_id)
        if action == "assign":
            await triage.assign_exception(session, row, assignee=assignee, now=now)
        elif action == "resolve":
            await triage.resolve_exception(session, row, by=staff.actor_name, note=reason, now=now)
        elif action == "retry":
            result = await triage.retry_exception(
                session, runtime, row, by=staff.actor_name, note=reason, now=now
            )
            if result.reply is not None:
                background.add_task(apply_after_response, request, runtime, result.reply)
            elif result.message_id is not None:
                background.add_task(apply_id_after_response, request, runtime, result.message_id)


@router.post("/exceptions/act")
async def exceptions_act(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> Response:
    """Assign (to me or someone), resolve or retry one or many exceptions; resolve and
    retry need a reason. Fields: ``ids`` (repeated), ``action``, ``reason``,
    ``assignee``, ``back`` (the page to return to)."""
    staff = await _staff(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    back = _safe_next(str(form.get("back") or "/console/exceptions"))
    ids = _ids(form)
    action = str(form.get("action") or "")
    reason = _reason(form)
    if not ids:
        return _back(back, notice="nothing-selected")
    assignee: str | None = None
    if action == "assign-me":
        action, assignee = "assign", staff.username
    elif action == "assign":
        assignee = str(form.get("assignee") or "").strip()[:128] or None
    elif action in ("resolve", "retry"):
        if not reason:
            return _back(back, notice="reason-needed")
    else:
        raise ConsoleForbiddenError("unknown action")
    try:
        await _act_on_exceptions(
            request,
            session,
            runtime,
            background,
            staff,
            ids=ids,
            action=action,
            reason=reason,
            assignee=assignee,
        )
    except GatewayError as exc:
        await session.rollback()
        return _back(back, error=exc.detail)
    notice = {"assign": "assigned", "resolve": "resolved", "retry": "retried"}[action]
    return _back(back, notice=notice)


# --------------------------------------------------------------------------- dead letters


def _issues(outcome: dict[str, Any] | None) -> list[dict[str, str]]:
    """An OperationOutcome's issues as rows: severity, code, details, diagnostics and
    where (http://hl7.org/fhir/R4/operationoutcome.html)."""
    if not isinstance(outcome, dict):
        return []
    rows = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details") or {}
        text = details.get("text") if isinstance(details, dict) else None
        if not text and isinstance(details, dict):
            codings = details.get("coding") or []
            text = ", ".join(
                str(c.get("display") or c.get("code")) for c in codings if isinstance(c, dict)
            )
        where = issue.get("expression") or issue.get("location") or []
        rows.append(
            {
                "severity": str(issue.get("severity") or ""),
                "code": str(issue.get("code") or ""),
                "details": str(text or ""),
                "diagnostics": str(issue.get("diagnostics") or ""),
                "where": ", ".join(str(w) for w in where) if isinstance(where, list) else "",
            }
        )
    return rows


@router.get("/dead-letters", response_class=HTMLResponse)
async def dead_letters_page(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    after_id: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> HTMLResponse:
    """Dead (or review) deliveries, oldest first, with the peer's OperationOutcome
    rendered; replay one or many. Paged by cursor (``after_id``)."""
    staff = await _staff(request, session, runtime)
    status = request.query_params.get("status") or DeliveryStatus.DEAD
    if status not in (DeliveryStatus.DEAD, DeliveryStatus.REVIEW):
        status = DeliveryStatus.DEAD
    target = request.query_params.get("target") or None
    where = delivery_repo.DeliveryFilter(statuses=(status,), target=target)
    rows = await delivery_repo.list_deliveries(
        session, where=where, limit=PAGE_SIZE + 1, after_id=after_id
    )
    page = rows[:PAGE_SIZE]
    total = await delivery_repo.count_deliveries(session, where=where)
    _viewed(session, "dead-letters", status=status, target=target)
    next_query = (
        urlencode(
            {"status": status, **({"target": target} if target else {}), "after_id": page[-1].id}
        )
        if len(rows) > PAGE_SIZE and page
        else None
    )
    return _render(
        request,
        "dead_letters.html",
        staff,
        rows=page,
        total=total,
        issues={d.id: _issues(d.operation_outcome) for d in page},
        status=status,
        target=target or "",
        next_query=next_query,
    )


@router.post("/dead-letters/replay")
async def dead_letters_replay(
    request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Put the selected dead deliveries back in the queue (``ids``, repeated)."""
    staff = await _staff(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    ids = _ids(form)
    if not ids:
        return _back("/console/dead-letters", notice="nothing-selected")
    result = await replay_deliveries(
        session,
        actor=staff.actor_name,
        now=utcnow(),
        profiles=runtime.profiles.current,
        ids=ids,
    )
    worker = getattr(request.app.state, "worker", None)
    if worker is not None and result.replayed:
        worker.wake()
    return _back("/console/dead-letters", notice="replayed")


async def _dead_or_404(session: AsyncSession, delivery_id: int) -> Delivery | None:
    row = await delivery_repo.get_delivery(session, delivery_id)
    if row is None or row.status not in (DeliveryStatus.DEAD, DeliveryStatus.REVIEW):
        return None
    return row


@router.get("/dead-letters/{delivery_id}/preview", response_class=HTMLResponse)
async def remap_preview(
    delivery_id: RowIdPath, request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """Before replaying: the FHIR diff between what is stored for the delivery's message
    and what the current profiles make of it (``fhir-gateway profiles remap``, in the
    browser). Nothing is stored; the read is audited with the patient."""
    staff = await _staff(request, session, runtime)
    row = await _dead_or_404(session, delivery_id)
    if row is None:
        _viewed(session, "remap-preview-not-found")
        return _render(request, "not_found.html", staff, status_code=404, what="dead letter")
    diff: list[str] = []
    problem: str | None = None
    profile: str | None = None
    if row.inbound_message_id is None:
        problem = "This delivery carries no stored message to map again (a webhook)."
    else:
        try:
            result = await remap_message(
                session,
                IngestContext.of(runtime),
                row.inbound_message_id,
                apply=False,
                actor=staff.actor_name,
            )
            diff, profile = result.diff, result.profile
        except GatewayError as exc:
            problem = exc.detail + (
                ": " + "; ".join(p.message for p in exc.problems) if exc.problems else ""
            )
    await session.rollback()  # a preview stores nothing
    row = await delivery_repo.get_delivery(session, delivery_id)
    if row is None:  # pragma: no cover - read just above, in this request
        return _render(request, "not_found.html", staff, status_code=404, what="dead letter")
    patients = await delivery_repo.patients_of(session, ids=[row.id])
    audit.record(
        session,
        action="preview",
        entity_type="Delivery",
        entity_id=str(row.id),
        patient_id=patients.get(row.id),
        detail={"message_id": row.inbound_message_id},
    )
    return _render(
        request,
        "remap.html",
        staff,
        row=row,
        diff=diff,
        problem=problem,
        profile=profile,
        issues=_issues(row.operation_outcome),
    )


@router.post("/dead-letters/{delivery_id}/remap")
async def remap_and_replay(
    delivery_id: RowIdPath, request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Store what the current profiles make of the delivery's message (new versions,
    with Provenance, delivered through the outbox) and replay the dead delivery, which
    now sends the current versions (``operator``)."""
    staff = await _staff(request, session, runtime)
    await checked_form(request, staff, role=OPERATOR)
    back = f"/console/dead-letters/{delivery_id}/preview"
    row = await _dead_or_404(session, delivery_id)
    if row is None or row.inbound_message_id is None:
        return _back("/console/dead-letters", error="no such dead letter to re-map")
    try:
        await remap_message(
            session,
            IngestContext.of(runtime),
            row.inbound_message_id,
            apply=True,
            actor=staff.actor_name,
        )
    except GatewayError as exc:
        await session.rollback()
        return _back(back, error=exc.detail)
    await replay_deliveries(
        session,
        actor=staff.actor_name,
        now=utcnow(),
        profiles=runtime.profiles.current,
        ids=[row.id],
    )
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.wake()
    return _back("/console/dead-letters", notice="remapped")


# --------------------------------------------------------------------------- cases


@router.get("/cases", response_class=HTMLResponse)
async def cases_page(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    before: Annotated[datetime | None, Query()] = None,
    after_case: Annotated[str | None, Query(max_length=64)] = None,
) -> HTMLResponse:
    """Cases, newest first, by state and SLA; paged by cursor (``before``, ``after_case``:
    the opening time and id of the last case shown)."""
    staff = await _staff(request, session, runtime)
    state = request.query_params.get("state") or ""
    overdue = request.query_params.get("overdue") == "1"
    now = utcnow()
    stmt = select(Case).order_by(Case.opened_at.desc(), Case.id).limit(PAGE_SIZE + 1)
    if state:
        stmt = stmt.where(Case.state == state)
    if overdue:
        stmt = stmt.where(Case.sla_due_at <= now)
    if before is not None:
        stmt = stmt.where(
            or_(
                Case.opened_at < before,
                and_(Case.opened_at == before, Case.id > (after_case or "")),
            )
        )
    rows = list(await session.scalars(stmt))
    page = rows[:PAGE_SIZE]
    _viewed(session, "cases", state=state, overdue=overdue or None)
    next_query = (
        urlencode(
            {
                **({"state": state} if state else {}),
                **({"overdue": "1"} if overdue else {}),
                "before": page[-1].opened_at.isoformat(),
                "after_case": page[-1].id,
            }
        )
        if len(rows) > PAGE_SIZE and page
        else None
    )
    workflow = runtime.profiles.current.workflow_or_raise
    return _render(
        request,
        "cases.html",
        staff,
        rows=page,
        states=workflow.states,
        state=state,
        overdue=overdue,
        next_query=next_query,
    )


@router.get("/cases/{case_id}", response_class=HTMLResponse)
async def case_page(
    case_id: str, request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """A case: state and SLA, its timeline (source, time, principal), the FHIR resources
    of its messages with their versions, each target's delivery status, and the
    override form."""
    staff = await _staff(request, session, runtime)
    case = await session.get(Case, case_id[:64])
    if case is None:
        _viewed(session, "case-not-found")
        return _render(request, "not_found.html", staff, status_code=404, what="case")
    events = list(
        await session.scalars(
            select(CaseEvent)
            .where(CaseEvent.case_id == case.id)
            .order_by(CaseEvent.occurred_at, CaseEvent.id)
        )
    )
    message_ids = sorted({e.inbound_message_id for e in events if e.inbound_message_id})
    resources = list(
        await session.scalars(
            select(FhirResource)
            .where(FhirResource.patient_id == case.patient_id)
            .order_by(FhirResource.resource_type, FhirResource.id)
            .limit(200)
        )
    )
    conditions = [Delivery.ordering_key.in_([case.id, case.patient_id])]
    if message_ids:
        conditions.append(Delivery.inbound_message_id.in_(message_ids))
    deliveries = list(
        await session.scalars(
            select(Delivery).where(or_(*conditions)).order_by(Delivery.id.desc()).limit(200)
        )
    )
    audit.record(
        session, action="read", entity_type="Case", entity_id=case.id, patient_id=case.patient_id
    )
    workflow = runtime.profiles.current.workflow_or_raise
    return _render(
        request,
        "case.html",
        staff,
        case=case,
        events=events,
        resources=resources,
        deliveries=deliveries,
        states=[s for s in workflow.states if s != case.state],
        overdue=case.sla_due_at is not None and case.sla_due_at <= utcnow(),
    )


@router.post("/cases/{case_id}/override")
async def case_override(
    case_id: str, request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Move the case to another state by hand, with a reason (``operator``)."""
    staff = await _staff(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    back = f"/console/cases/{case_id}"
    case = await session.get(Case, case_id[:64])
    if case is None:
        return _back("/console/cases", error="no such case")
    reason = _reason(form)
    if not reason:
        return _back(back, notice="reason-needed")
    from gateway.subscribers.service import enqueue_case_webhook

    try:
        await override_state(
            session,
            runtime.profiles.current.workflow_or_raise,
            case,
            to_state=str(form.get("state") or ""),
            reason=reason,
            by=staff.actor_name,
            now=runtime.clock.now(),
            notify=enqueue_case_webhook,
        )
    except GatewayError as exc:
        await session.rollback()
        problems = "; ".join(p.message for p in exc.problems) if exc.problems else ""
        return _back(back, error=f"{exc.detail}: {problems}" if problems else exc.detail)
    return _back(back, notice="overridden")


# --------------------------------------------------------------------------- duplicates


@router.get("/duplicates", response_class=HTMLResponse)
async def duplicates_page(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    after_id: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> HTMLResponse:
    """The patient merge-review queue: probable duplicates with their score, its parts
    and each patient's recorded element conflicts (never values); accept (merge) or
    reject with a reason. Oldest first, paged by cursor (``after_id``)."""
    staff = await _staff(request, session, runtime)
    rows = await reviews.list_reviews(
        session, status="open", limit=PAGE_SIZE + 1, after_id=after_id
    )
    page = rows[:PAGE_SIZE]
    ids = sorted({p for r in page for p in (r.patient_id, r.candidate_id)})
    conflicts = await reviews.conflicts_of(session, ids)
    audit.record_patients(
        session,
        action="read",
        entity_type="PatientReview",
        hits=[(str(r.id), p) for r in page for p in (r.patient_id, r.candidate_id)],
    )
    return _render(
        request,
        "duplicates.html",
        staff,
        rows=page,
        conflicts=conflicts,
        next_query=urlencode({"after_id": page[-1].id}) if len(rows) > PAGE_SIZE else None,
    )


@router.post("/duplicates/{review_id}/{action}")
async def duplicate_decide(
    review_id: RowIdPath, action: str, request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Accept (merge, ``survivor`` chooses who survives) or reject a probable duplicate,
    with a reason (``operator``)."""
    staff = await _staff(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    reason = _reason(form)
    if not reason:
        return _back("/console/duplicates", notice="reason-needed")
    if action not in ("accept", "reject"):
        return _back("/console/duplicates", error="no such action")
    try:
        row = await decisions.open_review_or_raise(session, review_id)
        if action == "accept":
            await decisions.accept_review(
                session,
                row,
                profiles=runtime.profiles.current,
                survivor_id=str(form.get("survivor") or "") or None,
                reason=reason,
                by=staff.actor_name,
            )
        else:
            decisions.reject_review(session, row, reason=reason, by=staff.actor_name)
    except GatewayError as exc:
        await session.rollback()
        return _back("/console/duplicates", error=exc.detail)
    worker = getattr(request.app.state, "worker", None)
    if worker is not None and action == "accept":
        worker.wake()
    return _back("/console/duplicates", notice="merged" if action == "accept" else "not-same")


# --------------------------------------------------------------------------- targets


@router.get("/targets", response_class=HTMLResponse)
async def targets_page(request: Request, session: SessionDep, runtime: RuntimeDep) -> HTMLResponse:
    """Targets: health, circuit, token state, pause and resume."""
    staff = await _staff(request, session, runtime)
    health = await target_health(session, profiles=runtime.profiles.current, now=utcnow())
    _viewed(session, "targets")
    return _render(request, "targets.html", staff, health=health)


@router.post("/targets/{kind}/{name}/{action}")
async def target_act(
    kind: str, name: str, action: str, request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Pause (with a reason) or resume a target (``operator``)."""
    staff = await _staff(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    if kind not in ("ehr", "webhook") or action not in ("pause", "resume"):
        return _back("/console/targets", error="no such action")
    try:
        if action == "pause":
            reason = _reason(form)
            if not reason:
                return _back("/console/targets", notice="reason-needed")
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
        return _back("/console/targets", error=exc.detail)
    return _back("/console/targets", notice="paused" if action == "pause" else "resumed")


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
    return _render(
        request,
        "subscribers.html",
        staff,
        status_code=status_code,
        rows=rows,
        types=[*WEBHOOK_TYPES, "case.*", "exception.*"],
        secret=secret,
        error=error,
    )


@router.get("/subscribers", response_class=HTMLResponse)
async def subscribers_page(
    request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """Subscribers: list, add, disable, rotate the secret (``admin`` to act)."""
    staff = await _staff(request, session, runtime)
    _viewed(session, "subscribers")
    return await _subscribers_response(request, session, staff)


_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_URL = re.compile(r"^https?://[!-.0-~]+(/[!-~]*)?$")


@router.post("/subscribers", response_class=HTMLResponse)
async def subscriber_add(
    request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """Add a subscriber; its secret is shown on the answer, once."""
    staff = await _staff(request, session, runtime)
    form = await checked_form(request, staff, role=ADMIN)
    name = str(form.get("name") or "").strip()
    url = str(form.get("url") or "").strip()
    types = sorted(
        {str(t) for t in form.getlist("event_types")} & {*WEBHOOK_TYPES, "case.*", "exception.*"}
    )
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
    staff = await _staff(request, session, runtime)
    await checked_form(request, staff, role=ADMIN)
    row = await session.get(Subscriber, subscriber_id)
    if row is None or action not in ("disable", "enable", "rotate"):
        return _back("/console/subscribers", error="no such subscriber or action")
    if action == "rotate":
        secret = await rotate_secret(session, subscriber=row)
        return await _subscribers_response(request, session, staff, secret=(row.name, secret))
    await set_subscriber_active(session, subscriber=row, active=action == "enable")
    return _back("/console/subscribers", notice="disabled" if action == "disable" else "enabled")


# --------------------------------------------------------------------------- profiles


@router.get("/profiles", response_class=HTMLResponse)
async def profiles_page(request: Request, session: SessionDep, runtime: RuntimeDep) -> HTMLResponse:
    """The active profiles with their versions and hashes, the last reload and its
    problems, the published Questionnaires."""
    staff = await _staff(request, session, runtime)
    current = runtime.profiles.current
    sources = sorted(current.sources.items())
    _viewed(session, "profiles")
    return _render(
        request,
        "profiles.html",
        staff,
        sources=sources,
        set_hash=current.content_hash,
        holder=runtime.profiles,
        questionnaires=questionnaires(current),
        workflow=current.workflow,
    )


# --------------------------------------------------------------------------- wiring


def install(app: FastAPI) -> None:
    """Serve the console at ``/console`` (pages, static assets) with its error pages: a
    request without a session is sent to sign in (a page) or refused with 401 (a post);
    a refused post (CSRF, role) is a 403 page."""
    app.mount("/console/static", StaticFiles(directory=str(HERE / "static")), name="console-static")
    app.include_router(router)

    @app.exception_handler(NotSignedInError)
    async def _not_signed_in(request: Request, exc: NotSignedInError) -> Response:
        if request.method in ("GET", "HEAD"):
            return _back("/console/login", next=request.url.path)
        return _render(
            request,
            "forbidden.html",
            None,
            status_code=401,
            message="You are not signed in (or your session ended): sign in again.",
        )

    @app.exception_handler(ConsoleForbiddenError)
    async def _forbidden(request: Request, exc: ConsoleForbiddenError) -> Response:
        log.warning("console.refused", path=request.url.path, why=exc.message)
        staff: Staff | None = getattr(request.state, "staff", None)
        if staff is not None:  # a signed-in user refused (CSRF, role): in the audit trail
            await record_refusal(
                request.app.state.runtime,
                actor=Actor("user", staff.actor_name, None, peer_of(request)),
                method=request.method,
                route=request.url.path,
                status=403,
                problem="csrf" if "CSRF" in exc.message else "role",
            )
        return _render(request, "forbidden.html", staff, status_code=403, message=exc.message)


__all__ = ["escape", "install", "router"]
