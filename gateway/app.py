"""The FastAPI application: routers, error rendering, body limit, lifespan.

``create_app(settings)`` wires a :class:`~gateway.runtime.Runtime` at start-up (database,
profiles) and, in embedded mode (``GATEWAY_RUN_WORKER=true``), runs the delivery worker
in the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import iter_route_contexts
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import gateway
from gateway.audit.refusals import record_refusal
from gateway.clients.actor import Actor
from gateway.clients.service import Principal
from gateway.console.pages import install as install_console
from gateway.db.checkpoint import run_checkpoints
from gateway.db.encryption import startup_problems
from gateway.deps import authenticated
from gateway.errors import (
    BadRequestError,
    ForbiddenError,
    GatewayError,
    NotFoundError,
    PayloadTooLargeError,
    UnauthorizedError,
    UnprocessableError,
    operation_outcome_response,
    problem_response,
)
from gateway.events.endpoints import router as events_router
from gateway.fhir.audit_endpoints import router as audit_router
from gateway.fhir.endpoints import router as fhir_router
from gateway.fhir.endpoints import well_known_router as smart_router
from gateway.hl7.endpoints import router as hl7_router
from gateway.imports.endpoints import router as imports_router
from gateway.imports.uploads import sweep_stopped_uploads
from gateway.ingest.endpoints import router as ingest_router
from gateway.logging import configure_logging, get_logger, log_failure
from gateway.oauth.endpoints import router as jwks_router
from gateway.openapi import build_openapi
from gateway.ops.cases import router as ops_cases_router
from gateway.ops.deliveries import router as ops_deliveries_router
from gateway.ops.exceptions import router as exceptions_router
from gateway.ops.guards import record_target_modes
from gateway.ops.patient_review import router as patient_review_router
from gateway.ops.reconciliation import router as reconcile_router
from gateway.ops.reconciliation import stop_jobs as stop_reconciliations
from gateway.ops.targets import router as ops_targets_router
from gateway.partners.endpoints import router as partners_router
from gateway.profiles.endpoints import router as profiles_router
from gateway.profiles.service import install_sighup_reload
from gateway.runtime import Runtime
from gateway.secrets import warn_unset_target_secrets
from gateway.settings import Settings
from gateway.subscribers.endpoints import router as subscribers_router
from gateway.worker import build_worker, ehr_clients
from gateway.workflow.endpoints import router as cases_router
from mappers import validation
from mappers.errors import Problem

log = get_logger(__name__)


class UnsafeStartError(RuntimeError):
    """``GATEWAY_ENV=production`` and secrets are not protected at rest: no start."""


class GatewayGeneralError(GatewayError):
    """An unexpected failure: answered 500 without details (they are in the logs)."""


def _render(request: Request, exc: GatewayError) -> JSONResponse:
    if request.url.path.startswith("/fhir") or _fhir_server_asking(request):
        return operation_outcome_response(exc)
    return problem_response(exc, instance=request.url.path)


async def _audit_refusal(request: Request, exc: GatewayError) -> None:
    """A known API client refused (403) goes into the audit trail
    (:mod:`gateway.audit.refusals`); a request without a valid key (401) only into the
    log, with the peer's address and never the key."""
    peer = request.client.host if request.client is not None else None
    # The path names ids only (PHI never goes in URLs); the query string may name a
    # patient, and is left out.
    path = request.url.path
    principal: Principal | None = getattr(request.state, "authenticated", None)
    if isinstance(exc, UnauthorizedError) or principal is None:
        log.info("auth.refused", status=exc.status, peer=peer, method=request.method, route=path)
        return
    await record_refusal(
        request.app.state.runtime,
        actor=Actor("client", principal.name, principal.client_id, peer),
        method=request.method,
        route=path,
        status=exc.status,
        problem=exc.slug,
    )


def _fhir_server_asking(request: Request) -> bool:
    """An EHR posting a Subscription notification that accepts ``application/fhir+json``
    (HAPI FHIR's client does) gets its error as an OperationOutcome, which FHIR servers log
    (https://hl7.org/fhir/R4/http.html#Status-Codes); any other client a problem."""
    path = request.url.path
    if not (path.startswith("/v1/ehr/") and path.endswith("/notifications")):
        return False
    accept = request.headers.get("accept", "").lower()
    return "application/fhir+json" in accept and "application/problem+json" not in accept


