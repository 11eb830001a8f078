"""Reconciliation jobs whose process stopped (a restart, a crash) do not stay
``running`` forever: a stale heartbeat, or the gateway stopping, marks them ``failed``
with the reason (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

import httpx

from gateway.db.models import ImportStatus, ReconcileJob
from gateway.db.types import utcnow
from gateway.ops import reconcile as rec
from gateway.runtime import Runtime


async def _job(runtime: Runtime, *, runner: str, heartbeat_age_s: float | None) -> str:
    now = utcnow()
    async with runtime.sessionmaker() as session:
        job_id = await rec.create_job(session, target="test-ehr", since=None, runner=runner)
        job = await session.get(ReconcileJob, job_id)
        assert job is not None
        if heartbeat_age_s is None:  # a job started before heartbeats existed
            job.heartbeat_at = None
            job.created_at = now - timedelta(hours=1)
        else:
            job.heartbeat_at = now - timedelta(seconds=heartbeat_age_s)
        await session.commit()
    return job_id


async def test_a_job_whose_process_stopped_is_shown_interrupted(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    lost = await _job(runtime, runner="gone:1", heartbeat_age_s=rec.STALE_AFTER_S + 60)
    old = await _job(runtime, runner="gone:2", heartbeat_age_s=None)
    alive = await _job(runtime, runner="here:1", heartbeat_age_s=5)
    for job_id, status in ((lost, "failed"), (old, "failed"), (alive, "running")):
        r = await client.get(f"/v1/ops/reconcile/{job_id}", headers=admin_headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == status, body
        if status == "failed":
            assert body["error"] == rec.INTERRUPTED
            assert body["finished_at"] is not None


async def test_a_stopping_process_marks_only_its_own_jobs(runtime: Runtime) -> None:
    mine = await _job(runtime, runner="me:1", heartbeat_age_s=1)
    theirs = await _job(runtime, runner="other:1", heartbeat_age_s=1)
    async with runtime.sessionmaker() as session:
        assert await rec.settle_interrupted(session, now=utcnow(), runner="me:1") == 1
        await session.commit()
    async with runtime.sessionmaker() as session:
        a = await session.get(ReconcileJob, mine)
        b = await session.get(ReconcileJob, theirs)
        assert a is not None and a.status == ImportStatus.FAILED and a.error == rec.INTERRUPTED
        assert b is not None and b.status == ImportStatus.RUNNING


async def test_the_heartbeat_keeps_a_job_alive(runtime: Runtime) -> None:
    job_id = await _job(runtime, runner="me:1", heartbeat_age_s=rec.STALE_AFTER_S + 1)
    async with runtime.sessionmaker() as session:
        await rec.beat(session, job_id)
        await session.commit()
    async with runtime.sessionmaker() as session:
        assert await rec.settle_interrupted(session, now=utcnow()) == 0
        job = await session.get(ReconcileJob, job_id)
        assert job is not None and job.status == ImportStatus.RUNNING
