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

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from gateway.audit.refusals import record_refusal
from gateway.clients.actor import Actor
from gateway.console import admin, queues, records, signin
from gateway.console.auth import (
    ConsoleForbiddenError,
    NotSignedInError,
    Staff,
    peer_of,
)
from gateway.console.common import (
    HERE,
    log,
    redirect_to,
    render_page,
)

# --------------------------------------------------------------------------- wiring


def install(app: FastAPI) -> None:
    """Serve the console at ``/console`` (pages, static assets) with its error pages: a
    request without a session is sent to sign in (a page) or refused with 401 (a post);
    a refused post (CSRF, role) is a 403 page."""
    app.mount("/console/static", StaticFiles(directory=str(HERE / "static")), name="console-static")
    for module in (signin, queues, records, admin):
        app.include_router(module.router)

    @app.exception_handler(NotSignedInError)
    async def _not_signed_in(request: Request, exc: NotSignedInError) -> Response:
        if request.method in ("GET", "HEAD"):
            return redirect_to("/console/login", next=request.url.path)
        return render_page(
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
        return render_page(request, "forbidden.html", staff, status_code=403, message=exc.message)


__all__ = ["install"]
