"""Staff sign-in for the console: the session cookie, CSRF tokens, roles, the actor.

* The session is server-side (:mod:`gateway.staff.service`): the cookie ``fgw_console``
  holds a random token, ``HttpOnly``, ``SameSite=Lax``, ``Path=/console`` and ``Secure``
  unless the request came over plain http to a loopback address
  (``GATEWAY_CONSOLE_COOKIE_SECURE`` overrides), and ends after
  ``GATEWAY_CONSOLE_IDLE_TIMEOUT`` without a request.
* Every form posts the session's CSRF token (synchronizer token pattern, OWASP CSRF
  Prevention Cheat Sheet); the sign-in form, before any session, a double-submit token
  (a cookie and a field that must match). A post without the right token is refused with
  403 before anything is done.
* Roles: ``viewer`` reads, ``operator`` acts, ``admin`` also manages subscribers; a post
  above the user's role is refused with 403.
* A signed-in request acts as ``staff:<username>`` from the peer's address for the audit
  trail (:mod:`gateway.clients.actor`).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import FormData
from starlette.responses import Response

from gateway.clients.actor import Actor, set_actor
from gateway.db.types import utcnow
from gateway.runtime import Runtime
from gateway.staff.service import SignedIn, resume_session, role_at_least

SESSION_COOKIE = "fgw_console"
LOGIN_CSRF_COOKIE = "fgw_console_login"
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf_token"


class NotSignedInError(Exception):
    """The request has no live console session (answered with a redirect to sign in)."""


class ConsoleForbiddenError(Exception):
    """A console post without a valid CSRF token, or above the user's role (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Staff:
    """The signed-in staff user of a request."""

    username: str
    display_name: str
    role: str
    csrf_token: str
    session_id: str

    @property
    def actor_name(self) -> str:
        """The agent name in the audit trail and on what this user does."""
        return f"staff:{self.username}"

    def can(self, role: str) -> bool:
        """True if the user's role grants ``role``."""
        return role_at_least(self.role, role)


def peer_of(request: Request) -> str | None:
    """The peer's network address."""
    return request.client.host if request.client is not None else None


def cookie_secure(request: Request, runtime: Runtime) -> bool:
    """Whether the session cookie is ``Secure``: the setting when set; otherwise yes,
    unless the request came over http to a loopback host (local development, tests)."""
    configured = runtime.settings.console_cookie_secure
    if configured is not None:
        return configured
    if request.url.scheme == "https":
        return True
    host = (request.url.hostname or "").strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def set_cookie(
    response: Response, request: Request, runtime: Runtime, name: str, value: str
) -> None:
    """Set a console cookie: HttpOnly, SameSite=Lax, Path=/console, Secure as
    :func:`cookie_secure` says; a session cookie (no Max-Age: the server ends it)."""
    response.set_cookie(
        name,
        value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=cookie_secure(request, runtime),
    )


def clear_cookie(response: Response, request: Request, runtime: Runtime, name: str) -> None:
    """Remove a console cookie."""
    response.delete_cookie(
        name,
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=cookie_secure(request, runtime),
    )


async def current_staff(request: Request, session: AsyncSession, runtime: Runtime) -> Staff:
    """The signed-in staff user, and the request acting as them. A page's own automatic
    refresh (``?auto=1``) does not count as use: a wall screen left on the overview still
    signs out after the idle time.

    Raises:
        NotSignedInError: no cookie, an unknown, expired or closed session, or a disabled
            account.
    """
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise NotSignedInError
    signed: SignedIn | None = await resume_session(
        session,
        token=token,
        now=utcnow(),
        idle=runtime.settings.console_idle_timeout,
        touch=request.query_params.get("auto") != "1",
    )
    if signed is None:
        raise NotSignedInError
    user = signed.user
    staff = Staff(
        username=user.username,
        display_name=user.display_name or user.username,
        role=user.role,
        csrf_token=signed.csrf_token,
        session_id=signed.session_id,
    )
    set_actor(Actor("user", staff.actor_name, None, peer_of(request)))
    request.state.staff = staff
    return staff


def tokens_match(expected: str | None, given: Any) -> bool:
    """Constant-time comparison of a CSRF token with what the form sent."""
    if not expected or not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


async def checked_form(request: Request, staff: Staff, *, role: str) -> FormData:
    """The posted form, after checking its CSRF token and the user's role.

    Raises:
        ConsoleForbiddenError: a missing or wrong CSRF token; a role below ``role``.
    """
    form = await request.form()
    if not tokens_match(staff.csrf_token, form.get(CSRF_FIELD)):
        raise ConsoleForbiddenError("the form's CSRF token is missing or wrong: reload the page")
    if not staff.can(role):
        raise ConsoleForbiddenError(f"this needs the {role} role; you are {staff.role}")
    return form


def new_login_token() -> str:
    """A double-submit CSRF token for the sign-in form."""
    return secrets.token_urlsafe(32)
