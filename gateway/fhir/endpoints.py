"""``/fhir``: the gateway as a FHIR R4 server for what it produced (JSON only).

* ``GET /fhir/metadata``: the CapabilityStatement (:mod:`gateway.fhir.capability`);
  ``GET /fhir/.well-known/smart-configuration`` (and at the root);
* ``GET /fhir/{type}?...``: search (:mod:`mappers.search`, :mod:`gateway.fhir.search`);
* ``GET /fhir/{type}/{id}``: read, with ``ETag`` and ``If-None-Match`` (304);
  ``/_history`` and ``/_history/{vid}``: history and vread;
* ``GET /fhir/Patient/{id}/$everything``: the patient compartment, paged.

``_format`` and ``Accept`` are negotiated: JSON (``application/fhir+json``,
``application/json``) or 406. Errors are OperationOutcomes (``application/fhir+json``).
Every read and search is audited (BALP). A client limited to programs sees nothing of
other programs' patients (404, left out of searches); a SMART token limited to resource
types (``system/Patient.rs``) reads only those (403).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts

import gateway
from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.errors import (
    BadRequestError,
    ForbiddenError,
    NotAcceptableError,
    NotFoundError,
    UnsupportedMediaTypeError,
)
from gateway.fhir import capability
from gateway.fhir import repository as fhir_repo
from gateway.fhir import search as fhir_search
from gateway.workflow.scoping import patient_visible
from mappers import search as fs
from mappers.errors import Problem
from mappers.normalize import to_fhir_instant

router = APIRouter(prefix="/fhir", tags=["fhir"])
#: ``/.well-known/smart-configuration`` at the root too (clients that strip the base).
well_known_router = APIRouter(tags=["fhir"])

FHIR_JSON = "application/fhir+json"

_JSON_TYPES = {
    "json": FHIR_JSON,
    "application/json": "application/json",
    "application/fhir+json": FHIR_JSON,
    "application/json+fhir": FHIR_JSON,
    "*/*": FHIR_JSON,
    "application/*": FHIR_JSON,
}

SearchType = StrEnum("SearchType", {t: t for t in fs.SEARCH_PARAMETERS})  # type: ignore[misc]

ResourceTypePath = Annotated[str, Path(pattern=r"^[A-Z][A-Za-z]{1,63}$")]
ResourceIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9\-\.]{1,64}$")]

FHIR_OK: dict[int | str, dict[str, Any]] = {
    200: {"content": {FHIR_JSON: {"schema": {"type": "object"}}}},
    401: {},
    403: {},
    406: {"description": "No format the client accepts (JSON only)"},
}


def media_type(request: Request) -> str:
    """The response's media type from ``_format`` (first) or ``Accept``
    (https://hl7.org/fhir/R4/http.html#mime-type).

    Raises:
        NotAcceptableError: 406, only XML, Turtle or another format asked for.
    """
    fmt = request.query_params.get("_format")
    if fmt is not None:
        kind = fmt.split(";")[0].strip().lower()
        if kind in _JSON_TYPES:
            return _JSON_TYPES[kind]
        raise NotAcceptableError("only JSON is served (_format=json)")
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return FHIR_JSON
    for item in accept.split(","):
        kind = item.split(";")[0].strip().lower()
        if kind in _JSON_TYPES:
            return _JSON_TYPES[kind]
    raise NotAcceptableError("only JSON is served (Accept: application/fhir+json)")


MediaType = Annotated[str, Depends(media_type)]


def _strict(request: Request) -> bool:
    """``Prefer: handling=strict`` (https://hl7.org/fhir/R4/search.html#errors)."""
    prefer = request.headers.get("prefer", "")
    return any(p.strip().replace(" ", "") == "handling=strict" for p in prefer.split(","))


def _fhir_base(request: Request) -> str:
    return f"{request.app.state.runtime.settings.public_base_url}/fhir"


def _check_type(principal: Principal, resource_type: str) -> None:
    if not principal.reads_type(resource_type):
        raise ForbiddenError(f"the token's scopes do not open {resource_type}")


def _http_date(at: datetime) -> str:
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _etag_matches(request: Request, version: int) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = {t.strip().removeprefix("W/").strip('"') for t in header.split(",")}
    return "*" in tags or str(version) in tags


# --------------------------------------------------------------------------- metadata


@router.get(
    "/metadata",
    summary="The CapabilityStatement (FHIR capabilities interaction)",
    responses={200: {"content": {FHIR_JSON: {"schema": {"type": "object"}}}}, 406: {}},
)
async def metadata(request: Request, runtime: RuntimeDep, fmt: MediaType) -> JSONResponse:
    """``GET [base]/metadata`` (https://hl7.org/fhir/R4/http.html#capabilities): what this
    server serves, built from its routes and search parameters; public, as FHIR
    clients read it before they authenticate."""
    routes = [
        (context.path_format or "", method)
        for context in iter_route_contexts(request.app.routes)
        for method in context.methods or ()
    ]
    base = runtime.settings.public_base_url
    statement = capability.capability_statement(
        routes,
        base_url=f"{base}/fhir",
        token_url=f"{base}/oauth/token",
        software_version=gateway.__version__,
        date=to_fhir_instant(datetime.now(UTC)),
    )
    return JSONResponse(statement, media_type=fmt)


def _smart(runtime: Any) -> JSONResponse:
    base = runtime.settings.public_base_url
    body = capability.smart_configuration(
        token_url=f"{base}/oauth/token", jwks_uri=f"{base}/.well-known/jwks.json"
    )
    return JSONResponse(body, headers={"Cache-Control": "max-age=3600"})


_SMART_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"schema": {"type": "object"}}}}
}


