"""FastAPI dependencies: the runtime, the request's database session, authentication."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.clients.actor import Actor, set_actor
from gateway.clients.service import Principal, scopes_granting
from gateway.db.audit_models import AUDIT_PENDING
from gateway.errors import ForbiddenError, UnauthorizedError
from gateway.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    """The runtime the app was started with (``async``: FastAPI runs a plain ``def``
    dependency in a worker thread, a thread hop on every request)."""
    return request.app.state.runtime  # type: ignore[no-any-return]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, committed when the handler returns without error (before
    the response is sent: ``Depends(..., scope="function")``), rolled back otherwise.

    This dependency is the only place a request commits; services flush at most. A read
    commits too: the audit entries of what it read (:mod:`gateway.audit.service`) are
    written before its response is sent; on SQLite, taking the process's write lock.
    """
    runtime: Runtime = request.app.state.runtime
    reading = request.method in ("GET", "HEAD")
    factory = runtime.sessionmaker if reading else runtime.write_session
    async with factory() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            if reading and runtime.write_lock is not None and session.info.get(AUDIT_PENDING):
                async with runtime.write_lock:
                    await session.commit()
            else:
                await session.commit()


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]

#: The largest row id: ids are signed 64-bit integers (PostgreSQL ``BIGINT``, SQLite
#: ``INTEGER``). A larger one in a path or query is refused with 422 before any query
#: (the database driver would fail on it: a 500).
MAX_ROW_ID = 2**63 - 1

#: A row id in the path (``/v1/ops/exceptions/{exception_id}``): 1 to :data:`MAX_ROW_ID`.
RowIdPath = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
#: A row id as a paging cursor in a query (``before_id``, ``after_id``).
RowIdQuery = Annotated[int | None, Query(ge=0, le=MAX_ROW_ID)]

#: A JSON Schema pattern for text without NUL characters (a body model's ``str`` fields
#: that are stored or queried: PostgreSQL cannot hold U+0000 in text).
NO_NUL = r"^[^\x00]*$"


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
    # Who was refused, if a check after this one refuses the request (the audit trail
    # records a known client's refusals: gateway.audit.refusals).
    request.state.authenticated = principal
    return principal


def require_scope(*scopes: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that authenticates the caller and checks it holds one of ``scopes``.

    Credentials: ``Authorization: Bearer <api key>`` or ``X-API-Key: <api key>``. The
    request then acts as that client for the audit trail (:mod:`gateway.clients.actor`).

    Raises:
        UnauthorizedError: 401 with ``WWW-Authenticate: Bearer``, no or unknown key.
        ForbiddenError: 403, the key holds none of ``scopes``.
    """

    async def dependency(request: Request) -> Principal:
        principal = await authenticated(request)
        if not any(principal.has(scope) for scope in scopes):
            raise ForbiddenError(f"this route needs the scope {' or '.join(scopes)}")
        request.state.principal = principal
        peer = request.client.host if request.client is not None else None
        set_actor(Actor("client", principal.name, principal.client_id, peer))
        return principal

    dependency.__name__ = "require_" + "_or_".join(s.replace(":", "_") for s in scopes)
    _ROUTE_SCOPES[dependency] = tuple(sorted({g for s in scopes for g in scopes_granting(s)}))
    return dependency


#: ``require_scope`` dependencies -> every scope that opens the route.
_ROUTE_SCOPES: dict[Callable[..., Any], tuple[str, ...]] = {}


def scopes_of(dependency: Callable[..., Any]) -> tuple[str, ...] | None:
    """The scopes a route dependency made by :func:`require_scope` accepts (any one of
    them opens the route, implied scopes included: ``ops:admin`` opens an ``ops:read``
    route); None for any other dependency. The OpenAPI document's per-route ``security``
    is built from this (:mod:`gateway.openapi`)."""
    return _ROUTE_SCOPES.get(dependency)
