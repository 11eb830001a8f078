"""``GET /fhir/AuditEvent``: the audit trail as FHIR R4 AuditEvents (IHE BALP), searched
by ``patient``, ``agent``, ``date`` and ``action`` (scope ``audit:read``).

Its own module (the rest of ``/fhir`` search lives in :mod:`gateway.fhir.endpoints`);
registered before that router so ``/fhir/AuditEvent`` is not taken for a resource type.
Errors are OperationOutcomes. Reading the audit trail is audited too (an ``AuditEvent``
search entry with the query, without a patient).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from gateway.audit import fhir as audit_fhir
from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.errors import BadRequestError
from mappers.errors import Problem

router = APIRouter(prefix="/fhir", tags=["fhir"])

FHIR_JSON = "application/fhir+json"


def _int(value: str | None, name: str, problems: list[tuple[str, str]]) -> int | None:
    if value is None:
        return None
    # isascii: str.isdigit() is true for "²", which int() refuses (a 500)
    if not (value.isascii() and value.isdigit()) or len(value) > 7:
        problems.append((name, "must be a whole number"))
        return None
    return int(value)


@router.get(
    "/AuditEvent",
    summary="Search the audit trail (FHIR AuditEvent, IHE BALP)",
    responses={
        200: {"content": {FHIR_JSON: {"schema": {"type": "object"}}}},
        400: {},
        401: {},
        403: {},
    },
)
async def search_audit_events(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("audit:read"))],
    patient: Annotated[str | None, Query(description="Patient/<id> or <id>")] = None,
    agent: Annotated[
        str | None, Query(description="the agent: API client name, cli:<user>, worker")
    ] = None,
    date: Annotated[
        list[str] | None,
        Query(description="recorded time, FHIR date with prefix eq|ge|gt|le|lt; repeatable"),
    ] = None,
    action: Annotated[str | None, Query(description="C, R, U, D or E; comma for any")] = None,
    count: Annotated[
        str | None,
        Query(
            alias="_count",
            description="page size, 0..500",
            json_schema_extra={"pattern": "^0*([0-9]{1,2}|[1-4][0-9]{2}|500)$"},
        ),
    ] = None,
    offset: Annotated[
        str | None,
        Query(
            alias="_offset",
            description="entries to skip, at most 1000000",
            json_schema_extra={"pattern": "^0*([0-9]{1,6}|1000000)$"},
        ),
    ] = None,
) -> JSONResponse:
    """A ``searchset`` Bundle of AuditEvents, newest first, with ``self`` and ``next``
    links (https://hl7.org/fhir/R4/auditevent.html#search); 400 OperationOutcome naming
    each invalid parameter."""
    problems: list[tuple[str, str]] = []
    count_n, offset_n = _int(count, "_count", problems), _int(offset, "_offset", problems)
    try:
        query = audit_fhir.parse_query(
            patient=patient,
            agent=agent,
            dates=date or [],
            action=action,
            count=count_n,
            offset=offset_n,
        )
    except audit_fhir.AuditSearchError as exc:
        problems.extend(exc.problems)
    if problems:
        raise BadRequestError(
            "invalid search parameters",
            [Problem(name, "invalid_search_parameter", message) for name, message in problems],
            in_body=False,
        )
    rows, more = await audit_fhir.search(session, query)
    base = runtime.settings.public_base_url
    identifier_base = runtime.systems.base
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "_offset"]
    links = [{"relation": "self", "url": f"{base}/fhir/AuditEvent?{request.url.query}"}]
    if more:
        next_params = [*params, ("_offset", str(query.offset + query.count))]
        links.append(
            {"relation": "next", "url": f"{base}/fhir/AuditEvent?{urlencode(next_params)}"}
        )
    audit.record(
        session,
        action="search",
        entity_type="AuditEvent",
        entity_id="*",
        query=f"AuditEvent?{request.url.query}",
        detail={"results": len(rows)},
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [
            {
                "fullUrl": f"{base}/fhir/AuditEvent/{row.id}",
                "resource": audit_fhir.to_audit_event(
                    row, identifier_base=identifier_base, observer=base
                ),
                "search": {"mode": "match"},
            }
            for row in rows
        ],
    }
    return JSONResponse(bundle, media_type=FHIR_JSON)
