"""Applying a stored clinical-event message right after the acknowledgement, for every
channel that stores one (``/v1/events``, partner webhooks, HL7 v2, EHR notifications) and
for the ops retry of a message."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from gateway.events import apply
from gateway.runtime import Runtime


def _wake_worker(request: Request, outcome: str) -> None:
    worker = getattr(request.app.state, "worker", None)
    if outcome == "deferred" and worker is not None:
        worker.wake()


async def apply_after_response(request: Request, runtime: Runtime, received: Any) -> None:
    """Apply a message this request stored (a :class:`~gateway.events.service.Received`
    or an ``Hl7Reply``) right after the response, with the events mapped on receipt; wake
    the in-process worker when the message went back to the queue (an id-only
    notification: the worker reads from the EHR; a retry)."""
    message = getattr(received, "message", None)
    if message is None:
        return
    outcome = await apply.apply_received(runtime, message, prepared=received.prepared)
    _wake_worker(request, outcome)


async def apply_id_after_response(request: Request, runtime: Runtime, message_id: str) -> None:
    """Claim and apply a stored message right after the response (an ops retry)."""
    _wake_worker(request, await apply.process_safely(runtime, message_id))