class RequestGuardMiddleware:
    """Refuse a request with a NUL character (U+0000) in its path, query or headers: 400
    ``nul_character``, before routing.

    No parameter of the gateway needs one, and PostgreSQL cannot hold one in text (a query
    with it fails: a 500). NUL in JSON bodies is refused by
    :func:`gateway.http.decode_json_object`; in HL7 v2, by the HL7 channel (``AR``).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _holds_nul(scope):
            exc = BadRequestError(
                "the request holds a NUL character",
                [Problem("", "nul_character", "paths, queries and headers cannot hold U+0000")],
                in_body=False,
            )
            path = scope.get("path", "")
            response = (
                operation_outcome_response(exc)
                if path.startswith("/fhir")
                else problem_response(exc, instance=path.replace("\x00", ""))
            )
            await response(scope, _noop_receive, send)
            return
        await self.app(scope, receive, send)


def _holds_nul(scope: Scope) -> bool:
    query: bytes = scope.get("query_string", b"")
    if "\x00" in scope.get("path", "") or b"\x00" in query or b"%00" in query:
        return True
    return any(b"\x00" in value for _, value in scope.get("headers") or ())


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405 (RFC 9110 section 15.5.6): every method some route
    of the app serves at the request's path (Starlette's own names only the first route
    that matched the path)."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= route.methods or set()
    return ", ".join(sorted(methods))


class BodySizeLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, by ``Content-Length`` or while streaming.

    Nothing of such a body is kept (it is not read past the limit, and a payload that
    large is not one to store for review); the refusal is logged as
    ``http.body_too_large`` with the path, the limit and the declared length.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_import_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_import_bytes = max_import_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        # a bulk import upload has its own limit (issue 16)
        limit = self.max_import_bytes if scope.get("path") == "/v1/imports" else self.max_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            log.info(
                "http.body_too_large",
                path=scope.get("path", ""),
                limit_bytes=limit,
                declared_bytes=int(length),
            )
            await self._too_large(scope, send, limit)
            return
        received = 0

        async def limited_receive() -> Message:
            # Raised inside the handler (where the body is read), so the app's
            # GatewayError handler renders it.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    log.info(
                        "http.body_too_large",
                        path=scope.get("path", ""),
                        limit_bytes=limit,
                        declared_bytes=None,
                    )
                    raise _too_large_error(limit)
            return message

        await self.app(scope, limited_receive, send)

    async def _too_large(self, scope: Scope, send: Send, limit: int) -> None:
        exc = _too_large_error(limit)
        path = scope.get("path", "")
        response = (
            operation_outcome_response(exc)
            if path.startswith("/fhir")
            else problem_response(exc, instance=path)
        )
        await response(scope, _noop_receive, send)


class UnexpectedErrorMiddleware:
    """Answer an unexpected exception with a 500 problem (an OperationOutcome on ``/fhir``)
    and log its type and frames only.

    The message of an unexpected exception may hold PHI (a database driver quotes the
    statement's parameters). Starlette's outermost ``ServerErrorMiddleware`` renders an
    ``Exception`` handler's response and then re-raises to the server, which logs the
    exception whole; this middleware sits inside it, so nothing reaches the server.
    Exceptions of background tasks (run after the response started) are logged the same
    way.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            path = scope.get("path", "")
            log_failure(log, "request.failed", exc, path=path, response_started=started)
            if started:
                return
            error = GatewayGeneralError("an unexpected error occurred; it has been logged")
            response = (
                operation_outcome_response(error)
                if path.startswith("/fhir")
                else problem_response(error, instance=path)
            )
            await response(scope, _noop_receive, send)


def _too_large_error(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the body is larger than {limit} bytes",
        [Problem("", "payload_too_large", f"at most {limit} bytes")],
    )


async def _noop_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    run_worker: bool | None = None,
    server_process: bool = False,
) -> FastAPI:
    """Build the application.

    Args:
        settings: the gateway settings.
        runtime: an already built runtime (tests); otherwise one is created at start-up.
        run_worker: run the worker's loops (deliveries, events left to apply, workflow
            timers) in this process; defaults to ``settings.run_worker``.
        server_process: a long-running server process (``serve``): after start-up,
            move every object alive then (modules, profiles, compiled models) out of the
            garbage collector's reach (``gc.freeze()``), so full collections under load
            do not walk them again (shorter pauses), and on SQLite checkpoint the WAL in
            the background (:mod:`gateway.db.checkpoint`) rather than inside a request's
            COMMIT. A test process that builds many apps keeps it off.
    """
    configure_logging(settings.log_level, json=settings.log_json)
    with_worker = settings.run_worker if run_worker is None else run_worker

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or Runtime.create(settings)
        refused = await startup_problems(settings, rt.engine)
        if refused:
            log.error("gateway.refused_to_start", problems=refused)
            if runtime is None:
                await rt.close()
            raise UnsafeStartError("; ".join(refused))
        app.state.runtime = rt
        app.state.ehr_clients = lambda: ehr_clients(rt)  # reconciliation jobs
        await record_target_modes(rt)
        # before the first delivery fails on it: an enabled target without its secret
        warn_unset_target_secrets(rt.profiles.current, rt.secrets)
        install_sighup_reload(rt)
        stop = asyncio.Event()
        task = None
        worker = None
        if with_worker:
            worker = build_worker(rt)
            app.state.worker = worker
            task = asyncio.create_task(worker.run(stop))
        log.info(
            "gateway.started",
            database=rt.engine.dialect.name,
            worker=with_worker,
            targets=[t.name for t in rt.profiles.current.enabled_targets()],
        )
        checkpoints = uploads = None
        if server_process:
            checkpoints = asyncio.create_task(run_checkpoints(rt.engine, stop))
            uploads = asyncio.create_task(sweep_stopped_uploads(rt, stop))
            validation.warm_up()  # compile the FHIR validators now, not in a first request
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            stop.set()
            await stop_reconciliations(rt)
            if checkpoints is not None:
                await checkpoints
            if uploads is not None:
                await uploads
            if task is not None:
                await task
            if worker is not None:
                await worker.aclose()
            if runtime is None:
                await rt.close()

    app = FastAPI(
        title="fhir-gateway",
        version=gateway.__version__,
        description=(
            "FHIR R4 interoperability gateway for telehealth. `/v1` errors are RFC 9457 "
            "problem details; `/fhir` errors are OperationOutcomes."
        ),
        lifespan=lifespan,
        # GATEWAY_DOCS: public, authenticated, off; the pages' assets are served from the
        # package (add_docs), never from a CDN
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs == "public" else None,
    )
    app.state.worker = None
    if settings.docs == "authenticated":
        add_authenticated_docs(app)
    elif settings.docs == "public":
        add_public_docs(app)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        if isinstance(exc, ForbiddenError | UnauthorizedError):
            await _audit_refusal(request, exc)
        return _render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default handler echoes the input (PHI): render problems without it.
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            problems.append(
                Problem(loc, str(err.get("type", "invalid")), str(err.get("msg", "invalid")))
            )
        return _render(request, UnprocessableError("the request is not valid", problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _render(request, NotFoundError("no such route"))
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        error = GatewayError(str(exc.detail), headers=headers)
        error.status = exc.status_code  # type: ignore[misc]
        error.slug = "http-error"  # type: ignore[misc]
        error.title = "HTTP error"  # type: ignore[misc]
        return _render(request, error)

    app.add_middleware(RequestGuardMiddleware)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        max_import_bytes=settings.max_import_bytes,
    )
    app.add_middleware(UnexpectedErrorMiddleware)
    app.include_router(ingest_router)
    app.include_router(events_router)
    app.include_router(cases_router)
    app.include_router(ops_cases_router)
    app.include_router(partners_router)
    app.include_router(hl7_router)
    app.include_router(subscribers_router)
    app.include_router(exceptions_router)
    app.include_router(patient_review_router)
    app.include_router(profiles_router)  # before fhir_router: /fhir/Questionnaire/{id}
    app.include_router(audit_router)  # before fhir_router: /fhir/AuditEvent is a search
    app.include_router(fhir_router)
    app.include_router(smart_router)
    app.include_router(ops_deliveries_router)
    app.include_router(ops_targets_router)
    app.include_router(imports_router)
    app.include_router(reconcile_router)
    app.include_router(jwks_router)
    if settings.console:
        install_console(app)

    @app.get("/healthz", tags=["ops"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="The database is reachable", responses={503: {}})
    async def readyz(request: Request) -> JSONResponse:
        rt: Runtime = request.app.state.runtime
        try:
            async with rt.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("readyz.database_unreachable", error_type=type(exc).__name__)
            return JSONResponse(
                {"status": "unavailable", "database": "unreachable"}, status_code=503
            )
        return JSONResponse({"status": "ok", "database": "ok"})

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


#: Swagger UI and ReDoc assets shipped by the ``fastapi-offline`` wheel, served at
#: :data:`DOCS_ASSETS`: ``/docs`` works in a browser that cannot reach the internet.
DOCS_ASSETS = "/docs-assets"


def _mount_docs_assets(app: FastAPI) -> None:
    import fastapi_offline
    from fastapi.staticfiles import StaticFiles

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(static)), name="docs-assets")


