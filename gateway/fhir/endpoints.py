"""``/fhir``: read access to the resources the gateway produced (R4 JSON).

Errors are OperationOutcomes (``application/fhir+json``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.deps import SessionDep, require_scope
from gateway.errors import NotFoundError
from gateway.fhir import repository as fhir_repo
from gateway.workflow.scoping import patient_visible

router = APIRouter(prefix="/fhir", tags=["fhir"])

FHIR_JSON = "application/fhir+json"


@router.get(
    "/{resource_type}/{resource_id}",
    summary="Read a resource (FHIR read interaction)",
    responses={
        200: {"content": {"application/fhir+json": {"schema": {"type": "object"}}}},
        401: {},
        403: {},
        404: {},
    },
)
async def read_resource(
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_scope("fhir:read"))],
    resource_type: Annotated[str, Path(pattern=r"^[A-Z][A-Za-z]{1,63}$")],
    resource_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9\-\.]{1,64}$")],
) -> JSONResponse:
    """``GET [base]/[type]/[id]`` (https://hl7.org/fhir/R4/http.html#read): the current
    version, with ``ETag: W/"<versionId>"`` and ``Last-Modified``; 404 OperationOutcome
    when absent, or of a patient with no case in the programs the caller's client is
    limited to (``clients create --program``). Audited (BALP read, with the Patient it
    belongs to)."""
    row = await fhir_repo.get_resource(session, resource_type, resource_id)
    if row is not None and principal.programs is not None:
        patient = row.patient_id or (row.id if row.resource_type == "Patient" else None)
        if not await patient_visible(session, principal, patient):
            row = None
    if row is None:
        raise NotFoundError(f"{resource_type}/{resource_id} is not known")
    audit.record(
        session,
        action="read",
        entity_type=resource_type,
        entity_id=resource_id,
        patient_id=row.patient_id or (resource_id if resource_type == "Patient" else None),
    )
    return JSONResponse(
        row.resource,
        media_type=FHIR_JSON,
        headers={
            "ETag": f'W/"{row.version_id}"',
            "Last-Modified": row.updated_at.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        },
    )