@router.get(
    "/.well-known/smart-configuration",
    summary="SMART configuration (token endpoint, Backend Services)",
    responses=_SMART_DOC,
)
async def smart_configuration(runtime: RuntimeDep) -> JSONResponse:
    """SMART App Launch 2.x configuration
    (https://hl7.org/fhir/smart-app-launch/conformance.html), public."""
    return _smart(runtime)


@well_known_router.get(
    "/.well-known/smart-configuration",
    summary="SMART configuration (token endpoint, Backend Services)",
    responses=_SMART_DOC,
)
async def smart_configuration_root(runtime: RuntimeDep) -> JSONResponse:
    """The same SMART configuration at the server's root."""
    return _smart(runtime)


# --------------------------------------------------------------------------- search


@router.get(
    "/{resource_type}/_search",
    summary="Search (FHIR search-type interaction, the _search form of GET)",
    description="The same search as `GET /fhir/{resource_type}`.",
    responses={**FHIR_OK, 400: {"description": "A parameter that cannot be read"}},
)
@router.get(
    "/{resource_type}",
    summary="Search (FHIR search-type interaction)",
    description=(
        "Search parameters and result parameters as listed in `GET /fhir/metadata` "
        "(FHIR R4 search: https://hl7.org/fhir/R4/search.html). Unknown parameters are "
        "ignored and left out of the self link, or a 400 OperationOutcome with "
        "`Prefer: handling=strict`."
    ),
    responses={**FHIR_OK, 400: {"description": "A parameter that cannot be read"}},
)
async def search(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("fhir:read"))],
    resource_type: SearchType,
    fmt: MediaType,
) -> JSONResponse:
    """``GET [base]/[type]?params``: a ``searchset`` Bundle with ``total``, paging links
    (``_count``, ``_offset``) and ``search.mode``; 400 OperationOutcome naming each
    parameter that cannot be read (or is unknown, with ``Prefer: handling=strict``)."""
    items = request.query_params.multi_items()
    return await _search(request, session, principal, str(resource_type.value), items, fmt)