def _swagger(app: FastAPI) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{app.title} - docs",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
    )


def _redoc(app: FastAPI) -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        with_google_fonts=False,
    )


def add_public_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` for anyone (``GATEWAY_DOCS=public``), with
    their JavaScript and CSS served from the package at ``/docs-assets``."""
    _mount_docs_assets(app)

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return _swagger(app)

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _redoc(app)


def add_authenticated_docs(app: FastAPI) -> None:
    """``/openapi.json``, ``/docs`` and ``/redoc`` behind any valid API key
    (``GATEWAY_DOCS=authenticated``; 401 without one). A browser's Swagger UI cannot send
    the key when it fetches the document: read it with a client that can
    (``curl -H "Authorization: Bearer ..."``)."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(_principal: Annotated[Principal, Depends(authenticated)]) -> Any:
        return JSONResponse(app.openapi())

    _mount_docs_assets(app)

    @app.get("/docs", include_in_schema=False)
    async def swagger(_principal: Annotated[Principal, Depends(authenticated)]) -> Any:
        return _swagger(app)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(_principal: Annotated[Principal, Depends(authenticated)]) -> Any:
        return _redoc(app)


def create_app_from_env() -> FastAPI:
    """App factory for multi-process serving (``uvicorn --factory``): settings from the
    environment of each process."""
    from gateway.settings import load_settings

    return create_app(load_settings(), server_process=True)
