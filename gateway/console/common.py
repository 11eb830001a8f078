"""Shared pieces of the console's pages: templates, rendering (times, ages, security
headers), redirects with a notice code, the page-view audit entry, the signed-in staff
user and a form's reason. See :mod:`gateway.console.pages` for what the console is."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.console.auth import (
    CSRF_FIELD,
    Staff,
    current_staff,
)
from gateway.db.models import (
    StaffRole,
)
from gateway.db.types import utcnow
from gateway.logging import get_logger
from gateway.runtime import Runtime

log = get_logger(__name__)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))

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


def when_html(value: datetime | None) -> Markup:
    """A time as ``<time>``: UTC text (replaced by the browser's local time by
    ``console.js``), the ISO 8601 instant in ``datetime`` and the tooltip."""
    if value is None:
        return Markup('<span class="muted">never</span>')
    iso = value.isoformat(timespec="seconds")
    text = value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{0}" title="{0}">{1}</time>').format(iso, text)


def age_text(seconds: float | None) -> str:
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


templates.env.filters["when"] = when_html
templates.env.filters["age"] = age_text
templates.env.globals["CSRF_FIELD"] = CSRF_FIELD


def render_page(
    request: Request,
    name: str,
    staff: Staff | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    notice = request.query_params.get("notice")
    context.setdefault("notice", NOTICES.get(notice or ""))
    flashed = unquote(request.cookies.get(ERROR_COOKIE, ""))[:300]
    context.setdefault("error", flashed or None)
    response = templates.TemplateResponse(
        request, name, {"staff": staff, "now": utcnow(), **context}, status_code=status_code
    )
    if ERROR_COOKIE in request.cookies:
        response.delete_cookie(ERROR_COOKIE, path="/console")  # shown once
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )
    response.headers["Referrer-Policy"] = "same-origin"
    return response


#: A refusal's message for the page a redirect lands on: a short-lived cookie the server
#: sets, not a query parameter (a link could carry any text into a console page).
ERROR_COOKIE = "console_error"


def redirect_to(
    path: str, *, error: str | None = None, **query: str | int | None
) -> RedirectResponse:
    """A 303 to ``path`` with ``query`` (codes and ids, never data); ``error``, a message
    for the next page, goes in :data:`ERROR_COOKIE` (60 s, HttpOnly, SameSite=Strict)."""
    params = {k: v for k, v in query.items() if v not in (None, "")}
    url = path + ("?" + urlencode(params) if params else "")
    response = RedirectResponse(url, status_code=303)
    if error:
        response.set_cookie(
            ERROR_COOKIE,
            quote(error[:300]),
            max_age=60,
            path="/console",
            httponly=True,
            samesite="strict",
        )
    return response


def record_view(session: AsyncSession, page: str, **detail: Any) -> None:
    audit.record(
        session,
        action="view",
        entity_type="ConsolePage",
        entity_id=page,
        detail={k: v for k, v in detail.items() if v not in (None, "")} or None,
    )


async def staff_of(request: Request, session: AsyncSession, runtime: Runtime) -> Staff:
    return await current_staff(request, session, runtime)


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path only (no open redirect)."""
    if value and re.fullmatch(r"/console(/[A-Za-z0-9_./-]*)?", value) and ".." not in value:
        return value
    return "/console"


def reason_of(form: Any) -> str:
    """A form's ``reason`` field: trimmed, at most 1,000 characters."""
    return str(form.get("reason") or "").strip()[:1000]