@router.post(
    "/{resource_type}/_search",
    summary="Search with a form body (FHIR search-type interaction, POST)",
    description=(
        "The parameters of `GET /fhir/{resource_type}` in an "
        "`application/x-www-form-urlencoded` body (and the query); "
        "https://hl7.org/fhir/R4/http.html#search"
    ),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "additionalProperties": {"type": "string"}}
                }
            },
        }
    },
    responses={
        **FHIR_OK,
        400: {"description": "A parameter that cannot be read"},
        415: {"description": "Not a form body"},
    },
)
async def search_post(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("fhir:read"))],
    resource_type: SearchType,
    fmt: MediaType,
) -> JSONResponse:
    """``POST [base]/[type]/_search``: the same search, its parameters in a form body
    (added to those of the query); 415 for another body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if raw and content_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaTypeError("a search body is application/x-www-form-urlencoded")
    try:
        form = parse_qsl(raw.decode(), keep_blank_values=True)
    except UnicodeDecodeError as exc:
        raise BadRequestError("the form is not UTF-8", in_body=False) from exc
    if any("\x00" in k or "\x00" in v for k, v in form):
        raise BadRequestError("the form holds a NUL character", in_body=False)
    items = [*request.query_params.multi_items(), *form]
    return await _search(request, session, principal, str(resource_type.value), items, fmt)


async def _search(
    request: Request,
    session: SessionDep,
    principal: Principal,
    rtype: str,
    items: list[tuple[str, str]],
    fmt: str,
) -> JSONResponse:
    _check_type(principal, rtype)
    try:
        query = fs.parse_search(rtype, items, strict=_strict(request))
    except fs.SearchError as exc:
        raise BadRequestError(
            "invalid search parameters",
            [Problem(name, "invalid_search_parameter", message) for name, message in exc.problems],
            in_body=False,
        ) from exc
    for include in query.revincludes:
        _check_type(principal, include.source)
    base = _fhir_base(request)
    result = await fhir_search.run_search(session, query, principal=principal, base_url=base)
    result.included = [r for r in result.included if principal.reads_type(r.resource_type)]
    fhir_search.audit_search(
        session, resource_type=rtype, query_text=f"{rtype}?{urlencode(items)}", result=result
    )
    bundle = fhir_search.searchset(query, result, base_url=base, path=rtype)
    return JSONResponse(bundle, media_type=fmt)


# --------------------------------------------------------------------------- $everything


@router.get(
    "/Patient/{patient_id}/$everything",
    summary="Everything of a patient (Patient $everything), paged",
    responses={**FHIR_OK, 400: {}, 404: {}},
)
async def everything(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("fhir:read"))],
    patient_id: ResourceIdPath,
    fmt: MediaType,
) -> JSONResponse:
    """``GET [base]/Patient/[id]/$everything``
    (https://hl7.org/fhir/R4/patient-operation-everything.html): the Patient and every
    resource the gateway holds for it, in a ``searchset`` Bundle paged with ``_count``
    and ``_offset``; ``_since`` (instant) and ``_type`` (comma list) narrow it. Resource
    types the caller's token does not open are left out."""
    _check_type(principal, "Patient")
    problems: list[tuple[str, str]] = []
    params = request.query_params
    count = fs.DEFAULT_COUNT
    offset = 0
    since: datetime | None = None
    types: set[str] | None = None
    for name, value in params.multi_items():
        if name == "_count":
            count = _whole(value, name, fs.MAX_COUNT, problems)
        elif name == "_offset":
            offset = _whole(value, name, fs.MAX_OFFSET, problems)
        elif name == "_since":
            try:
                since = fs.date_range(value)[0]
            except ValueError:
                problems.append((name, "a FHIR instant"))
        elif name == "_type":
            types = {t.strip() for t in value.split(",") if t.strip()}
        elif name not in ("_format", "_pretty") and _strict(request):
            problems.append((name, "not a parameter of $everything"))
    if problems:
        raise BadRequestError(
            "invalid parameters",
            [Problem(n, "invalid_parameter", m) for n, m in problems],
            in_body=False,
        )
    patient = await fhir_repo.get_resource(session, "Patient", patient_id)
    if patient is None or not await patient_visible(session, principal, patient_id):
        raise NotFoundError(f"Patient/{patient_id} is not known")
    rows = await fhir_repo.patient_compartment(session, patient_id, since=_naive(since))
    rows = [
        r
        for r in rows
        if principal.reads_type(r.resource_type) and (types is None or r.resource_type in types)
    ]
    query = fs.SearchQuery("Patient", count=count, offset=offset)
    result = fhir_search.SearchResult(rows[offset : offset + count], len(rows))
    base = _fhir_base(request)
    bundle = fhir_search.searchset(
        query, result, base_url=base, path=f"Patient/{patient_id}/$everything"
    )
    extra = [(k, v) for k, v in params.multi_items() if k in ("_since", "_type")]
    if extra:
        suffix = "&" + urlencode(extra)
        for link in bundle["link"]:
            link["url"] += suffix
    fhir_search.audit_search(
        session,
        resource_type="Patient",
        query_text=f"Patient/{patient_id}/$everything?{request.url.query}",
        result=result,
    )
    return JSONResponse(bundle, media_type=fmt)


def _whole(value: str, name: str, limit: int, problems: list[tuple[str, str]]) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 7 or int(value) > limit:
        problems.append((name, f"a whole number from 0 to {limit}"))
        return 0
    return int(value)


def _naive(at: datetime | None) -> datetime | None:
    """``at`` in UTC (the column type refuses naive times)."""
    return at.astimezone(UTC) if at is not None else None


# --------------------------------------------------------------------------- read


async def _visible_row(
    session: SessionDep, principal: Principal, resource_type: str, resource_id: str
) -> Any:
    _check_type(principal, resource_type)
    row = await fhir_repo.get_resource(session, resource_type, resource_id)
    if row is not None and principal.programs is not None:
        patient = row.patient_id or (row.id if row.resource_type == "Patient" else None)
        if not await patient_visible(session, principal, patient):
            row = None
    if row is None:
        raise NotFoundError(f"{resource_type}/{resource_id} is not known")
    return row


@router.get(
    "/{resource_type}/{resource_id}/_history",
    summary="The versions of a resource (FHIR history-instance interaction)",
    responses={**FHIR_OK, 404: {}},
)
async def history(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("fhir:read"))],
    resource_type: ResourceTypePath,
    resource_id: ResourceIdPath,
    fmt: MediaType,
) -> JSONResponse:
    """``GET [base]/[type]/[id]/_history`` (https://hl7.org/fhir/R4/http.html#history): a
    ``history`` Bundle, newest version first; 404 OperationOutcome when unknown."""
    row = await _visible_row(session, principal, resource_type, resource_id)
    versions = await fhir_repo.history(session, resource_type, resource_id)
    base = _fhir_base(request)
    entries = []
    for version, resource, at in versions:
        entries.append(
            {
                "fullUrl": f"{base}/{resource_type}/{resource_id}",
                "resource": resource,
                "request": {
                    "method": "POST" if version == 1 else "PUT",
                    "url": resource_type if version == 1 else f"{resource_type}/{resource_id}",
                },
                "response": {
                    "status": "201 Created" if version == 1 else "200 OK",
                    "etag": f'W/"{version}"',
                    "lastModified": to_fhir_instant(at if at.tzinfo else at.replace(tzinfo=UTC)),
                },
            }
        )
    audit.record(
        session,
        action="read",
        entity_type=resource_type,
        entity_id=resource_id,
        patient_id=row.patient_id or (resource_id if resource_type == "Patient" else None),
        detail={"versions": len(versions)},
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{base}/{resource_type}/{resource_id}/_history"}],
        "entry": entries,
    }
    return JSONResponse(bundle, media_type=fmt)


