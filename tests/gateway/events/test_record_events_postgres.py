"""``record_events`` from two workers at once on PostgreSQL (separate connection pools):
overlapping batches in opposite orders neither deadlock nor record an event twice, and a
batch that waits for a case another transaction moved decides against the case as it was
committed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from gateway.db.engine import make_engine, make_sessionmaker
from gateway.db.models import Case, CaseEvent
from gateway.db.types import utcnow
from gateway.runtime import Runtime
from gateway.subscribers.service import enqueue_case_webhook
from gateway.workflow.batch import record_events
from gateway.workflow.service import ApplyResult, EventInput, apply_event
from tests.support.delivery import wait_until
from tests.support.events_env import Patient, new_patient

pytestmark = pytest.mark.postgres


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """PostgreSQL only."""
    return postgres_url


@pytest.fixture
async def engines(runtime: Runtime) -> AsyncIterator[list[AsyncEngine]]:
    """Two engines: two workers' own connection pools."""
    made = [make_engine(runtime.settings.database_url, pool_size=1) for _ in range(2)]
    try:
        yield made
    finally:
        for engine in made:
            await engine.dispose()


def _delivered(patient: Patient, message: str, at: datetime) -> EventInput:
    return EventInput(
        source="gateway",
        event_id=f"ehr_delivered:test-ehr:{message}",
        type="ehr_delivered",
        detail=None,
        occurred_at=at,
        patient_id=patient.patient_id,
    )


async def _lock_waiters(runtime: Runtime) -> int:
    """Sessions of this database waiting for a row lock."""
    async with runtime.engine.connect() as conn:
        return int(
            await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            or 0
        )


async def _second_waits_for_first(
    runtime: Runtime,
    first: AsyncSession,
    second: asyncio.Task[list[ApplyResult]],
) -> list[ApplyResult]:
    """``first`` holds its locks (flushed, not committed) until ``second`` is seen
    waiting for one of them; then it commits and ``second`` finishes."""

    async def waiting() -> bool:
        return second.done() or await _lock_waiters(runtime) >= 1

    assert await wait_until(waiting, timeout_s=10, interval_s=0.01)
    assert not second.done(), "the second batch did not wait for the first one's cases"
    await first.commit()
    return await asyncio.wait_for(second, 10)


async def _history_count(runtime: Runtime, case_id: str, event_id: str) -> int:
    async with runtime.sessionmaker() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(CaseEvent)
                .where(CaseEvent.case_id == case_id, CaseEvent.event_id == event_id)
            )
            or 0
        )


async def test_two_workers_batches_over_the_same_cases_in_opposite_orders(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    engines: list[AsyncEngine],
) -> None:
    a = await new_patient(client, admin_headers)
    b = await new_patient(client, admin_headers)
    workflow = runtime.profiles.current.workflow_or_raise
    now = utcnow()
    one = [_delivered(a, "m-a", now), _delivered(b, "m-b", now)]
    two = [_delivered(b, "m-b", now), _delivered(a, "m-a", now), _delivered(a, "m-a2", now)]
    first_maker, second_maker = (make_sessionmaker(e) for e in engines)

    async def second_batch() -> list[ApplyResult]:
        async with second_maker() as session:
            results = await record_events(session, workflow, two, notify=enqueue_case_webhook)
            await session.commit()
            return results

    async with first_maker() as first:
        first_results = await record_events(
            session=first, workflow=workflow, events=one, notify=enqueue_case_webhook
        )
        second = asyncio.create_task(second_batch())
        second_results = await _second_waits_for_first(runtime, first, second)

    assert [(r.outcome, r.case_id) for r in first_results] == [
        ("recorded", a.case_id),
        ("recorded", b.case_id),
    ]
    # The second batch saw the first one's rows once it had the cases: duplicates, and
    # its own new event recorded.
    assert [(r.outcome, r.case_id) for r in second_results] == [
        ("duplicate", b.case_id),
        ("duplicate", a.case_id),
        ("recorded", a.case_id),
    ]
    for case_id, message in ((a.case_id, "m-a"), (b.case_id, "m-b"), (a.case_id, "m-a2")):
        assert await _history_count(runtime, case_id, f"ehr_delivered:test-ehr:{message}") == 1
    async with runtime.sessionmaker() as session:
        for case_id in (a.case_id, b.case_id):
            case = await session.get(Case, case_id)
            assert case is not None and case.sla_timer is None  # delivered: timer stopped


async def test_a_batch_waiting_for_a_case_decides_against_the_committed_move(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    engines: list[AsyncEngine],
) -> None:
    """An ingest moves the case (intake_received -> awaiting_review) while a worker's
    batch waits for it: the batch's event is recorded in the new state, and the new
    state's delivery timer is stopped by it (not the old state's)."""
    patient = await new_patient(client, admin_headers)
    workflow = runtime.profiles.current.workflow_or_raise
    now = utcnow()
    paid = EventInput(
        source="checkout",
        event_id="pay-1",
        type="payment_completed",
        detail=None,
        occurred_at=now - timedelta(seconds=5),
        patient_id=patient.patient_id,
    )
    first_maker, second_maker = (make_sessionmaker(e) for e in engines)

    async def worker_batch() -> list[ApplyResult]:
        async with second_maker() as session:
            results = await record_events(
                session, workflow, [_delivered(patient, "m-1", now)], notify=enqueue_case_webhook
            )
            await session.commit()
            return results

    async with first_maker() as ingest:
        moved = await apply_event(ingest, workflow, paid, notify=enqueue_case_webhook)
        assert (moved.outcome, moved.to_state) == ("applied", "awaiting_review")
        batch = asyncio.create_task(worker_batch())
        [result] = await _second_waits_for_first(runtime, ingest, batch)

    assert (result.outcome, result.from_state, result.to_state) == (
        "recorded",
        "awaiting_review",
        "awaiting_review",
    )
    async with runtime.sessionmaker() as session:
        case = await session.get(Case, patient.case_id)
        assert case is not None and case.state == "awaiting_review"
        # payment_not_delivered stopped by the delivery; review_overdue (24 h) runs.
        assert case.sla_timer == "review_overdue"
