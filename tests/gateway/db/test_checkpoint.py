"""Background WAL checkpoints (SQLite) on a real database."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from gateway.db.checkpoint import checkpoint_once, run_checkpoints
from gateway.db.models import AuditEntry
from gateway.db.types import utcnow
from gateway.runtime import Runtime


async def _write_rows(runtime: Runtime, n: int) -> None:
    async with runtime.write_session() as session:
        for i in range(n):
            session.add(
                AuditEntry(
                    at=utcnow(),
                    actor="test",
                    action="create",
                    entity_type="Thing",
                    entity_id=str(i),
                    detail={"pad": "x" * 2000},
                )
            )
        await session.commit()


async def test_a_checkpoint_copies_the_whole_log_back(runtime: Runtime) -> None:
    if runtime.engine.dialect.name != "sqlite":
        return
    await _write_rows(runtime, 200)
    busy, pages, done = await checkpoint_once(runtime.engine)
    assert busy == 0
    assert pages > 0
    assert done == pages


async def test_background_checkpoints_run_and_stop_when_told(runtime: Runtime) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_checkpoints(runtime.engine, stop, interval=timedelta(milliseconds=20))
    )
    await _write_rows(runtime, 50)
    await asyncio.sleep(0.1)
    if runtime.engine.dialect.name == "sqlite":
        assert not task.done()
        _, pages, done = await checkpoint_once(runtime.engine)
        assert done == pages  # nothing left behind by the background checkpoints
    else:
        assert task.done()  # PostgreSQL: nothing to do
    stop.set()
    await asyncio.wait_for(task, 1)
