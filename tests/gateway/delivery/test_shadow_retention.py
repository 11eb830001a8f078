"""Shadow-mode results are kept for ``GATEWAY_SHADOW_RETENTION`` and then deleted by the
worker's loop, a batch at a time (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select

from gateway.db.models import ReconcileJob, ShadowResult
from gateway.db.types import utcnow
from gateway.delivery import shadow
from gateway.delivery.shadow import ShadowRetention
from gateway.runtime import Runtime
from gateway.worker import build_worker


async def test_results_older_than_the_retention_are_deleted_in_batches(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = utcnow()
    rows = [
        {
            "target": "acme",
            "resource_ref": f"Patient/p{i}",
            "outcome": "update",
            "diff": [{"op": "replace", "path": "/gender", "value": "female"}],
            "recorded_at": now - timedelta(days=age),
        }
        for i, age in enumerate([45, 40, 31, 29, 1])
    ]
    async with runtime.write_session() as session:
        await session.execute(insert(ShadowResult), rows)
        await session.commit()
    monkeypatch.setattr(shadow, "PURGE_BATCH", 2)
    loop = ShadowRetention(
        sessions=runtime.write_session, retention=timedelta(days=30), now=lambda: now
    )
    assert [await loop.step() for _ in range(3)] == [2, 1, 0]  # 3 expired, 2 a step
    async with runtime.sessionmaker() as session:
        kept = (await session.scalars(select(ShadowResult.resource_ref))).all()
        assert sorted(kept) == ["Patient/p3", "Patient/p4"]
        assert await session.scalar(select(func.count()).select_from(ShadowResult)) == 2


async def test_the_worker_runs_the_retention_loop(runtime: Runtime) -> None:
    worker = build_worker(runtime)
    try:
        assert "shadow-retention" in [loop.name for loop in worker.loops]
    finally:
        await worker.aclose()
    assert runtime.settings.shadow_retention == timedelta(days=30)


async def test_reconciliation_reports_lose_their_items_after_the_retention(
    runtime: Runtime,
) -> None:
    """A finished report's items (diffs: PHI) are emptied; its summary stays."""
    now = utcnow()
    async with runtime.write_session() as session:
        for job_id, age in (("old", 40), ("recent", 2)):
            session.add(
                ReconcileJob(
                    id=job_id,
                    target="acme",
                    status="completed",
                    summary={"mismatches": 1},
                    items=[{"kind": "different", "diff": [{"op": "replace", "value": "x"}]}],
                    created_at=now - timedelta(days=age),
                    finished_at=now - timedelta(days=age),
                )
            )
        await session.commit()
    loop = ShadowRetention(
        sessions=runtime.write_session, retention=timedelta(days=30), now=lambda: now
    )
    assert await loop.step() == 1
    assert await loop.step() == 0
    async with runtime.sessionmaker() as session:
        old = await session.get(ReconcileJob, "old")
        recent = await session.get(ReconcileJob, "recent")
    assert old is not None and old.items is None and old.summary == {"mismatches": 1}
    assert recent is not None and recent.items


async def test_the_last_target_mode_is_read_through_its_index(runtime: Runtime) -> None:
    """The start-up check of each target's mode uses ``ix_audit_log_target_mode``
    (migration 0020): without it, a scan of the whole audit log per target."""
    from sqlalchemy import text

    from gateway.delivery.shadow import last_mode_statement

    compiled = last_mode_statement("acme-ehr").compile(
        runtime.engine.sync_engine, compile_kwargs={"literal_binds": True}
    )
    async with runtime.sessionmaker() as session:
        if runtime.engine.dialect.name == "postgresql":
            await session.execute(text("SET LOCAL enable_seqscan = off"))
            details = " ".join((await session.execute(text(f"EXPLAIN {compiled}"))).scalars())
        else:
            plan = (await session.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))).all()
            details = " ".join(str(row[-1]) for row in plan)
        assert "ix_audit_log_target_mode" in details, details
        await session.rollback()
