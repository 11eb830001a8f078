"""The console's record pages: cases (the timeline, resources, deliveries and the state
override) and the merge-review queue of probable duplicate Patients."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import and_, or_, select

from gateway.audit import service as audit
from gateway.console.auth import (
    checked_form,
)
from gateway.console.common import (
    OPERATOR,
    PAGE_SIZE,
    reason_of,
    record_view,
    redirect_to,
    render_page,
    staff_of,
)
from gateway.db.models import (
    Case,
    CaseEvent,
    Delivery,
    FhirResource,
)
from gateway.db.types import utcnow
from gateway.deps import RowIdPath, RuntimeDep, SessionDep
from gateway.errors import GatewayError
from gateway.patients import review as reviews
from gateway.triage import reviews as decisions
from gateway.workflow.override import override_state

router = APIRouter(prefix="/console", include_in_schema=False)

# --------------------------------------------------------------------------- cases


@router.get("/cases", response_class=HTMLResponse)
async def cases_page(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    before: Annotated[datetime | None, Query()] = None,
    after_case: Annotated[str | None, Query(max_length=64)] = None,
) -> HTMLResponse:
    """Cases, newest first, by state and SLA; paged by cursor (``before``, ``after_case``:
    the opening time and id of the last case shown)."""
    staff = await staff_of(request, session, runtime)
    state = request.query_params.get("state") or ""
    overdue = request.query_params.get("overdue") == "1"
    now = utcnow()
    stmt = select(Case).order_by(Case.opened_at.desc(), Case.id).limit(PAGE_SIZE + 1)
    if state:
        stmt = stmt.where(Case.state == state)
    if overdue:
        stmt = stmt.where(Case.sla_due_at <= now)
    if before is not None:
        stmt = stmt.where(
            or_(
                Case.opened_at < before,
                and_(Case.opened_at == before, Case.id > (after_case or "")),
            )
        )
    rows = list(await session.scalars(stmt))
    page = rows[:PAGE_SIZE]
    record_view(session, "cases", state=state, overdue=overdue or None)
    next_query = (
        urlencode(
            {
                **({"state": state} if state else {}),
                **({"overdue": "1"} if overdue else {}),
                "before": page[-1].opened_at.isoformat(),
                "after_case": page[-1].id,
            }
        )
        if len(rows) > PAGE_SIZE and page
        else None
    )
    workflow = runtime.profiles.current.workflow_or_raise
    return render_page(
        request,
        "cases.html",
        staff,
        rows=page,
        states=workflow.states,
        state=state,
        overdue=overdue,
        next_query=next_query,
    )


@router.get("/cases/{case_id}", response_class=HTMLResponse)
async def case_page(
    case_id: str, request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """A case: state and SLA, its timeline (source, time, principal), the FHIR resources
    of its messages with their versions, each target's delivery status, and the
    override form."""
    staff = await staff_of(request, session, runtime)
    case = await session.get(Case, case_id[:64])
    if case is None:
        record_view(session, "case-not-found")
        return render_page(request, "not_found.html", staff, status_code=404, what="case")
    events = list(
        await session.scalars(
            select(CaseEvent)
            .where(CaseEvent.case_id == case.id)
            .order_by(CaseEvent.occurred_at, CaseEvent.id)
        )
    )
    message_ids = sorted({e.inbound_message_id for e in events if e.inbound_message_id})
    resources = list(
        await session.scalars(
            select(FhirResource)
            .where(FhirResource.patient_id == case.patient_id)
            .order_by(FhirResource.resource_type, FhirResource.id)
            .limit(200)
        )
    )
    conditions = [Delivery.ordering_key.in_([case.id, case.patient_id])]
    if message_ids:
        conditions.append(Delivery.inbound_message_id.in_(message_ids))
    deliveries = list(
        await session.scalars(
            select(Delivery).where(or_(*conditions)).order_by(Delivery.id.desc()).limit(200)
        )
    )
    audit.record(
        session, action="read", entity_type="Case", entity_id=case.id, patient_id=case.patient_id
    )
    workflow = runtime.profiles.current.workflow_or_raise
    return render_page(
        request,
        "case.html",
        staff,
        case=case,
        events=events,
        resources=resources,
        deliveries=deliveries,
        states=[s for s in workflow.states if s != case.state],
        overdue=case.sla_due_at is not None and case.sla_due_at <= utcnow(),
    )


@router.post("/cases/{case_id}/override")
async def case_override(
    case_id: str, request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Move the case to another state by hand, with a reason (``operator``)."""
    staff = await staff_of(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    back = f"/console/cases/{case_id}"
    case = await session.get(Case, case_id[:64])
    if case is None:
        return redirect_to("/console/cases", error="no such case")
    reason = reason_of(form)
    if not reason:
        return redirect_to(back, notice="reason-needed")
    from gateway.subscribers.service import enqueue_case_webhook

    try:
        await override_state(
            session,
            runtime.profiles.current.workflow_or_raise,
            case,
            to_state=str(form.get("state") or ""),
            reason=reason,
            by=staff.actor_name,
            now=runtime.clock.now(),
            notify=enqueue_case_webhook,
        )
    except GatewayError as exc:
        await session.rollback()
        problems = "; ".join(p.message for p in exc.problems) if exc.problems else ""
        return redirect_to(back, error=f"{exc.detail}: {problems}" if problems else exc.detail)
    return redirect_to(back, notice="overridden")


# --------------------------------------------------------------------------- duplicates


@router.get("/duplicates", response_class=HTMLResponse)
async def duplicates_page(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    after_id: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> HTMLResponse:
    """The patient merge-review queue: probable duplicates with their score, its parts
    and each patient's recorded element conflicts (never values); accept (merge) or
    reject with a reason. Oldest first, paged by cursor (``after_id``)."""
    staff = await staff_of(request, session, runtime)
    rows = await reviews.list_reviews(
        session, status="open", limit=PAGE_SIZE + 1, after_id=after_id
    )
    page = rows[:PAGE_SIZE]
    ids = sorted({p for r in page for p in (r.patient_id, r.candidate_id)})
    conflicts = await reviews.conflicts_of(session, ids)
    audit.record_patients(
        session,
        action="read",
        entity_type="PatientReview",
        hits=[(str(r.id), p) for r in page for p in (r.patient_id, r.candidate_id)],
    )
    return render_page(
        request,
        "duplicates.html",
        staff,
        rows=page,
        conflicts=conflicts,
        next_query=urlencode({"after_id": page[-1].id}) if len(rows) > PAGE_SIZE else None,
    )


@router.post("/duplicates/{review_id}/{action}")
async def duplicate_decide(
    review_id: RowIdPath, action: str, request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Accept (merge, ``survivor`` chooses who survives) or reject a probable duplicate,
    with a reason (``operator``)."""
    staff = await staff_of(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    reason = reason_of(form)
    if not reason:
        return redirect_to("/console/duplicates", notice="reason-needed")
    if action not in ("accept", "reject"):
        return redirect_to("/console/duplicates", error="no such action")
    try:
        row = await decisions.open_review_or_raise(session, review_id)
        if action == "accept":
            await decisions.accept_review(
                session,
                row,
                profiles=runtime.profiles.current,
                survivor_id=str(form.get("survivor") or "") or None,
                reason=reason,
                by=staff.actor_name,
            )
        else:
            decisions.reject_review(session, row, reason=reason, by=staff.actor_name)
    except GatewayError as exc:
        await session.rollback()
        return redirect_to("/console/duplicates", error=exc.detail)
    worker = getattr(request.app.state, "worker", None)
    if worker is not None and action == "accept":
        worker.wake()
    return redirect_to("/console/duplicates", notice="merged" if action == "accept" else "not-same")
