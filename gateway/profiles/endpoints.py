"""Profile routes: preview (``profiles:write``), reload (``ops:admin``), and the published
Questionnaires under ``/fhir`` (``fhir:read``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse

from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.delivery.shadow import audit_target_modes
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.errors import NotFoundError
from gateway.profiles import service
from gateway.profiles.schemas import PreviewRequest, PreviewResponse, ReloadResponse

router = APIRouter(tags=["profiles"])

FHIR_JSON = "application/fhir+json"


@router.post(
    "/v1/profiles/preview",
    response_model=PreviewResponse,
    summary="The FHIR the gateway would produce for a payload (writes nothing)",
)
async def preview(
    body: PreviewRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("profiles:write"))],
) -> JSONResponse:
    """Map ``input`` with the running profiles, or with the draft ``profile`` (YAML) in
    place of the deployed profile with the same key, and validate every resource.

    200 with ``valid: false`` and the issues when the input does not map or the FHIR does
    not validate; 422 when the draft profile itself has problems (file, line, path).
    Nothing is stored and no patient is matched (the Patient is shown as new).
    """
    draft = body.profile.encode() if body.profile is not None else None
    result = service.preview_payload(runtime, body.input, draft=draft, kind=body.kind)
    audit.record(  # PHI in, FHIR out: audited, with no patient (none is matched)
        session,
        action="preview",
        entity_type="Profile",
        entity_id=str(body.kind or "auto"),
        detail={"draft": body.profile is not None},
    )
    return JSONResponse(service.preview_body(result))


@router.post(
    "/v1/ops/profiles/reload",
    response_model=ReloadResponse,
    summary="Load the profiles again (an invalid set is refused; the running one stays)",
)
async def reload(
    runtime: RuntimeDep,
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> JSONResponse:
    """Reload this process's profiles (SIGHUP does the same). With several processes,
    reload each (or send SIGHUP to each). A change of an EHR target's ``mode``
    (``shadow`` -> ``live``) is recorded in the audit trail."""
    result = service.reload_profiles(runtime)
    await audit_target_modes(session, runtime.profiles.current)
    return JSONResponse(result.as_dict())


@router.get("/fhir/Questionnaire", summary="Search the published Questionnaires")
async def search_questionnaires(
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("fhir:read"))],
    url: Annotated[str | None, Query(max_length=1024)] = None,
    version: Annotated[str | None, Query(max_length=64)] = None,
) -> JSONResponse:
    """``GET [base]/Questionnaire?url=&version=`` (https://hl7.org/fhir/R4/search.html):
    a ``searchset`` Bundle of the Questionnaires the intake profiles publish; ``url`` may
    be a ``url|version`` canonical."""
    found = service.questionnaires(runtime.profiles.current, url=url, version=version)
    bundle = service.searchset(found, runtime.settings.public_base_url)
    return JSONResponse(bundle, media_type=FHIR_JSON)


@router.get("/fhir/Questionnaire/{questionnaire_id}", summary="Read a published Questionnaire")
async def read_questionnaire(
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("fhir:read"))],
    questionnaire_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9\-\.]{1,64}$")],
) -> JSONResponse:
    """``GET [base]/Questionnaire/<profile id>-<version>``; 404 OperationOutcome if unknown."""
    for q in service.questionnaires(runtime.profiles.current):
        if q["id"] == questionnaire_id:
            return JSONResponse(q, media_type=FHIR_JSON)
    raise NotFoundError(f"Questionnaire/{questionnaire_id} is not known")
