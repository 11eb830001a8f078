"""The console's queue pages: the overview, the exceptions queue and the dead letters
(with the re-map preview before a replay)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import false, func, not_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.console.auth import (
    ConsoleForbiddenError,
    Staff,
    checked_form,
)
from gateway.console.common import (
    OPERATOR,
    PAGE_SIZE,
    reason_of,
    record_view,
    redirect_to,
    render_page,
    safe_next,
    staff_of,
)
from gateway.db.models import (
    Case,
    Delivery,
    DeliveryStatus,
    ExceptionRecord,
    ExceptionStatus,
)
from gateway.db.types import utcnow
from gateway.delivery import ops_repository as delivery_repo
from gateway.delivery.service import (
    replay_deliveries,
    target_health,
)
from gateway.deps import RowIdPath, RuntimeDep, SessionDep
from gateway.errors import GatewayError
from gateway.events.after_response import apply_after_response, apply_id_after_response
from gateway.ingest.remap import remap_message
from gateway.ingest.storage import IngestContext
from gateway.runtime import Runtime
from gateway.triage import service as triage
from gateway.workflow.timers import exceptions_past_sla
from mappers.workflow import exception_due_at

router = APIRouter(prefix="/console", include_in_schema=False)

# --------------------------------------------------------------------------- overview


@router.get("", response_class=HTMLResponse)
async def overview(request: Request, session: SessionDep, runtime: RuntimeDep) -> HTMLResponse:
    """Per target: queue, oldest pending, dead letters, circuit, token, pause and
    deliveries per minute; open exceptions by kind; cases past their SLA."""
    staff = await staff_of(request, session, runtime)
    now = utcnow()
    health = await target_health(session, profiles=runtime.profiles.current, now=now)
    since = now - timedelta(minutes=5)
    rates = {
        (k, t): n / 5
        for k, t, n in await session.execute(
            select(Delivery.kind, Delivery.target, func.count())
            .where(Delivery.status == DeliveryStatus.DELIVERED, Delivery.delivered_at >= since)
            .group_by(Delivery.kind, Delivery.target)
        )
    }
    sparkline = await _hourly_deliveries(session, now=now)
    by_kind = [
        {"kind": kind, "count": count, "oldest": oldest}
        for kind, count, oldest in await session.execute(
            select(ExceptionRecord.kind, func.count(), func.min(ExceptionRecord.created_at))
            .where(ExceptionRecord.status == ExceptionStatus.OPEN)
            .group_by(ExceptionRecord.kind)
            .order_by(func.count().desc())
        )
    ]
    breaching = list(
        await session.scalars(
            select(Case).where(Case.sla_due_at <= now).order_by(Case.sla_due_at).limit(20)
        )
    )
    record_view(session, "overview")
    return render_page(
        request,
        "overview.html",
        staff,
        health=health,
        rates=rates,
        by_kind=by_kind,
        breaching=breaching,
        sparkline=sparkline,
        refresh_s=30,
    )


async def _hourly_deliveries(session: AsyncSession, *, now: datetime) -> dict[str, Any]:
    """Deliveries per hour over the last 24 hours (oldest first), as the bars of an SVG
    sparkline: ``{"counts", "total", "max", "bars": [(x, y, height, label)]}``."""
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    if session.get_bind().dialect.name == "postgresql":
        hour = func.to_char(func.timezone("UTC", Delivery.delivered_at), "YYYY-MM-DD HH24")
    else:
        hour = func.strftime("%Y-%m-%d %H", Delivery.delivered_at)
    found = {
        key: n
        for key, n in await session.execute(
            select(hour, func.count())
            .where(Delivery.status == DeliveryStatus.DELIVERED, Delivery.delivered_at >= start)
            .group_by(hour)
        )
    }
    hours = [start + timedelta(hours=i) for i in range(24)]
    counts = [int(found.get(h.strftime("%Y-%m-%d %H"), 0)) for h in hours]
    top = max(counts) or 1
    bars = []
    for i, (h, c) in enumerate(zip(hours, counts, strict=True)):
        height = max(1, round(38 * c / top))
        bars.append((i * 10, 40 - height, height, f"{h.strftime('%H:00')} UTC: {c}"))
    return {"counts": counts, "total": sum(counts), "max": max(counts), "bars": bars}


# --------------------------------------------------------------------------- exceptions


def _exception_filters(request: Request) -> dict[str, str]:
    keys = ("status", "kind", "sender", "owner", "older_than_h", "sla")
    return {k: request.query_params.get(k, "") for k in keys}


@router.get("/exceptions", response_class=HTMLResponse)
async def exceptions_page(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    before_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> HTMLResponse:
    """The exceptions queue: filters, owners, single and bulk actions, newest first,
    paged by cursor (``before_id``)."""
    staff = await staff_of(request, session, runtime)
    f = _exception_filters(request)
    status = f["status"] or ExceptionStatus.OPEN
    stmt = select(ExceptionRecord).order_by(ExceptionRecord.id.desc()).limit(PAGE_SIZE + 1)
    if status != "all":
        stmt = stmt.where(ExceptionRecord.status == status)
    if f["kind"]:
        stmt = stmt.where(ExceptionRecord.kind == f["kind"])
    if f["sender"]:
        stmt = stmt.where(ExceptionRecord.sender == f["sender"])
    owner = f["owner"]
    if owner == "me":
        stmt = stmt.where(ExceptionRecord.assigned_to == staff.username)
    elif owner == "-":
        stmt = stmt.where(ExceptionRecord.assigned_to.is_(None))
    elif owner:
        stmt = stmt.where(ExceptionRecord.assigned_to == owner)
    if f["older_than_h"].isdigit():
        stmt = stmt.where(
            ExceptionRecord.created_at <= utcnow() - timedelta(hours=int(f["older_than_h"]))
        )
    workflow = runtime.profiles.current.workflow_or_raise
    now = utcnow()
    if f["sla"] in ("overdue", "ok"):
        late = exceptions_past_sla(workflow, now=now)
        if late is None:
            stmt = stmt.where(false()) if f["sla"] == "overdue" else stmt
        else:
            stmt = stmt.where(late if f["sla"] == "overdue" else not_(late))
    if before_id is not None:
        stmt = stmt.where(ExceptionRecord.id < before_id)
    rows = list(await session.scalars(stmt))
    page, more = rows[:PAGE_SIZE], len(rows) > PAGE_SIZE
    due = {r.id: exception_due_at(workflow, kind=r.kind, created_at=r.created_at) for r in page}
    channels = await triage.message_channels(session, page)
    kinds = list(await session.scalars(select(ExceptionRecord.kind).distinct()))
    record_view(session, "exceptions", **f)
    next_query = (
        urlencode({**{k: v for k, v in f.items() if v}, "before_id": page[-1].id})
        if (more and page)
        else None
    )
    return render_page(
        request,
        "exceptions.html",
        staff,
        rows=page,
        retryable={
            r.id: triage.retryable(r, channels.get(r.inbound_message_id or "")) for r in page
        },
        filters={**f, "status": status},
        due=due,
        kinds=sorted(kinds),
        next_query=next_query,
    )


@router.get("/exceptions/{exception_id}", response_class=HTMLResponse)
async def exception_page(
    exception_id: RowIdPath, request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """One exception: its problems (codes and fields, never values), owner and actions."""
    staff = await staff_of(request, session, runtime)
    row = await triage.get_exception_or_raise(session, exception_id)
    channels = await triage.message_channels(session, [row])
    audit.record(
        session,
        action="view",
        entity_type="Exception",
        entity_id=str(row.id),
        patient_id=await triage.patient_of(session, row),
    )
    workflow = runtime.profiles.current.workflow_or_raise
    return render_page(
        request,
        "exception.html",
        staff,
        row=row,
        due_at=exception_due_at(workflow, kind=row.kind, created_at=row.created_at),
        retryable=triage.retryable(row, channels.get(row.inbound_message_id or "")),
    )


def _ids(form: Any) -> list[int]:
    out = []
    for value in form.getlist("ids"):
        if str(value).isdigit() and 0 < int(value) < 2**63:
            out.append(int(value))
    return out[:500]


async def _act_on_exceptions(
    request: Request,
    session: AsyncSession,
    runtime: Runtime,
    background: BackgroundTasks,
    staff: Staff,
    *,
    ids: Sequence[int],
    action: str,
    reason: str,
    assignee: str | None,
) -> None:
    now = utcnow()
    for exception_id in ids:
        row = await triage.get_exception_or_raise(session, exception_id)
        if action == "assign":
            await triage.assign_exception(session, row, assignee=assignee, now=now)
        elif action == "resolve":
            await triage.resolve_exception(session, row, by=staff.actor_name, note=reason, now=now)
        elif action == "retry":
            result = await triage.retry_exception(
                session, runtime, row, by=staff.actor_name, note=reason, now=now
            )
            if result.reply is not None:
                background.add_task(apply_after_response, request, runtime, result.reply)
            elif result.message_id is not None:
                background.add_task(apply_id_after_response, request, runtime, result.message_id)


@router.post("/exceptions/act")
async def exceptions_act(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> Response:
    """Assign (to me or someone), resolve or retry one or many exceptions; resolve and
    retry need a reason. Fields: ``ids`` (repeated), ``action``, ``reason``,
    ``assignee``, ``back`` (the page to return to)."""
    staff = await staff_of(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    back = safe_next(str(form.get("back") or "/console/exceptions"))
    ids = _ids(form)
    action = str(form.get("action") or "")
    reason = reason_of(form)
    if not ids:
        return redirect_to(back, notice="nothing-selected")
    assignee: str | None = None
    if action == "assign-me":
        action, assignee = "assign", staff.username
    elif action == "assign":
        assignee = str(form.get("assignee") or "").strip()[:128] or None
    elif action in ("resolve", "retry"):
        if not reason:
            return redirect_to(back, notice="reason-needed")
    else:
        raise ConsoleForbiddenError("unknown action")
    try:
        await _act_on_exceptions(
            request,
            session,
            runtime,
            background,
            staff,
            ids=ids,
            action=action,
            reason=reason,
            assignee=assignee,
        )
    except GatewayError as exc:
        await session.rollback()
        return redirect_to(back, error=exc.detail)
    notice = {"assign": "assigned", "resolve": "resolved", "retry": "retried"}[action]
    return redirect_to(back, notice=notice)


# --------------------------------------------------------------------------- dead letters


def _issues(outcome: dict[str, Any] | None) -> list[dict[str, str]]:
    """An OperationOutcome's issues as rows: severity, code, details, diagnostics and
    where (http://hl7.org/fhir/R4/operationoutcome.html)."""
    if not isinstance(outcome, dict):
        return []
    rows = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details") or {}
        text = details.get("text") if isinstance(details, dict) else None
        if not text and isinstance(details, dict):
            codings = details.get("coding") or []
            text = ", ".join(
                str(c.get("display") or c.get("code")) for c in codings if isinstance(c, dict)
            )
        where = issue.get("expression") or issue.get("location") or []
        rows.append(
            {
                "severity": str(issue.get("severity") or ""),
                "code": str(issue.get("code") or ""),
                "details": str(text or ""),
                "diagnostics": str(issue.get("diagnostics") or ""),
                "where": ", ".join(str(w) for w in where) if isinstance(where, list) else "",
            }
        )
    return rows


@router.get("/dead-letters", response_class=HTMLResponse)
async def dead_letters_page(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    after_id: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> HTMLResponse:
    """Dead (or review) deliveries, oldest first, with the peer's OperationOutcome
    rendered; replay one or many. Paged by cursor (``after_id``)."""
    staff = await staff_of(request, session, runtime)
    status = request.query_params.get("status") or DeliveryStatus.DEAD
    if status not in (DeliveryStatus.DEAD, DeliveryStatus.REVIEW):
        status = DeliveryStatus.DEAD
    target = request.query_params.get("target") or None
    where = delivery_repo.DeliveryFilter(statuses=(status,), target=target)
    rows = await delivery_repo.list_deliveries(
        session, where=where, limit=PAGE_SIZE + 1, after_id=after_id
    )
    page = rows[:PAGE_SIZE]
    total = await delivery_repo.count_deliveries(session, where=where)
    record_view(session, "dead-letters", status=status, target=target)
    next_query = (
        urlencode(
            {"status": status, **({"target": target} if target else {}), "after_id": page[-1].id}
        )
        if len(rows) > PAGE_SIZE and page
        else None
    )
    return render_page(
        request,
        "dead_letters.html",
        staff,
        rows=page,
        total=total,
        issues={d.id: _issues(d.operation_outcome) for d in page},
        status=status,
        target=target or "",
        next_query=next_query,
    )


@router.post("/dead-letters/replay")
async def dead_letters_replay(
    request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Put the selected dead deliveries back in the queue (``ids``, repeated)."""
    staff = await staff_of(request, session, runtime)
    form = await checked_form(request, staff, role=OPERATOR)
    ids = _ids(form)
    if not ids:
        return redirect_to("/console/dead-letters", notice="nothing-selected")
    result = await replay_deliveries(
        session,
        actor=staff.actor_name,
        now=utcnow(),
        profiles=runtime.profiles.current,
        ids=ids,
    )
    worker = getattr(request.app.state, "worker", None)
    if worker is not None and result.replayed:
        worker.wake()
    return redirect_to("/console/dead-letters", notice="replayed")


async def _dead_or_404(session: AsyncSession, delivery_id: int) -> Delivery | None:
    row = await delivery_repo.get_delivery(session, delivery_id)
    if row is None or row.status not in (DeliveryStatus.DEAD, DeliveryStatus.REVIEW):
        return None
    return row


@router.get("/dead-letters/{delivery_id}/preview", response_class=HTMLResponse)
async def remap_preview(
    delivery_id: RowIdPath, request: Request, session: SessionDep, runtime: RuntimeDep
) -> HTMLResponse:
    """Before replaying: the FHIR diff between what is stored for the delivery's message
    and what the current profiles make of it (``fhir-gateway profiles remap``, in the
    browser). Nothing is stored; the read is audited with the patient."""
    staff = await staff_of(request, session, runtime)
    row = await _dead_or_404(session, delivery_id)
    if row is None:
        record_view(session, "remap-preview-not-found")
        return render_page(request, "not_found.html", staff, status_code=404, what="dead letter")
    diff: list[str] = []
    problem: str | None = None
    profile: str | None = None
    if row.inbound_message_id is None:
        problem = "This delivery carries no stored message to map again (a webhook)."
    else:
        try:
            result = await remap_message(
                session,
                IngestContext.of(runtime),
                row.inbound_message_id,
                apply=False,
                actor=staff.actor_name,
            )
            diff, profile = result.diff, result.profile
        except GatewayError as exc:
            problem = exc.detail + (
                ": " + "; ".join(p.message for p in exc.problems) if exc.problems else ""
            )
    await session.rollback()  # a preview stores nothing
    row = await delivery_repo.get_delivery(session, delivery_id)
    if row is None:  # pragma: no cover - read just above, in this request
        return render_page(request, "not_found.html", staff, status_code=404, what="dead letter")
    patients = await delivery_repo.patients_of(session, ids=[row.id])
    audit.record(
        session,
        action="preview",
        entity_type="Delivery",
        entity_id=str(row.id),
        patient_id=patients.get(row.id),
        detail={"message_id": row.inbound_message_id},
    )
    return render_page(
        request,
        "remap.html",
        staff,
        row=row,
        diff=diff,
        problem=problem,
        profile=profile,
        issues=_issues(row.operation_outcome),
    )


@router.post("/dead-letters/{delivery_id}/remap")
async def remap_and_replay(
    delivery_id: RowIdPath, request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Store what the current profiles make of the delivery's message (new versions,
    with Provenance, delivered through the outbox) and replay the dead delivery, which
    now sends the current versions (``operator``)."""
    staff = await staff_of(request, session, runtime)
    await checked_form(request, staff, role=OPERATOR)
    back = f"/console/dead-letters/{delivery_id}/preview"
    row = await _dead_or_404(session, delivery_id)
    if row is None or row.inbound_message_id is None:
        return redirect_to("/console/dead-letters", error="no such dead letter to re-map")
    try:
        await remap_message(
            session,
            IngestContext.of(runtime),
            row.inbound_message_id,
            apply=True,
            actor=staff.actor_name,
        )
    except GatewayError as exc:
        await session.rollback()
        return redirect_to(back, error=exc.detail)
    await replay_deliveries(
        session,
        actor=staff.actor_name,
        now=utcnow(),
        profiles=runtime.profiles.current,
        ids=[row.id],
    )
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.wake()
    return redirect_to("/console/dead-letters", notice="remapped")
