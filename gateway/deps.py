"""FastAPI dependencies: the runtime, the request's database session, authentication."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.clients.service import Principal
from gateway.errors import ForbiddenError, UnauthorizedError
from gateway.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    """The runtime the app was started with (``async``: FastAPI runs a plain ``def``
    dependency in a worker thread, a thread hop on every request)."""
    return request.app.state.runtime  # type: ignore[no-any-return]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, committed when the handler returns without error (before
    the response is sent: ``Depends(..., scope="function")``), rolled back otherwise.

    This dependency is the only place a request commits; services flush at most.
    """
    runtime: Runtime = request.app.state.runtime
    factory = runtime.sessionmaker if request.method in ("GET", "HEAD") else runtime.write_session
    async with factory() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


async def authenticated(request: Request) -> Principal:
    """The caller's principal, whatever its scopes (``/openapi.json`` and ``/docs`` with
    ``GATEWAY_DOCS=authenticated``).

    Raises:
        UnauthorizedError: 401 with ``WWW-Authenticate: Bearer``, no or unknown key.
    """
    key = _bearer(request)
    challenge = {"WWW-Authenticate": 'Bearer realm="fhir-gateway"'}
    if key is None:
        raise UnauthorizedError(
            "an API key is required (Authorization: Bearer <key>)", headers=challenge
        )
    runtime: Runtime = request.app.state.runtime
    principal = await runtime.auth_cache.get(key, runtime)
    if principal is None:
        raise UnauthorizedError("the API key is not valid", headers=challenge)
    request.state.principal = principal
    return principal


def require_scope(*scopes: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that authenticates the caller and checks it holds one of ``scopes``.

    Credentials: ``Authorization: Bearer <api key>`` or ``X-API-Key: <api key>``.

    Raises:
        UnauthorizedError: 401 with ``WWW-Authenticate: Bearer``, no or unknown key.
        ForbiddenError: 403, the key holds none of ``scopes``.
    """

    async def dependency(request: Request) -> Principal:
        principal = await authenticated(request)
        if not any(principal.has(scope) for scope in scopes):
            raise ForbiddenError(f"this route needs the scope {' or '.join(scopes)}")
        return principal

    dependency.__name__ = "require_" + "_or_".join(s.replace(":", "_") for s in scopes)
    return dependency
