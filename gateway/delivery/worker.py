"""The delivery worker: claims due outbox rows and sends them to their EHR.

Each delivery becomes one FHIR transaction Bundle built from the stored resources at send
time. Outcomes:

* 2xx transaction-response: delivered; the EHR's ids are stored (``remote_ids``) so later
  changes go as updates; the case records ``ehr_delivered``.
* retryable (connect error, timeout, 408/425/429/5xx): retried with backoff and jitter,
  honouring ``Retry-After``; dead-lettered when the target's policy gives up.
* 412 on a conditional create: several matching resources in the EHR (duplicate
  patients): the delivery waits in ``review`` with an exceptions-queue entry.
* any other 4xx: dead-lettered at once with the EHR's OperationOutcome.
* the token endpoint failing: the delivery waits without spending an attempt.

The worker holds no database connection while it waits for an EHR.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Any

import httpx

from gateway.db.models import Delivery, DeliveryStatus
from gateway.db.types import utcnow
from gateway.delivery import repository as repo
from gateway.delivery.policy import next_retry
from gateway.ehr.client import EhrClient, outcome_summary
from gateway.ehr.errors import (
    EhrConfigError,
    EhrRejectedError,
    EhrUnavailableError,
    TokenUnavailableError,
)
from gateway.events.service import sweep_pending
from gateway.fhir import repository as fhir_repo
from gateway.inbox.repository import new_exception
from gateway.logging import get_logger, log_failure
from gateway.oauth.tokens import TokenProvider, token_provider_for
from gateway.runtime import Runtime
from gateway.subscribers import sender as webhook_sender
from gateway.workflow.service import EventInput, apply_event, sweep_workflow
from mappers.bundle import build_transaction_bundle, parse_transaction_response
from mappers.ehr_overrides import target_transform
from mappers.errors import Problem
from mappers.profiles import EhrTargetProfile

log = get_logger(__name__)

#: How long a delivery waits when its target is misconfigured (bad credentials...).
CONFIG_ERROR_WAIT = timedelta(seconds=60)


def _references(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and "/" in value and "?" not in value:
                out.add(value)
            else:
                _references(value, out)
    elif isinstance(node, list):
        for child in node:
            _references(child, out)


class DeliveryWorker:
    """Delivers outbox rows, ``concurrency`` at a time.

    Args:
        runtime: the wired runtime.
        concurrency: deliveries in flight at once in this process.
        http: shared HTTP client for FHIR requests (one connection pool).
        token_transport: httpx transport for token requests (tests).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        concurrency: int = 4,
        http: httpx.AsyncClient | None = None,
        token_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.runtime = runtime
        self.concurrency = concurrency
        self.name = f"{runtime.instance_id}:worker"
        self._http = http or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max(10, concurrency * 2))
        )
        self._own_http = http is None
        self._token_transport = token_transport
        self._clients: dict[str, tuple[EhrTargetProfile, EhrClient, TokenProvider]] = {}
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Look for work now instead of at the next poll."""
        self._wakeup.set()

    def client_for(self, target: EhrTargetProfile) -> EhrClient:
        """The EHR client of ``target`` (rebuilt when its profile changed)."""
        cached = self._clients.get(target.name)
        if cached is not None and cached[0] == target:
            return cached[1]
        tokens = token_provider_for(target, transport=self._token_transport)
        client = EhrClient(target, self._http, tokens)
        self._clients[target.name] = (target, client, tokens)
        return client

    async def read_resource(
        self, target: str, resource_type: str, resource_id: str
    ) -> dict[str, Any]:
        """Read a resource from an EHR target with its token (id-only notifications)."""
        profile = self.runtime.profiles.current.ehr.get(target)
        if profile is None:
            raise EhrConfigError(f"no EHR target {target!r}")
        return await self.client_for(profile).read(resource_type, resource_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set: deliver, apply pending events, sleep when idle."""
        poll = self.runtime.settings.worker_poll_interval.total_seconds()
        log.info("worker.started", worker=self.name, concurrency=self.concurrency)
        while not stop.is_set():
            try:
                done = await self.run_once()
                done += await sweep_pending(self.runtime, reader=self.read_resource)
                done += await sweep_workflow(self.runtime)
            except Exception:
                log.exception("worker.loop_error", worker=self.name)
                done = 0
            if done:
                continue
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_any(stop), timeout=poll)
        log.info("worker.stopped", worker=self.name)

    async def _wait_any(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wakeup.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def run_once(self) -> int:
        """Claim one batch and deliver it. Returns how many deliveries were attempted."""
        targets = [t.name for t in self.runtime.profiles.current.enabled_targets()]
        settings = self.runtime.settings
        async with self.runtime.write_session() as session:
            claimed = await repo.claim(
                session,
                targets=targets,
                limit=max(settings.worker_batch_size, self.concurrency),
                worker=self.name,
                lease=settings.worker_lease,
                now=utcnow(),
            )
            claimed += await repo.claim(
                session,
                targets=await webhook_sender.subscriber_names(session),
                limit=max(settings.worker_batch_size, self.concurrency),
                worker=self.name,
                lease=settings.worker_lease,
                now=utcnow(),
                kind=webhook_sender.KIND,
            )
            await session.commit()
        if not claimed:
            return 0
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(delivery: Delivery) -> None:
            async with semaphore:
                try:
                    if delivery.kind == webhook_sender.KIND:
                        await webhook_sender.send(
                            self.runtime, delivery, http=self._http, worker=self.name
                        )
                    else:
                        await self.deliver(delivery)
                except Exception as exc:  # the lease returns the row to the queue
                    log_failure(
                        log,
                        "delivery.crashed",
                        exc,
                        delivery_id=delivery.id,
                        target=delivery.target,
                    )

        await asyncio.gather(*(one(d) for d in claimed))
        return len(claimed)

    async def deliver(self, delivery: Delivery) -> None:
        """Send one claimed delivery and record the outcome."""
        target = self.runtime.profiles.current.ehr.get(delivery.target)
        if target is None or not target.enabled:
            await self._release(
                delivery, wait=CONFIG_ERROR_WAIT, error="target is not configured or disabled"
            )
            return
        async with self.runtime.sessionmaker() as session:
            resources = await fhir_repo.get_resources(session, delivery.resource_refs)
            if len(resources) != len(delivery.resource_refs):
                await self._dead(
                    session,
                    delivery,
                    reason="missing_resources",
                    error="stored resources are missing",
                    status_code=None,
                    outcome=None,
                    started_at=utcnow(),
                    duration_ms=0,
                )
                await session.commit()
                return
            referenced: set[str] = set()
            _references(resources, referenced)
            outside = sorted(referenced - set(delivery.resource_refs))
            remote_ids = await repo.remote_ids_for(
                session, target=target.name, refs=[*delivery.resource_refs, *outside]
            )
            identifiers = await repo.identifiers_for(session, outside)
        bundle = build_transaction_bundle(
            resources,
            remote_ids=remote_ids,
            outside_identifiers=identifiers,
            provenance_tag_system=self.runtime.systems.provenance,
            transform=target_transform(target, self.runtime.profiles.current.concept_maps),
        )
        client = self.client_for(target)
        started_at = utcnow()
        t0 = time.perf_counter()
        try:
            response = await client.transaction(bundle)
            entries = parse_transaction_response(response, resources)
        except TokenUnavailableError as exc:
            wait = timedelta(seconds=exc.retry_after_s or 1.0)
            await self._release(delivery, wait=wait, error=str(exc))
            return
        except EhrConfigError as exc:
            await self._release(delivery, wait=CONFIG_ERROR_WAIT, error=str(exc))
            return
        except EhrUnavailableError as exc:
            await self._retry(delivery, target, exc, started_at, t0)
            return
        except EhrRejectedError as exc:
            await self._rejected(delivery, exc, started_at, t0)
            return
        except ValueError as exc:
            # 2xx without a usable transaction-response: the transaction may have been
            # applied; a retry is safe because every entry is conditional.
            await self._retry(
                delivery,
                target,
                EhrUnavailableError(f"unusable transaction-response ({exc})"),
                started_at,
                t0,
            )
            return
        duration_ms = int((time.perf_counter() - t0) * 1000)
        now = utcnow()
        async with self.runtime.write_session() as session:
            for entry in entries:
                if entry.remote_id:
                    version = next(
                        (
                            r.get("meta", {}).get("versionId")
                            for r in resources
                            if r["resourceType"] == entry.resource_type
                            and r["id"] == entry.local_id
                        ),
                        None,
                    )
                    await repo.save_remote_id(
                        session,
                        target=target.name,
                        resource_type=entry.resource_type,
                        local_id=entry.local_id,
                        remote_id=entry.remote_id,
                        remote_version=entry.remote_version,
                        delivered_version=int(version) if version else None,
                        now=now,
                    )
            owned = await repo.finish(
                session,
                delivery_id=delivery.id,
                worker=self.name,
                values={
                    "status": DeliveryStatus.DELIVERED,
                    "delivered_at": now,
                    "last_status_code": 200,
                    "last_error": None,
                    "operation_outcome": None,
                },
            )
            repo.add_attempt(
                session,
                delivery=delivery,
                worker=self.name,
                started_at=started_at,
                duration_ms=duration_ms,
                outcome="delivered",
                status_code=200,
                error=None,
            )
            if owned and delivery.inbound_message_id:
                await apply_event(
                    session,
                    self.runtime.profiles.current.workflow_or_raise,
                    EventInput(
                        source="gateway",
                        event_id=f"ehr_delivered:{target.name}:{delivery.inbound_message_id}",
                        type="ehr_delivered",
                        detail=None,
                        occurred_at=now,
                        patient_id=delivery.ordering_key,
                        message_id=delivery.inbound_message_id,
                    ),
                )
            await session.commit()
        log.info(
            "delivery.delivered",
            delivery_id=delivery.id,
            target=target.name,
            attempt=delivery.attempts,
            duration_ms=duration_ms,
            entries=len(entries),
        )

    async def _release(self, delivery: Delivery, *, wait: timedelta, error: str) -> None:
        """Put a claimed row back without counting the attempt (nothing was sent)."""
        async with self.runtime.write_session() as session:
            await repo.finish(
                session,
                delivery_id=delivery.id,
                worker=self.name,
                values={
                    "status": DeliveryStatus.PENDING,
                    "available_at": utcnow() + wait,
                    "attempts": max(0, delivery.attempts - 1),
                    "last_error": error[:500],
                },
            )
            await session.commit()
        log.info(
            "delivery.waiting",
            delivery_id=delivery.id,
            target=delivery.target,
            wait_s=wait.total_seconds(),
        )

    async def _retry(
        self,
        delivery: Delivery,
        target: EhrTargetProfile,
        exc: EhrUnavailableError,
        started_at: Any,
        t0: float,
    ) -> None:
        duration_ms = int((time.perf_counter() - t0) * 1000)
        now = utcnow()
        decision = next_retry(
            attempts=delivery.attempts,
            created_at=delivery.created_at,
            now=now,
            policy=target.retry,
            retry_after_s=exc.retry_after_s,
        )
        async with self.runtime.write_session() as session:
            if decision.give_up:
                await self._dead(
                    session,
                    delivery,
                    reason=decision.give_up,
                    error=str(exc),
                    status_code=exc.status_code,
                    outcome=None,
                    started_at=started_at,
                    duration_ms=duration_ms,
                    transient=True,
                )
            else:
                await repo.finish(
                    session,
                    delivery_id=delivery.id,
                    worker=self.name,
                    values={
                        "status": DeliveryStatus.PENDING,
                        "available_at": decision.retry_at,
                        "last_error": str(exc)[:500],
                        "last_status_code": exc.status_code,
                    },
                )
                repo.add_attempt(
                    session,
                    delivery=delivery,
                    worker=self.name,
                    started_at=started_at,
                    duration_ms=duration_ms,
                    outcome="transient",
                    status_code=exc.status_code,
                    error=str(exc)[:500],
                )
            await session.commit()
        log.info(
            "delivery.attempt_failed",
            delivery_id=delivery.id,
            target=target.name,
            attempt=delivery.attempts,
            status_code=exc.status_code,
            gave_up=decision.give_up,
        )

    async def _rejected(
        self, delivery: Delivery, exc: EhrRejectedError, started_at: Any, t0: float
    ) -> None:
        duration_ms = int((time.perf_counter() - t0) * 1000)
        async with self.runtime.write_session() as session:
            if exc.status_code == 412:
                await repo.finish(
                    session,
                    delivery_id=delivery.id,
                    worker=self.name,
                    values={
                        "status": DeliveryStatus.REVIEW,
                        "last_error": str(exc)[:500],
                        "last_status_code": 412,
                        "operation_outcome": exc.operation_outcome,
                        "dead_reason": "multiple_matches",
                    },
                )
                repo.add_attempt(
                    session,
                    delivery=delivery,
                    worker=self.name,
                    started_at=started_at,
                    duration_ms=duration_ms,
                    outcome="permanent",
                    status_code=412,
                    error=str(exc)[:500],
                )
                session.add(
                    new_exception(
                        kind="duplicate_match",
                        channel="delivery",
                        sender=delivery.target,
                        message_id=delivery.inbound_message_id,
                        problems=[
                            Problem(
                                "delivery",
                                "multiple_matches",
                                f"delivery {delivery.id}: the EHR has several resources "
                                "matching a conditional create",
                            )
                        ],
                    )
                )
            else:
                await self._dead(
                    session,
                    delivery,
                    reason="rejected",
                    error=str(exc),
                    status_code=exc.status_code,
                    outcome=exc.operation_outcome,
                    started_at=started_at,
                    duration_ms=duration_ms,
                )
            await session.commit()
        log.info(
            "delivery.rejected",
            delivery_id=delivery.id,
            target=delivery.target,
            status_code=exc.status_code,
            outcome=outcome_summary(exc.operation_outcome),
        )

    async def _dead(
        self,
        session: Any,
        delivery: Delivery,
        *,
        reason: str,
        error: str,
        status_code: int | None,
        outcome: dict[str, Any] | None,
        started_at: Any,
        duration_ms: int,
        transient: bool = False,
    ) -> None:
        await repo.finish(
            session,
            delivery_id=delivery.id,
            worker=self.name,
            values={
                "status": DeliveryStatus.DEAD,
                "dead_reason": reason,
                "last_error": error[:500],
                "last_status_code": status_code,
                "operation_outcome": outcome,
            },
        )
        repo.add_attempt(
            session,
            delivery=delivery,
            worker=self.name,
            started_at=started_at,
            duration_ms=duration_ms,
            outcome="transient" if transient else "permanent",
            status_code=status_code,
            error=error[:500],
        )
        log.warning(
            "delivery.dead_lettered",
            delivery_id=delivery.id,
            target=delivery.target,
            reason=reason,
            status_code=status_code,
        )

    async def aclose(self) -> None:
        """Close HTTP clients."""
        for _, _, tokens in self._clients.values():
            closer = getattr(tokens, "aclose", None)
            if closer is not None:
                await closer()
        if self._own_http:
            await self._http.aclose()
