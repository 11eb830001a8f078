"""Refused access in the audit trail: a known API client turned away from a route.

A request whose API key is valid but lacks the route's scope (403), or whose client is
bound elsewhere (an event source, a partner, a program), is an access attempt an auditor
wants to see (45 CFR 164.312(b), audit controls; BALP records the outcome of every
attempt: https://profiles.ihe.net/ITI/BALP/). It is recorded as one entry with
AuditEvent.outcome ``4`` (minor failure), the client as the agent, and the route (method
and path, never the query string, which may name a patient) as the entity.

The request's own transaction was rolled back with the error, so the entry is written in
a transaction of its own. Requests without a valid key (401) are not recorded: anyone can
send them, and one row per unauthenticated request would let any peer fill the trail;
they are counted in the log instead (``auth.refused``, with the peer address).
"""

from __future__ import annotations

from gateway.audit.service import record
from gateway.clients.actor import Actor
from gateway.logging import get_logger
from gateway.runtime import Runtime

log = get_logger(__name__)


async def record_refusal(
    runtime: Runtime,
    *,
    actor: Actor,
    method: str,
    route: str,
    status: int,
    problem: str,
) -> None:
    """Write one audit entry for a refused request, in its own transaction.

    Args:
        actor: the authenticated client (its name, id and network address).
        method: the HTTP method (``GET``).
        route: the request's path (``/fhir/Patient/123``: ids only, no query string).
        status: the HTTP status answered (403, 404 for a resource out of the client's
            programs).
        problem: the problem type's slug (``forbidden``).

    Never raises: if the entry cannot be written (the database is unreachable), the
    failure is logged and the refusal is answered all the same.
    """
    try:
        async with runtime.write_session() as session:
            record(
                session,
                action="refuse",
                entity_type="route",
                entity_id=f"{method} {route}",
                outcome="4",
                detail={"status": status, "problem": problem},
                actor=actor,
            )
            await session.commit()
    except Exception as exc:
        log.error("audit.refusal_not_recorded", client=actor.name, error=type(exc).__name__)
