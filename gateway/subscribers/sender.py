"""Sending ops webhooks: one claimed outbox row (``deliveries.kind = "webhook"``) to its
subscriber, signed with Standard Webhooks.

The entry point is :func:`send`, called by the delivery worker for each webhook row it
claims (``gateway.delivery.repository.claim(kind="webhook")``); rows of one case go in
order because the claim holds a row back while an older one of the same subscriber and
case is pending.

Request (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md)::

    POST <subscriber url>
    content-type: application/json
    webhook-id: msg_<32 hex>            (the same on every retry: the idempotency key)
    webhook-timestamp: <Unix seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

The key is the base64-decoded part of the subscriber's ``whsec_`` secret; the signature
is made by the ``standardwebhooks`` library, so a subscriber verifies with
``Webhook(secret).verify(body, headers)``.

Outcomes (the retry policy is ``gateway.delivery.policy.next_retry`` with the
subscriber's ``retry`` or :data:`DEFAULT_POLICY`):

* 2xx: delivered;
* transport error, timeout, 408, 425, 429, 5xx: retried with backoff and full jitter,
  honouring ``Retry-After``; dead-lettered when the policy gives up;
* any other 4xx, or an inactive subscriber: dead-lettered at once (replayable).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

import gateway
from gateway.db.models import Delivery, DeliveryStatus, Subscriber
from gateway.db.types import utcnow
from gateway.delivery import repository as repo
from gateway.delivery.policy import next_retry
from gateway.ehr.errors import parse_retry_after
from gateway.logging import get_logger
from gateway.runtime import Runtime
from mappers.profiles import RetryPolicy

log = get_logger(__name__)

#: ``deliveries.kind`` of webhook rows.
KIND = "webhook"
#: Retry policy of subscribers that did not set one.
DEFAULT_POLICY = RetryPolicy(
    base_delay_s=2.0, max_delay_s=300.0, max_attempts=12, max_age_s=72 * 3600.0
)
#: How long a subscriber may take to answer.
TIMEOUT_S = 10.0
RETRYABLE_STATUS = frozenset({408, 425, 429})


def webhook_body(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed): compact JSON with sorted keys."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def signed_headers(secret: str, *, webhook_id: str, body: bytes, now: datetime) -> dict[str, str]:
    """Standard Webhooks headers for ``body`` at ``now`` (second precision)."""
    timestamp = datetime.fromtimestamp(int(now.timestamp()), tz=UTC)
    return {
        "content-type": "application/json",
        "user-agent": f"fhir-gateway/{gateway.__version__}",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, timestamp, body.decode()),
    }


async def subscriber_names(session: Any) -> list[str]:
    """Names of every subscriber: rows of active ones are sent, rows of inactive ones are
    dead-lettered when claimed (so they do not wait forever)."""
    return list((await session.scalars(select(Subscriber.name))).all())


async def send(
    runtime: Runtime, delivery: Delivery, *, http: httpx.AsyncClient, worker: str
) -> str:
    """Send one claimed webhook row and record the outcome (attempt row + status).

    Args:
        runtime: the wired runtime.
        delivery: the row, claimed by ``worker`` (``status = in_flight``).
        http: a shared HTTP client.
        worker: the claiming worker's name (``finish`` only updates rows it holds).

    Returns:
        ``delivered``, ``retry`` or ``dead``.
    """
    async with runtime.sessionmaker() as session:
        subscriber = await session.scalar(
            select(Subscriber).where(Subscriber.name == delivery.target)
        )
    started_at = utcnow()
    if subscriber is None or not subscriber.active or not delivery.payload:
        await _record(
            runtime,
            delivery,
            worker=worker,
            started_at=started_at,
            duration_ms=0,
            status=DeliveryStatus.DEAD,
            outcome="permanent",
            status_code=None,
            error="the subscriber is gone or inactive",
            dead_reason="subscriber_inactive",
        )
        return "dead"
    payload = delivery.payload
    body = webhook_body(payload)
    headers = signed_headers(
        subscriber.secret, webhook_id=str(payload["id"]), body=body, now=started_at
    )
    t0 = time.perf_counter()
    status_code: int | None = None
    retry_after: float | None = None
    error: str | None = None
    try:
        response = await http.post(subscriber.url, content=body, headers=headers, timeout=TIMEOUT_S)
        status_code = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"))
    except httpx.TimeoutException as exc:
        error = f"timeout after {TIMEOUT_S:g}s ({type(exc).__name__})"
    except httpx.TransportError as exc:
        error = f"transport error ({type(exc).__name__})"
    duration_ms = int((time.perf_counter() - t0) * 1000)
    common: dict[str, Any] = {
        "worker": worker,
        "started_at": started_at,
        "duration_ms": duration_ms,
    }
    if status_code is not None and 200 <= status_code < 300:
        await _record(
            runtime,
            delivery,
            **common,
            status=DeliveryStatus.DELIVERED,
            outcome="delivered",
            status_code=status_code,
            error=None,
        )
        log.info(
            "webhook.delivered",
            delivery_id=delivery.id,
            subscriber=delivery.target,
            attempt=delivery.attempts,
            status_code=status_code,
            duration_ms=duration_ms,
        )
        return "delivered"
    retryable = status_code is None or status_code in RETRYABLE_STATUS or status_code >= 500
    error = error or f"subscriber answered {status_code}"
    if not retryable:
        await _record(
            runtime,
            delivery,
            **common,
            status=DeliveryStatus.DEAD,
            outcome="permanent",
            status_code=status_code,
            error=error,
            dead_reason="rejected",
        )
        log.warning(
            "webhook.dead_lettered",
            delivery_id=delivery.id,
            subscriber=delivery.target,
            status_code=status_code,
            reason="rejected",
        )
        return "dead"
    policy = RetryPolicy.model_validate(subscriber.retry) if subscriber.retry else DEFAULT_POLICY
    decision = next_retry(
        attempts=delivery.attempts,
        created_at=delivery.created_at,
        now=utcnow(),
        policy=policy,
        retry_after_s=retry_after,
    )
    if decision.give_up:
        await _record(
            runtime,
            delivery,
            **common,
            status=DeliveryStatus.DEAD,
            outcome="transient",
            status_code=status_code,
            error=error,
            dead_reason=decision.give_up,
        )
        log.warning(
            "webhook.dead_lettered",
            delivery_id=delivery.id,
            subscriber=delivery.target,
            status_code=status_code,
            reason=decision.give_up,
        )
        return "dead"
    await _record(
        runtime,
        delivery,
        **common,
        status=DeliveryStatus.PENDING,
        outcome="transient",
        status_code=status_code,
        error=error,
        available_at=decision.retry_at,
    )
    log.info(
        "webhook.attempt_failed",
        delivery_id=delivery.id,
        subscriber=delivery.target,
        attempt=delivery.attempts,
        status_code=status_code,
    )
    return "retry"


async def _record(
    runtime: Runtime,
    delivery: Delivery,
    *,
    worker: str,
    started_at: datetime,
    duration_ms: int,
    status: DeliveryStatus,
    outcome: str,
    status_code: int | None,
    error: str | None,
    dead_reason: str | None = None,
    available_at: datetime | None = None,
) -> None:
    values: dict[str, Any] = {
        "status": status,
        "last_status_code": status_code,
        "last_error": error[:500] if error else None,
    }
    if status == DeliveryStatus.DELIVERED:
        values["delivered_at"] = utcnow()
    if dead_reason:
        values["dead_reason"] = dead_reason
    if available_at is not None:
        values["available_at"] = available_at
    async with runtime.write_session() as session:
        await repo.finish(session, delivery_id=delivery.id, worker=worker, values=values)
        repo.add_attempt(
            session,
            delivery=delivery,
            worker=worker,
            started_at=started_at,
            duration_ms=duration_ms,
            outcome=outcome,
            status_code=status_code,
            error=error,
        )
        await session.commit()
