"""Running the worker's inbox and workflow-timer loops one step at a time (tests)."""

from __future__ import annotations

from datetime import datetime

from gateway.ehr.factory import EhrClients
from gateway.events.apply import EventApplier
from gateway.runtime import Runtime
from gateway.subscribers.service import enqueue_case_webhook
from gateway.workflow.timers import WorkflowTimers


async def apply_pending(runtime: Runtime, *, clients: EhrClients | None = None) -> int:
    """One step of the worker's inbox loop (with ``clients``: id-only notifications are
    read from the EHR); returns how many messages were processed."""
    applier = EventApplier.for_runtime(runtime, clients=clients, worker="test-worker")
    return await applier.step()


async def run_timers(runtime: Runtime, *, now: datetime | None = None) -> int:
    """One step of the worker's workflow-timers loop at ``now`` (default: the runtime's
    clock); returns how many cases changed."""
    timers = WorkflowTimers(
        sessions=runtime.write_session,
        workflow=lambda: runtime.profiles.current.workflow,
        notify=enqueue_case_webhook,
        clock=runtime.clock,
    )
    return await timers.step(now=now)