@router.get(
    "/{resource_type}/{resource_id}/_history/{version_id}",
    summary="Read one version of a resource (FHIR vread interaction)",
    responses={**FHIR_OK, 304: {"description": "If-None-Match names this version"}, 404: {}},
)
async def vread(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("fhir:read"))],
    resource_type: ResourceTypePath,
    resource_id: ResourceIdPath,
    version_id: Annotated[str, Path(pattern=r"^[0-9]{1,9}$")],
    fmt: MediaType,
) -> Response:
    """``GET [base]/[type]/[id]/_history/[vid]`` (https://hl7.org/fhir/R4/http.html#vread):
    that version with its ``ETag``; 404 OperationOutcome when unknown."""
    row = await _visible_row(session, principal, resource_type, resource_id)
    found = await fhir_repo.get_version(session, resource_type, resource_id, int(version_id))
    if found is None:
        raise NotFoundError(f"{resource_type}/{resource_id} has no version {int(version_id)}")
    _, resource, at = found
    headers = {"ETag": f'W/"{int(version_id)}"', "Last-Modified": _http_date(at)}
    audit.record(
        session,
        action="read",
        entity_type=resource_type,
        entity_id=resource_id,
        patient_id=row.patient_id or (resource_id if resource_type == "Patient" else None),
        detail={"version": int(version_id)},
    )
    if _etag_matches(request, int(version_id)):
        return Response(status_code=304, headers=headers)
    return JSONResponse(resource, media_type=fmt, headers=headers)


@router.get(
    "/{resource_type}/{resource_id}",
    summary="Read a resource (FHIR read interaction)",
    responses={**FHIR_OK, 304: {"description": "If-None-Match names the current version"}, 404: {}},
)
async def read_resource(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("fhir:read"))],
    resource_type: ResourceTypePath,
    resource_id: ResourceIdPath,
    fmt: MediaType,
) -> Response:
    """``GET [base]/[type]/[id]`` (https://hl7.org/fhir/R4/http.html#read): the current
    version, with ``ETag: W/"<versionId>"`` and ``Last-Modified``; 304 without a body when
    ``If-None-Match`` names that version; 404 OperationOutcome when absent, or of a
    patient with no case in the programs the caller's client is limited to
    (``clients create --program``). Audited (BALP read, with the Patient it belongs
    to)."""
    row = await _visible_row(session, principal, resource_type, resource_id)
    audit.record(
        session,
        action="read",
        entity_type=resource_type,
        entity_id=resource_id,
        patient_id=row.patient_id or (resource_id if resource_type == "Patient" else None),
    )
    headers = {"ETag": f'W/"{row.version_id}"', "Last-Modified": _http_date(row.updated_at)}
    if _etag_matches(request, row.version_id):
        return Response(status_code=304, headers=headers)
    return JSONResponse(row.resource, media_type=fmt, headers=headers)
