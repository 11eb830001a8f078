"""Sending ops webhooks: one claimed outbox row (``deliveries.kind = "webhook"``) to its
subscriber, signed with Standard Webhooks.

:class:`WebhookSender` is the delivery worker's sender for these rows; rows of one case go
in order because the claim holds a row back while an older one of the same subscriber and
case is pending (``ordering_key`` is the case id).

Request (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md)::

    POST <subscriber url>
    content-type: application/json
    webhook-id: msg_<32 hex>            (the same on every retry: the idempotency key)
    webhook-timestamp: <Unix seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

The key is the base64-decoded part of the subscriber's ``whsec_`` secret; the signature
is made by the ``standardwebhooks`` library, so a subscriber verifies with
``Webhook(secret).verify(body, headers)``.

Outcomes (the worker applies the subscriber's ``retry`` policy or :data:`DEFAULT_POLICY`):

* 2xx: delivered;
* transport error, timeout, 408, 425, 429, 5xx: retried with backoff and full jitter,
  honouring ``Retry-After``; dead-lettered when the policy gives up;
* any other 4xx, or an inactive subscriber: dead-lettered at once (replayable).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

import gateway
from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.db.models import Delivery, Subscriber
from gateway.db.uow import SessionFactory
from gateway.delivery.sender import Delivered, Failed, Outcome, Rejected, TargetConfig
from gateway.ehr.errors import parse_retry_after
from gateway.queue.policy import transient_status
from mappers.profiles import RetryPolicy

#: ``deliveries.kind`` of webhook rows.
KIND = "webhook"
#: Retry policy of subscribers that did not set one.
DEFAULT_POLICY = RetryPolicy(
    base_delay_s=2.0, max_delay_s=300.0, max_attempts=12, max_age_s=72 * 3600.0
)
#: How long a subscriber may take to answer.
TIMEOUT_S = 10.0
#: Webhooks in flight to one subscriber at once, across all workers.
MAX_CONCURRENT = 4


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


class WebhookSender:
    """The :class:`~gateway.delivery.sender.Sender` of ``kind = "webhook"`` rows: one target
    per subscriber, with the subscriber's retry policy (or :data:`DEFAULT_POLICY`).

    The delivery worker does the rest as for EHR deliveries: claims in order per case
    (``ordering_key``), leases, per-subscriber concurrency, circuit breaker, backoff with
    ``Retry-After``, dead letters and replay.

    Args:
        sessions: read sessions (the subscribers).
        http: a shared HTTP client (one is made when omitted, and closed by :meth:`aclose`).
        transport: the transport of the client made when ``http`` is omitted (the egress
            guard).
        clock: the worker's clock (the signature's timestamp).
    """

    kind = KIND

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        http: httpx.AsyncClient | None = None,
        clock: Clock = SYSTEM_CLOCK,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._sessions = sessions
        self._http = http or httpx.AsyncClient(transport=transport)
        self._own_http = http is None
        self._clock = clock

    async def targets(self) -> list[TargetConfig]:
        """Every subscriber: rows of active ones are sent; rows of inactive ones are
        dead-lettered when claimed, so they never wait forever."""
        async with self._sessions() as session:
            rows = (await session.execute(select(Subscriber.name, Subscriber.retry))).all()
        return [
            TargetConfig(
                kind=KIND,
                name=name,
                retry=RetryPolicy.model_validate(retry) if retry else DEFAULT_POLICY,
                max_concurrent=MAX_CONCURRENT,
            )
            for name, retry in rows
        ]

    async def probe(self, target: str) -> bool:
        """A subscriber has no health endpoint: after the open interval, try a delivery."""
        return True

    async def aclose(self) -> None:
        """Close the HTTP client if this sender made it."""
        if self._own_http:
            await self._http.aclose()

    async def send(self, delivery: Delivery) -> Outcome:
        """POST one claimed row to its subscriber, signed (see the module docstring)."""
        async with self._sessions() as session:
            subscriber = await session.scalar(
                select(Subscriber).where(Subscriber.name == delivery.target)
            )
        if subscriber is None or not subscriber.active or not delivery.payload:
            return Rejected(
                "the subscriber is gone or inactive", status_code=None, reason="subscriber_inactive"
            )
        payload = delivery.payload
        body = webhook_body(payload)
        headers = signed_headers(
            subscriber.secret, webhook_id=str(payload["id"]), body=body, now=self._clock.now()
        )
        try:
            response = await self._http.post(
                subscriber.url, content=body, headers=headers, timeout=TIMEOUT_S
            )
        except httpx.TimeoutException as exc:
            return Failed(f"timeout after {TIMEOUT_S:g}s ({type(exc).__name__})")
        except httpx.TransportError as exc:
            return Failed(f"transport error ({type(exc).__name__})")
        status_code = response.status_code
        if 200 <= status_code < 300:
            return Delivered(status_code)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        error = f"subscriber answered {status_code}"
        if transient_status(status_code):
            return Failed(error, status_code, retry_after)
        return Rejected(error, status_code)
