"""Signing in and out of the console: the sign-in page and form, OpenID Connect
(optional), sign-out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway.audit import service as audit
from gateway.clients.actor import Actor, acting_as
from gateway.console import oidc
from gateway.console.auth import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    ConsoleForbiddenError,
    checked_form,
    clear_cookie,
    new_login_token,
    peer_of,
    set_cookie,
    tokens_match,
)
from gateway.console.common import (
    log,
    redirect_to,
    render_page,
    safe_next,
    staff_of,
)
from gateway.db.models import (
    StaffRole,
)
from gateway.db.types import utcnow
from gateway.deps import RuntimeDep, SessionDep
from gateway.runtime import Runtime
from gateway.staff.service import authenticate, close_session, get_staff, open_session

router = APIRouter(prefix="/console", include_in_schema=False)

# --------------------------------------------------------------------------- sign-in


@router.get("/login", response_class=HTMLResponse)
async def login_page(
    request: Request, runtime: RuntimeDep, next: str | None = None
) -> HTMLResponse:
    """The sign-in form (with a double-submit CSRF token)."""
    token = new_login_token()
    response = render_page(
        request,
        "login.html",
        None,
        login_token=token,
        next=safe_next(next),
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
    response = render_page(
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
        return redirect_to("/console/login")
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
        response = render_page(
            request,
            "login.html",
            None,
            status_code=401,
            login_token=token,
            next=safe_next(str(form.get("next") or "")),
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
    redirect = RedirectResponse(safe_next(str(form.get("next") or "")), status_code=303)
    set_cookie(redirect, request, runtime, SESSION_COOKIE, cookie)
    clear_cookie(redirect, request, runtime, LOGIN_CSRF_COOKIE)
    return redirect


@router.post("/logout")
async def logout(request: Request, session: SessionDep, runtime: RuntimeDep) -> Response:
    """End the session (CSRF-checked) and forget the cookie."""
    staff = await staff_of(request, session, runtime)
    await checked_form(request, staff, role=StaffRole.VIEWER)
    await close_session(session, session_id=staff.session_id)
    audit.record(session, action="logout", entity_type="StaffUser", entity_id=staff.username)
    response = redirect_to("/console/login", notice="signed-out")
    clear_cookie(response, request, runtime, SESSION_COOKIE)
    return response
