"""Exception SLAs (``exception_sla`` in profiles/workflow.yaml): the due time on the
console, the past-due filter, and the ``exception.overdue`` escalation webhook (once)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from gateway.db.models import Delivery, ExceptionRecord, Subscriber
from gateway.db.types import utcnow
from gateway.runtime import Runtime
from gateway.subscribers.service import enqueue_case_webhook, enqueue_exception_webhook
from gateway.workflow.timers import WorkflowTimers
from mappers.profiles import WorkflowProfile
from mappers.workflow import exception_due_at
from tests.console.conftest import StaffFactory, sign_in
from tests.support.api import rows


async def _exceptions(runtime: Runtime) -> tuple[int, int]:
    now = utcnow()
    async with runtime.sessionmaker() as session:
        old = ExceptionRecord(
            kind="transition_not_allowed",  # PT8H in the bundled workflow
            channel="events",
            sender="pharmacy",
            problems=[],
            created_at=now - timedelta(hours=9),
        )
        new = ExceptionRecord(
            kind="transition_not_allowed",
            channel="events",
            sender="pharmacy",
            problems=[],
            created_at=now - timedelta(hours=1),
        )
        session.add_all(
            [
                old,
                new,
                Subscriber(
                    name="ops-pager",
                    url="http://127.0.0.1:9/pager",
                    secret="whsec_" + "A" * 43 + "=",
                    event_types=["exception.*"],
                    active=True,
                ),
            ]
        )
        await session.commit()
        return old.id, new.id


async def test_an_exception_past_its_sla_is_escalated_once(runtime: Runtime) -> None:
    old, _ = await _exceptions(runtime)
    timers = WorkflowTimers(
        sessions=runtime.write_session,
        workflow=lambda: runtime.profiles.current.workflow,
        notify=enqueue_case_webhook,
        escalate=enqueue_exception_webhook,
    )
    await timers.step()
    await timers.step()
    [webhook] = await rows(runtime, Delivery)
    assert (webhook.kind, webhook.target, webhook.ordering_key) == (
        "webhook",
        "ops-pager",
        f"exception:{old}",
    )
    assert webhook.payload is not None
    assert webhook.payload["type"] == "exception.overdue"
    data = webhook.payload["data"]
    assert (data["exception_id"], data["kind"], data["assigned_to"]) == (
        old,
        "transition_not_allowed",
        None,
    )
    [escalated] = await rows(runtime, ExceptionRecord, ExceptionRecord.escalated_at.is_not(None))
    assert escalated.id == old


async def test_the_console_shows_due_times_and_filters_past_due(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    old, new = await _exceptions(runtime)
    await sign_in(console, await make_staff("viewer"))
    past = await console.get("/console/exceptions?sla=overdue")
    assert f'href="/console/exceptions/{old}"' in past.text
    assert f'href="/console/exceptions/{new}"' not in past.text
    assert "past due" in past.text
    within = await console.get("/console/exceptions?sla=ok")
    assert f'href="/console/exceptions/{new}"' in within.text
    assert f'href="/console/exceptions/{old}"' not in within.text


def test_due_time_by_kind_with_a_default() -> None:
    workflow = WorkflowProfile.model_validate(
        {
            "version": "1",
            "states": ["a"],
            "events": {"e": {"owners": ["x"]}},
            "transitions": [],
            "exception_sla": {"unmatched_patient": "PT4H", "*": "P1D"},
        }
    )
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert exception_due_at(workflow, kind="unmatched_patient", created_at=at) == at + timedelta(
        hours=4
    )
    assert exception_due_at(workflow, kind="other", created_at=at) == at + timedelta(days=1)


def test_a_non_positive_exception_sla_is_refused() -> None:
    with pytest.raises(ValueError, match="positive duration"):
        WorkflowProfile.model_validate(
            {
                "version": "1",
                "states": ["a"],
                "events": {"e": {"owners": ["x"]}},
                "transitions": [],
                "exception_sla": {"x": "PT0S"},
            }
        )
