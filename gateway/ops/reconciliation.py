"""Reconciliation over the API (``ops:admin`` to start, ``ops:read`` to read):
``POST /v1/ops/targets/{name}/reconcile`` starts a job in the background and answers 202;
``GET /v1/ops/reconcile/{id}`` is its summary and mismatches (JSON, or
``?format=csv|ndjson``). The comparison is :mod:`gateway.ops.reconcile`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import AwareDatetime

from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.db.models import ReconcileJob
from gateway.db.types import utcnow
from gateway.db.uow import unit_of_work
from gateway.deps import RuntimeDep, SessionDep, require_scope
from gateway.ehr.errors import EhrError
from gateway.ehr.factory import EhrClients
from gateway.errors import NotFoundError
from gateway.logging import get_logger
from gateway.ops import reconcile as rec
from gateway.runtime import Runtime

log = get_logger(__name__)
router = APIRouter(tags=["ops"])

#: ``app.state.ehr_clients``: makes the EHR clients a background job uses (closed after).
ClientsFactory = Callable[[], EhrClients]

_RUNNING: set[asyncio.Task[Any]] = set()


async def run_job(
    runtime: Runtime,
    clients: EhrClients,
    job_id: str,
    *,
    target_name: str,
    since: datetime | None,
    requeue: bool,
) -> rec.Report | None:
    """Run one reconciliation job and record its outcome (owns its transactions)."""
    profiles = runtime.profiles.current
    target = profiles.ehr[target_name]
    report = None
    try:
        async with runtime.sessionmaker() as session:
            report = await rec.reconcile(
                session,
                clients.client_for(target),
                target,
                profiles,
                provenance_tag_system=runtime.systems.provenance,
                since=since,
            )
    except EhrError as exc:
        async with unit_of_work(runtime.write_session) as session:
            await rec.finish_job(session, job_id, report=None, error=f"EHR search failed: {exc}")
        log.warning("reconcile.failed", job_id=job_id, target=target_name)
        return None
    async with unit_of_work(runtime.write_session) as session:
        if requeue:
            await rec.requeue(session, target, report.items, now=utcnow())
        await rec.finish_job(session, job_id, report=report)
    return report


@router.post(
    "/v1/ops/targets/{name}/reconcile",
    status_code=202,
    summary="Start a reconciliation of a target with the EHR (missing / different / EHR only)",
    responses={401: {}, 403: {}, 404: {}},
)
async def start_reconcile(
    name: str,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:admin"))],
    since: Annotated[AwareDatetime | None, Query()] = None,
    requeue: Annotated[
        bool, Query(description="Queue the missing and different resources for redelivery")
    ] = False,
) -> JSONResponse:
    """Compare what the gateway holds for the target with what the EHR holds, by
    business identifier, in the background. ``requeue=true`` queues every mismatch for
    redelivery when it is done.

    Raises:
        NotFoundError: no EHR target of that name.
    """
    if name not in runtime.profiles.current.ehr:
        raise NotFoundError("no such EHR target")
    await rec.settle_interrupted(session, now=utcnow())
    job_id = await rec.create_job(session, target=name, since=since, runner=runtime.instance_id)
    audit.record(
        session,
        action="create",
        entity_type="ReconcileJob",
        entity_id=job_id,
        detail={"target": name, "requeue": str(requeue)},
    )
    await session.commit()
    factory: ClientsFactory = request.app.state.ehr_clients

    async def work() -> None:
        clients = factory()
        heartbeat = asyncio.create_task(_beat(runtime, job_id))
        try:
            await run_job(runtime, clients, job_id, target_name=name, since=since, requeue=requeue)
        except Exception as exc:  # recorded as failed; the caller sees it on the job
            log.error("reconcile.crashed", job_id=job_id, error_type=type(exc).__name__)
            async with unit_of_work(runtime.write_session) as s:
                await rec.finish_job(s, job_id, report=None, error=type(exc).__name__)
        finally:
            heartbeat.cancel()
            await clients.aclose()

    task = asyncio.create_task(work())
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return JSONResponse(
        {"id": job_id, "status": "running", "status_url": f"/v1/ops/reconcile/{job_id}"},
        status_code=202,
        headers={"Location": f"/v1/ops/reconcile/{job_id}"},
    )


async def _beat(runtime: Runtime, job_id: str) -> None:
    """Renew the job's heartbeat every :data:`~gateway.ops.reconcile.HEARTBEAT_S` while
    it runs (a failed renewal is logged; the next one tries again)."""
    while True:
        await asyncio.sleep(rec.HEARTBEAT_S)
        try:
            async with unit_of_work(runtime.write_session) as session:
                await rec.beat(session, job_id)
        except Exception as exc:
            log.warning("reconcile.heartbeat_failed", job_id=job_id, error_type=type(exc).__name__)


async def wait_for_jobs() -> None:
    """Wait until this process's reconciliation jobs end (tests, shutdown)."""
    while _RUNNING:
        await asyncio.gather(*list(_RUNNING), return_exceptions=True)


async def stop_jobs(runtime: Runtime) -> int:
    """Stop this process's running reconciliation jobs (the gateway is stopping) and mark
    them ``failed`` (interrupted: to be started again) at once, rather than when their
    heartbeat goes stale; returns how many were marked."""
    if not _RUNNING:
        return 0
    for task in list(_RUNNING):
        task.cancel()
    await asyncio.gather(*list(_RUNNING), return_exceptions=True)
    try:
        async with unit_of_work(runtime.write_session) as session:
            stopped = await rec.settle_interrupted(
                session, now=utcnow(), runner=runtime.instance_id
            )
    except Exception as exc:  # their heartbeats going stale marks them later
        log.warning("reconcile.interrupt_failed", error_type=type(exc).__name__)
        return 0
    log.warning("reconcile.interrupted", jobs=stopped)
    return stopped


@router.get(
    "/v1/ops/reconcile/{job_id}",
    summary="A reconciliation job: summary and mismatches (JSON, CSV or NDJSON)",
    responses={401: {}, 403: {}, 404: {}},
)
async def get_reconcile(
    job_id: str,
    session: SessionDep,
    _principal: Annotated[Principal, Depends(require_scope("ops:read"))],
    format: Annotated[Literal["json", "csv", "ndjson"], Query()] = "json",
) -> Any:
    """The job's status, summary and mismatches. The diffs hold FHIR content: the read
    is audited.

    Raises:
        NotFoundError: no such job.
    """
    if await rec.settle_interrupted(session, now=utcnow()):  # a job whose process stopped
        await session.commit()
    job = await session.get(ReconcileJob, job_id)
    if job is None:
        raise NotFoundError("no such reconciliation job")
    audit.record(session, action="read", entity_type="ReconcileJob", entity_id=job_id)
    if format == "csv":
        return PlainTextResponse(rec.to_csv(rec.report_of(job)), media_type="text/csv")
    if format == "ndjson":
        return PlainTextResponse(
            rec.to_ndjson(rec.report_of(job)), media_type="application/x-ndjson"
        )
    return JSONResponse(
        {
            "id": job.id,
            "target": job.target,
            "status": job.status,
            "summary": job.summary,
            "items": job.items or [],
            "error": job.error,
            "created_at": job.created_at.isoformat(),
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        }
    )
