"""``POST /v1/cases/{case_id}/override``: a manual state override with a reason.

The route of the console's override (:mod:`gateway.workflow.override` does the work):
``ops:admin``; checked against the workflow, or marked as an override outside it;
recorded in the case history and the audit trail; subscribers get ``case.state_changed``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from gateway.clients.service import Principal
from gateway.db.models import Case
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.errors import NotFoundError
from gateway.subscribers.service import enqueue_case_webhook
from gateway.workflow.override import override_state

router = APIRouter(prefix="/v1", tags=["cases"])


class OverrideIn(BaseModel):
    """The state to move the case to, and why (required; no PHI please)."""

    model_config = ConfigDict(extra="forbid")

    state: str = Field(max_length=64, pattern=r"^[a-z0-9_]+$", examples=["in_review"])
    reason: str = Field(
        min_length=1, max_length=1000, pattern=r"^[^\x00]*\S[^\x00]*$", examples=["EHR outage"]
    )


class OverrideOut(BaseModel):
    """What the override did (``within_workflow``: some transition allows the move)."""

    case_id: str
    from_state: str
    to_state: str
    within_workflow: bool


@router.post(
    "/cases/{case_id}/override",
    response_model=OverrideOut,
    summary="Override a case's state by hand, with a reason",
    responses={404: {}, 422: {}},
)
async def override_case(
    case_id: Annotated[str, Path(max_length=64, pattern=r"^[^\x00]+$")],
    body: OverrideIn,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
) -> OverrideOut:
    """Move the case to ``state`` (404 for an unknown case or one of a program the
    client does not see; 422 for an unknown state, the state it is in, or no reason)."""
    case = await session.get(Case, case_id)
    if case is None or not principal.sees_program(case.program):
        raise NotFoundError("no such case")
    result = await override_state(
        session,
        runtime.profiles.current.workflow_or_raise,
        case,
        to_state=body.state,
        reason=body.reason,
        by=f"client:{principal.name}",
        now=runtime.clock.now(),
        notify=enqueue_case_webhook,
    )
    return OverrideOut(
        case_id=result.case_id,
        from_state=result.from_state,
        to_state=result.to_state,
        within_workflow=result.within_workflow,
    )
